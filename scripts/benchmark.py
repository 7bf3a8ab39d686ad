"""Training throughput against the seed tutorial's loop, in one run: ``python scripts/benchmark.py [--quick]``.

Each variant runs in its own process (so peak memory is its own) on the same machine:

- ``seed``: the tutorial's loop, faithfully: torchvision ``FashionMNIST`` with PIL images,
  ``ToTensor`` + ``Normalize``, ``DataLoader(batch_size=32, shuffle=True, num_workers=2)``,
  its CNN (flatten fixed), Adam 1e-3;
- ``pipeline``: this project's train stage (``pipeline/train.py``) at the default recipe;
- ``pipeline-nchw``: the same without ``train.channels_last``, to show what that option is worth;
- ``pipeline-bf16``: the default recipe under ``--mixed_precision bf16``;
- ``pipeline-bf16-b512``: bf16 with a global batch of 512.

Each trains on the same ``--samples`` training images (one pass, after a short warm-up)
and reports samples/s, the ratio to ``seed``, and peak RSS (plus peak GPU memory on a
GPU). Results go to ``--out`` as JSON and to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (train params overrides, mixed precision); "seed" is the tutorial loop, not the pipeline
PIPELINE_VARIANTS: dict[str, tuple[dict, str]] = {
    "pipeline": ({}, "no"),
    "pipeline-nchw": ({"channels_last": False}, "no"),
    "pipeline-bf16": ({}, "bf16"),
    "pipeline-bf16-b512": ({"batch_size": 512, "lr": 0.004}, "bf16"),
}
VARIANTS = ("seed", *PIPELINE_VARIANTS)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "raw"), help="IDX folder (default: %(default)s)")
    p.add_argument(
        "--samples", type=int, default=20_000, help="training samples timed per variant (default: %(default)s)"
    )
    p.add_argument("--quick", action="store_true", help="2,000 samples per variant: a smoke run for CI")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant here
    return p.parse_args()


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    import torch

    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run_seed(data: Path, samples: int) -> dict:
    """The tutorial's training loop, timed over ``samples`` images after a warm-up."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - the tutorial's spelling
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

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

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"  # torchvision's layout, linked to the verified files
        raw.mkdir(parents=True)
        for f in data.iterdir():
            (raw / f.name).symlink_to(f.resolve())
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        trainset = datasets.FashionMNIST(tmp, train=True, download=False, transform=tf)
        warmup = 20 * 32
        subset = Subset(trainset, range(min(len(trainset), samples + warmup)))
        loader = DataLoader(subset, batch_size=32, shuffle=True, num_workers=2)
        torch.manual_seed(0)
        net = Net().to(device)
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
        seen, start = 0, None
        for i, (inputs, labels) in enumerate(loader):
            if i == 20:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, seen = time.perf_counter(), 0
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert start is not None, "too few samples to time"
        elapsed = time.perf_counter() - start
    return {"samples": seen, "seconds": round(elapsed, 2), "samples_per_s": round(seen / elapsed, 1)}


def run_pipeline(data: Path, samples: int, overrides: dict, mixed_precision: str) -> dict:
    """This project's train stage on ``samples`` images (one epoch), read back from its own metrics."""
    import yaml

    val = 500
    with tempfile.TemporaryDirectory() as tmp:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["data"].update(subset=samples + val, val_size=val)
        params["train"].update(epochs=1, **overrides)
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        env = {**os.environ, "ACCELERATE_MIXED_PRECISION": mixed_precision}
        cmd = [sys.executable, str(ROOT / "pipeline" / "train.py"), "--params", str(path), "--data", str(data),
               "--model-dir", f"{tmp}/m", "--live-dir", f"{tmp}/live", "--checkpoint-dir", f"{tmp}/c"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"pipeline run failed:\n{proc.stderr[-2000:]}")
        live = json.loads((Path(tmp) / "live" / "metrics.json").read_text())
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    steps_samples = (samples // params["train"]["batch_size"]) * params["train"]["batch_size"]
    return {
        "samples": steps_samples,
        "seconds": round(steps_samples / live["samples_per_s"], 2),
        "samples_per_s": live["samples_per_s"],
        "process_wall_s": round(wall, 1),
        "peak_rss_mb": round(rss, 1),
    }


def run_variant(name: str, data: Path, samples: int) -> dict:
    if name == "seed":
        result = run_seed(data, samples)
        result.update(peak_memory())
    else:
        result = run_pipeline(data, samples, *PIPELINE_VARIANTS[name])
    return result


def main() -> int:
    args = parse_args()
    data = Path(args.data)
    samples = 2_000 if args.quick else args.samples
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, data, samples)))
        return 0
    if not (data / "train-images-idx3-ubyte").is_file():
        raise SystemExit(f"error: no IDX files in {data}; run `dvc repro download`")
    import torch

    rows = {}
    for name in args.variants:
        cmd = [sys.executable, __file__, "--variant", name, "--data", str(data), "--samples", str(samples)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"error: variant {name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    base = rows.get("seed", {}).get("samples_per_s")
    for r in rows.values():
        r["ratio_vs_seed"] = round(r["samples_per_s"] / base, 1) if base else None
    cpuinfo = Path("/proc/cpuinfo")
    model_names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                   if line.startswith("model name")] if cpuinfo.exists() else []  # fmt: skip
    machine = {
        "platform": platform.platform(),
        "processor": model_names[0] if model_names else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "samples_timed": samples,
    }
    print(f"\n{machine['device']} ({machine['processor']}, {machine['cpus']} CPUs), torch {machine['torch']}, "
          f"{samples} samples per variant\n")  # fmt: skip
    print("| variant | samples/s | × seed | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['samples_per_s']:.0f} | {r['ratio_vs_seed']} | {r['peak_rss_mb']:.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
