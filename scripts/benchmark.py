"""Speed and time-to-accuracy against the seed tutorial's loop, in one run: ``python -m scripts.benchmark [--quick]``.

Two parts, each variant in its own process (so peak memory is its own), on the same machine:

**throughput** (``--samples`` training images per epoch, 2 epochs, the second one timed; ``--repeats``
rounds of every variant in turn, reported as medians, each ratio to the seed loop paired by round):

- ``seed``: the tutorial's loop, faithfully: torchvision ``FashionMNIST`` with PIL images,
  ``ToTensor`` + ``Normalize``, ``DataLoader(batch_size=32, shuffle=True, num_workers=2)``,
  its CNN (flatten fixed), Adam 1e-3;
- ``default``: this project's train stage (``pipeline/train.py``) at params.yaml's recipe;
- one row per speed option on top of it: ``nchw`` (channels_last off), ``bf16``, ``foreach``
  and ``fused`` AdamW kernels, ``compile`` (torch.compile; its first epoch pays the compile),
  ``bf16-b512`` (bf16 at a global batch of 512), and on a GPU ``cudnn-benchmark``.

**time to accuracy** (full data, whole recipes, test accuracy after every epoch, evaluation
not timed): the seed loop for its 10 epochs, then the ``default``, ``fast`` and ``beyond``
recipes (``recipes/*.yaml`` on top of params.yaml). Reports the training time until the test
accuracy first reaches each ``--targets`` value, the final accuracy, and ratios to the seed
loop (a ``>`` ratio when the seed loop never reached the target: its whole run is the bound).

Also profiles the device data path (index, flip, translate, cutout, to float) against the measured
step time. Results go to ``--out`` as JSON and to stdout as Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# throughput rows on top of the default recipe: name -> train overrides
OPTIONS: dict[str, dict] = {
    "default": {},
    "nchw": {"channels_last": False},
    "bf16": {"mixed_precision": "bf16"},
    "foreach": {"optimizer_impl": "foreach"},
    "fused": {"optimizer_impl": "fused"},
    "compile": {"compile": True},
    "bf16-b512": {"mixed_precision": "bf16", "batch_size": 512, "lr": 0.004},
    "cudnn-benchmark": {"cudnn_benchmark": True},  # GPU only
}
GPU_ONLY = {"cudnn-benchmark"}
RECIPES = ("default", "fast", "beyond")
PARTS = ("throughput", "accuracy", "datapath")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "raw"), help="IDX folder (default: %(default)s)")
    p.add_argument(
        "--samples", type=int, default=20_000, help="training samples per timed epoch (default: %(default)s)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run for CI: 2,000 samples per throughput epoch; recipes on 2,500 train / 1,000 test "
        "samples for at most 2 epochs",
    )
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS), help="throughput rows")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES), help="time-to-accuracy rows")
    p.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.91], help="test accuracies to time")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="throughput rounds, each running every variant once in turn; rows give the median and each ratio "
        "is the median of the per-round ratios, so a slow spell on a shared machine hits both sides "
        "(default: %(default)s; 1 with --quick)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="train.seed values: each recipe runs once per seed (rows NAME/seedS plus a mean row); "
        "throughput rows use the first (default: 0)",
    )
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one variant in this process
    return p.parse_args()


def peak_memory() -> dict[str, float]:
    """This process's peak RSS and its children's (the train stage), plus peak GPU memory."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"peak_rss_mb": round(max(own, children) / 1024, 1)}
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def accuracy_on(model, images, labels) -> float:  # type: ignore[no-untyped-def]
    """Accuracy of ``model`` on float inputs ``images`` (N, 1, 28, 28) on its device."""
    import torch

    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
            for i in range(0, len(labels), 1000)
        )
    model.train()
    return correct / len(labels)


# --- the seed tutorial's loop ------------------------------------------------------------------


def seed_net():  # type: ignore[no-untyped-def]
    """The seed tutorial's CNN, as it wrote it, with the flatten fixed (its 32 * 5 * 5 crashed on 28x28 input)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):  # the seed tutorial's CNN; its 32 * 5 * 5 flatten crashed on 28x28 input
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3)
            self.conv2 = nn.Conv2d(16, 16, 3)
            self.pool = nn.MaxPool2d(2, 2)
            self.conv3 = nn.Conv2d(16, 32, 5)
            self.conv4 = nn.Conv2d(32, 32, 5)
            self.fc1 = nn.Linear(32 * 2 * 2, 256)
            self.fc2 = nn.Linear(256, 128)
            self.fc3 = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool(F.relu(self.conv2(F.relu(self.conv1(x)))))
            x = self.pool(F.relu(self.conv4(F.relu(self.conv3(x)))))
            x = x.view(-1, 32 * 2 * 2)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    return Net()


@contextlib.contextmanager
def seed_datasets(data: Path) -> Iterator[tuple]:
    """The tutorial's datasets: torchvision ``FashionMNIST`` train and test sets, PIL images through
    ``ToTensor`` + ``Normalize``, read from the verified IDX files in ``data`` (linked, not copied)."""
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"  # torchvision's layout
        raw.mkdir(parents=True)
        for f in data.iterdir():
            (raw / f.name).symlink_to(f.resolve())
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        yield (datasets.FashionMNIST(tmp, train=True, download=False, transform=tf),
               datasets.FashionMNIST(tmp, train=False, download=False, transform=tf))  # fmt: skip


def run_seed(data: Path, train_samples: int, epochs: int, test_samples: int, time_only: int = 0) -> dict:
    """The tutorial's loop over the first ``train_samples`` images (0 = all) for ``epochs``.

    ``time_only`` > 0: a throughput run that times ``time_only`` samples after a 20-batch warm-up.
    Otherwise the test accuracy is measured after every epoch (not timed).
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Subset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with seed_datasets(data) as (trainset, testset):
        n = len(trainset) if not train_samples else min(len(trainset), train_samples)
        if time_only:
            n = min(len(trainset), time_only + 20 * 32)
        loader = DataLoader(Subset(trainset, range(n)), batch_size=32, shuffle=True, num_workers=2)
        test_n = min(len(testset), test_samples) if test_samples else len(testset)
        test_x = torch.stack([testset[i][0] for i in range(test_n)]).to(device)
        test_y = torch.tensor([testset[i][1] for i in range(test_n)], device=device)
        torch.manual_seed(0)
        net = seed_net().to(device)
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
        seen, train_s, curve = 0, 0.0, []
        for _ in range(1 if time_only else epochs):
            sync()
            t0 = time.perf_counter()  # includes starting the DataLoader's workers, as the tutorial does
            for i, (inputs, labels) in enumerate(loader):
                if time_only and i == 20:  # warm-up over: time from here
                    sync()
                    t0, seen = time.perf_counter(), 0
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                loss = criterion(net(inputs), labels)
                loss.backward()
                optimizer.step()
                seen += len(labels)
            sync()
            train_s += time.perf_counter() - t0
            if not time_only:
                curve.append({"train_s": round(train_s, 2), "test_accuracy": accuracy_on(net, test_x, test_y)})
    out = {"samples": seen, "train_s": round(train_s, 2), "samples_per_s": round(seen / train_s, 1)}
    if not time_only:
        out["samples_per_s"] = round(epochs * n / train_s, 1)
        out["curve"] = curve
    return out


# --- this pipeline's train stage ---------------------------------------------------------------


def recipe_params(recipe: str) -> dict:
    """params.yaml with ``recipes/<recipe>.yaml`` merged on top (``default``: params.yaml as is)."""
    import yaml

    from pipeline.params import with_overrides

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if recipe == "default":
        return params
    return with_overrides(params, yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text()))


def train_stage(params: dict, data: Path, tmp: Path) -> Path:
    """Run the train stage on ``params`` in a fresh process, keeping its checkpoints; returns its output folder."""
    import yaml

    from pipeline.train import Paths, command

    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cmd = command(path, Paths.under(tmp, data), [], "--keep-state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}  # params decide, not the shell
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train stage failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")
    return tmp


def checkpoints(out: Path) -> list[Path]:
    """The checkpoints the stage kept (``--keep-state``) in its one run folder, oldest first."""
    from pipeline.checkpoint import list_checkpoints, list_runs

    (run,) = list_runs(out / "checkpoints")
    return list_checkpoints(run)


def history(out: Path) -> list[dict]:
    """The stage's per-epoch rows (samples/s, ...) from its last checkpoint: no DVCLive needed."""
    from pipeline.checkpoint import read_checkpoint

    return read_checkpoint(checkpoints(out)[-1]).state.history


def gpu_peak(rows: list[dict]) -> dict:
    return {"peak_gpu_mb": max(r["peak_gpu_memory_mb"] for r in rows)} if "peak_gpu_memory_mb" in rows[0] else {}


def run_option(data: Path, samples: int, overrides: dict, seed: int) -> dict:
    """Two epochs of ``samples`` training images under one speed option; the second epoch is timed."""
    params = recipe_params("default")
    val = 500
    params["data"].update(subset=samples + val, val_size=val)
    params["train"].update(epochs=2, seed=seed, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        rows = history(train_stage(params, data, Path(tmp)))
    batch = params["train"]["batch_size"]
    return {
        "samples": (samples // batch) * batch,
        "samples_per_s": rows[-1]["samples_per_s"],
        "first_epoch_samples_per_s": rows[0]["samples_per_s"],
        **gpu_peak(rows),
    }


def run_recipe(data: Path, recipe: str, seed: int, quick: bool) -> dict:
    """A whole recipe on the train stage; test accuracy of every epoch's checkpoint afterwards."""
    import torch

    from pipeline.batches import to_input
    from pipeline.checkpoint import read_checkpoint
    from pipeline.dataset import load_split
    from pipeline.model import ModelConfig, build_model

    params = recipe_params(recipe)
    params["train"]["seed"] = seed
    if quick:
        params["data"].update(subset=2_500, val_size=500)
        params["train"]["epochs"] = min(2, params["train"]["epochs"])
    epochs = params["train"]["epochs"]
    params["train"].update(keep_checkpoints=epochs, checkpoint_every_steps=0)  # one checkpoint per epoch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = load_split(data, "test", 1_000 if quick else 0)
    test_x, test_y = to_input(test.images).to(device), test.labels.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = train_stage(params, data, Path(tmp))
        wall = time.perf_counter() - t0
        rows = history(out)
        rates = [r["samples_per_s"] for r in rows]
        model = build_model(ModelConfig(name=params["model"]["name"])).to(device)
        curve, train_s = [], 0.0
        steps = (len_train(params, data) // params["train"]["batch_size"]) * params["train"]["batch_size"]
        for path, rate in zip(checkpoints(out), rates, strict=True):
            train_s += steps / rate
            model.load_state_dict(read_checkpoint(path).model)
            curve.append({"train_s": round(train_s, 2), "test_accuracy": accuracy_on(model, test_x, test_y)})
    return {
        "recipe": {"model": params["model"]["name"], **{k: params["train"][k] for k in sorted(params["train"])}},
        "samples_per_s": round(epochs * steps / train_s, 1),
        "train_s": round(train_s, 2),
        "process_wall_s": round(wall, 1),
        "curve": curve,
        **gpu_peak(rows),
    }


def len_train(params: dict, data: Path) -> int:
    """Training samples the stage uses: the (subset of the) train split less validation."""
    from pipeline.dataset import load_split

    return len(load_split(data, "train", params["data"]["subset"])) - params["data"]["val_size"]


def profile_data_path(data: Path, recipe: str, steps: int = 50) -> dict:
    """Milliseconds per global batch of the device data path alone (what the train loop does before forward)."""
    import torch

    from pipeline.batches import augment, rank_batches, to_input
    from pipeline.dataset import load_split

    cfg = recipe_params(recipe)["train"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = load_split(data, "train").to(device)
    translate, cutout = cfg.get("translate", 0), cfg.get("cutout", 0)
    batches = rank_batches(len(train), cfg["batch_size"], 0, 0, 0, 1, max_shift=translate, cutout=cutout, device=device)
    times = []
    for k, (idx, flip, shift, centers) in enumerate(batches):
        if k == steps:
            break
        sync()
        t0 = time.perf_counter()
        images = augment(train.images[idx], flip, shift, centers, cfg["hflip"], translate, cutout)
        x = to_input(images)
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"batch_size": cfg["batch_size"], "data_ms_per_step": round(1000 * times[len(times) // 2], 3)}


def run_job(job: str, args: argparse.Namespace, samples: int) -> dict:
    kind, _, name = job.partition(":")
    data = Path(args.data)
    if kind == "throughput" and name == "seed":
        result = run_seed(data, 0, 1, 0, time_only=samples)
    elif kind == "throughput":
        result = run_option(data, samples, OPTIONS[name], args.seeds[0])
    elif kind == "accuracy" and name == "seed":
        quick = args.quick
        result = run_seed(data, 2_500 if quick else 0, 2 if quick else 10, 1_000 if quick else 0)
    elif kind == "accuracy":
        recipe, _, seed = name.partition("/seed")
        result = run_recipe(data, recipe, int(seed or args.seeds[0]), args.quick)
    else:  # "datapath"
        result = profile_data_path(data, name)
    return {**result, **peak_memory()}


def time_to(curve: list[dict], target: float) -> float | None:
    return next((p["train_s"] for p in curve if p["test_accuracy"] >= target), None)


def machine_info(samples: int) -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []  # fmt: skip
    return {
        "platform": platform.platform(),
        "processor": names[0] if names else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "throughput_samples_per_epoch": samples,
    }


def main() -> int:
    args = parse_args()
    samples = 2_000 if args.quick else args.samples
    if args.job:  # child process
        print(json.dumps(run_job(args.job, args, samples)))
        return 0
    data = Path(args.data)
    if not (data / "train-images-idx3-ubyte").is_file():
        print(f"error: no IDX files in {data}; run `dvc repro download`", file=sys.stderr)
        return 1
    import torch

    gpu = torch.cuda.is_available()
    jobs = []
    if "throughput" in args.parts:
        variants = ["seed"] + [o for o in args.options if gpu or o not in GPU_ONLY]
        rounds = 1 if args.quick else args.repeats
        jobs += [f"throughput:{v}#{r}" for r in range(rounds) for v in variants]
    if "accuracy" in args.parts:
        per_seed = len(args.seeds) > 1
        jobs += ["accuracy:seed"] + [f"accuracy:{r}/seed{s}" if per_seed else f"accuracy:{r}"
                                     for r in args.recipes for s in args.seeds]  # fmt: skip
    if "datapath" in args.parts:
        jobs += [f"datapath:{r}" for r in RECIPES]
    results: dict[str, dict] = {"throughput": {}, "accuracy": {}, "datapath": {}}
    rounds: dict[str, list[dict]] = {}  # throughput variant -> one result per round
    for job in jobs:
        cmd = [sys.executable, __file__, "--job", job.partition("#")[0], "--data", str(data), "--samples",
               str(samples), "--seeds", *map(str, args.seeds), *(["--quick"] if args.quick else [])]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"error: {job} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        kind, _, name = job.partition(":")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if kind == "throughput":
            rounds.setdefault(name.partition("#")[0], []).append(result)
        else:
            results[kind][name] = result
        print(f"{job}: {result}", file=sys.stderr, flush=True)
    results["throughput"] = merge_rounds(rounds)
    report = summarise(results, args.targets)
    report["machine"] = machine_info(samples)
    print(markdown(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def merge_rounds(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """One row per throughput variant from its rounds: medians, the per-round rates, and ratios to the seed loop.

    Round ``r`` of every variant ran back to back, so ``rate_r / seed_rate_r`` compares runs made
    minutes apart; the row's ratio is the median of those, with their range.
    """
    seed = [r["samples_per_s"] for r in rounds.get("seed", [])]
    rows = {}
    for name, runs in rounds.items():
        rates = [r["samples_per_s"] for r in runs]
        row = {**runs[0], "samples_per_s": round(statistics.median(rates), 1), "samples_per_s_rounds": rates}
        if "first_epoch_samples_per_s" in runs[0]:
            row["first_epoch_samples_per_s"] = round(statistics.median(r["first_epoch_samples_per_s"] for r in runs), 1)
        for key in ("peak_rss_mb", "peak_gpu_mb"):
            if key in runs[0]:
                row[key] = max(r[key] for r in runs)
        if len(seed) == len(rates):
            ratios = [mine / theirs for mine, theirs in zip(rates, seed, strict=True)]
            row["ratio_vs_seed"] = round(statistics.median(ratios), 2)
            row["ratio_vs_seed_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
        else:
            row["ratio_vs_seed"] = None
        rows[name] = row
    return rows


def summarise(results: dict[str, dict], targets: list[float]) -> dict:
    """Ratios to the seed loop, times to each target, and the data path's share of a step."""
    seed = results["accuracy"].get("seed")
    for row in results["accuracy"].values():
        row["final_test_accuracy"] = row["curve"][-1]["test_accuracy"]
        row["to_target"] = {}
        for t in targets:
            mine = time_to(row["curve"], t)
            entry: dict = {"train_s": mine}
            if seed is not None and mine:
                theirs = time_to(seed["curve"], t)
                # the seed loop never got there: its whole run is a lower bound on its time
                entry["ratio_vs_seed"] = round((theirs or seed["train_s"]) / mine, 1)
                entry["ratio_is_lower_bound"] = theirs is None
            row["to_target"][f"{t:.3f}"] = entry
    means = {}
    for recipe in dict.fromkeys(k.partition("/seed")[0] for k in results["accuracy"] if "/seed" in k):
        runs = [r for k, r in results["accuracy"].items() if k.startswith(f"{recipe}/seed")]
        mean = {
            "seeds": len(runs),
            "final_test_accuracy": round(sum(r["final_test_accuracy"] for r in runs) / len(runs), 5),
            "train_s": round(sum(r["train_s"] for r in runs) / len(runs), 2),
            "samples_per_s": round(sum(r["samples_per_s"] for r in runs) / len(runs), 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "to_target": {},
        }
        for t in runs[0]["to_target"]:
            times = [r["to_target"][t]["train_s"] for r in runs]
            entry: dict = {"train_s": None if None in times else round(sum(times) / len(times), 2)}
            if entry["train_s"] and seed is not None:
                theirs = time_to(seed["curve"], float(t))
                entry["ratio_vs_seed"] = round((theirs or seed["train_s"]) / entry["train_s"], 1)
                entry["ratio_is_lower_bound"] = theirs is None
            mean["to_target"][t] = entry
        means[f"{recipe} (mean)"] = mean
    results["accuracy"].update(means)
    for recipe, row in results["datapath"].items():
        rate = results["accuracy"].get(recipe, results["accuracy"].get(f"{recipe} (mean)", {})).get("samples_per_s")
        if recipe == "default" and "default" in results["throughput"]:
            rate = results["throughput"]["default"]["samples_per_s"]
        if rate:
            step_ms = 1000 * row["batch_size"] / rate
            row["step_ms"] = round(step_ms, 2)
            row["data_share"] = round(row["data_ms_per_step"] / step_ms, 4)
    return {"targets": targets, **results}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"\n{m['device']} ({m['processor']}, {m['cpus']} CPUs), torch {m['torch']}\n"]
    gpu = m["device"] != "cpu"
    mem = "| peak RSS (MB) |" + (" peak GPU (MB) |" if gpu else "")
    if report["throughput"]:
        n = max(len(r["samples_per_s_rounds"]) for r in report["throughput"].values())
        rounds = f"{n} rounds" if n > 1 else "1 round"
        lines += [f"Throughput ({m['throughput_samples_per_epoch']} samples per timed epoch; median of {rounds}, "
                  "× seed: median of the per-round ratios, with their range):\n",
                  "| variant | samples/s | × seed | × seed range | first epoch samples/s " + mem,
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]  # fmt: skip
        for name, r in report["throughput"].items():
            first = f"{r['first_epoch_samples_per_s']:.0f}" if "first_epoch_samples_per_s" in r else ""
            spread = "-".join(map(str, r.get("ratio_vs_seed_range", [])))
            lines.append(f"| {name} | {r['samples_per_s']:.0f} | {r['ratio_vs_seed']} | {spread} | {first} | "
                         f"{r['peak_rss_mb']:.0f} |" + (f" {r.get('peak_gpu_mb', '')} |" if gpu else ""))  # fmt: skip
    if report["accuracy"]:
        heads = " | ".join(f"to {float(t):.1%} (× seed)" for t in report["targets"])
        lines += ["\nTime to test accuracy (training seconds, evaluation excluded):\n",
                  f"| recipe | final test acc | train s | samples/s | {heads} " + mem,
                  "|---|---:|---:|---:|" + "---:|" * (len(report["targets"]) + 1 + gpu)]  # fmt: skip
        for name, r in report["accuracy"].items():
            cells = []
            for entry in r["to_target"].values():
                if entry["train_s"] is None:
                    cells.append("not reached")
                else:
                    ratio = entry.get("ratio_vs_seed")
                    mark = ">" if entry.get("ratio_is_lower_bound") else ""
                    cells.append(f"{entry['train_s']:.1f} s" + (f" ({mark}{ratio}×)" if ratio else ""))
            lines.append(f"| {name} | {r['final_test_accuracy']:.4f} | {r['train_s']:.1f} | {r['samples_per_s']:.0f}"
                         f" | {' | '.join(cells)} | {r['peak_rss_mb']:.0f} |"
                         + (f" {r.get('peak_gpu_mb', '')} |" if gpu else ""))  # fmt: skip
    if report["datapath"]:
        lines += ["\nDevice data path (index + flip + translate + cutout + to float) per global batch:\n",
                  "| recipe | batch | data ms/step | step ms | data share |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, r in report["datapath"].items():
            share = f"{r['data_share']:.1%}" if "data_share" in r else ""
            step = f"{r['step_ms']:.1f}" if "step_ms" in r else ""
            lines.append(f"| {name} | {r['batch_size']} | {r['data_ms_per_step']:.2f} | {step} | {share} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
