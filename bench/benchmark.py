"""Speed and time-to-accuracy against the seed tutorial's loop, in one run: ``python -m bench.benchmark [--quick]``.

Each variant runs in its own process, on the same machine; results go to ``--out`` (JSON) and to stdout as
Markdown tables (``bench/bench_report.py``). The parts:

- **throughput**: the seed loop (``bench/seed_loop.py``), the train stage at params.yaml's recipe, and one row per
  speed option (:data:`OPTIONS`); 2 epochs of ``--samples`` images, the second timed, ``--repeats`` rounds of
  every variant in turn, medians, each ratio to the seed loop paired by round;
- **accuracy**: whole recipes (``recipes/*.yaml``) on the full data, the test accuracy after every epoch (not
  timed): training time to each ``--targets`` value, with a *paired* ratio through the throughput row at the
  recipe's settings (:data:`SPEED_ROWS`), since these rows run minutes apart and a shared host drifts;
- **scaling**: 1 and 2 processes, and each model at global batches 64 to 1024 (lr scaled by sqrt of the batch);
- **datapath**: the device data path alone against the step time.

``--report JSON --targets ...`` prints a saved run's tables again for other targets, measuring nothing. The
jobs that drive the train stage are in ``bench/bench_stage.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bench.bench_report import markdown, merge_rounds, retarget, summarise
from bench.bench_stage import QUICK, SCALING, profile_data_path, run_option, run_recipe, run_scaling
from bench.seed_loop import run_tutorial_loop
from pipeline.accelerator import CPU_THREADS_VAR, cpu_threads_for
from pipeline.files import write_json
from pipeline.provenance import cpu_model

ROOT = Path(__file__).resolve().parents[1]

# throughput rows on top of the default recipe: name -> {section: {key: value}}
OPTIONS: dict[str, dict[str, dict]] = {
    "default": {},
    "nchw": {"train": {"channels_last": False}},
    "bf16": {"train": {"mixed_precision": "bf16"}},
    "foreach": {"train": {"optimizer_impl": "foreach"}},
    "fused": {"train": {"optimizer_impl": "fused"}},
    "compile": {"train": {"compile": True}},
    "bf16-b512": {"train": {"mixed_precision": "bf16", "batch_size": 512, "lr": 0.004}},
    "cudnn-benchmark": {"train": {"cudnn_benchmark": True}},  # GPU only
    "quick-bf16": {"model": {"name": "quick_cnn"}, "train": {"mixed_precision": "bf16"}},
    "resnet9-bf16-b256": {"model": {"name": "resnet9"}, "train": {"mixed_precision": "bf16", "batch_size": 256}},
    "quick-resnet9-bf16-b256": {
        "model": {"name": "quick_resnet9"},
        "train": {"mixed_precision": "bf16", "batch_size": 256},
    },
}
GPU_ONLY = {"cudnn-benchmark"}
# the throughput row that trains at each recipe's speed (same model, batch, precision and kernels), for the
# drift-free "paired" time-to-accuracy ratio; tests/test_benchmark.py checks the settings match
SPEED_ROWS = {
    "default": "default",
    "fast": "quick-bf16",
    "two-minute": "quick-resnet9-bf16-b256",
    "beyond": "resnet9-bf16-b256",
}
RECIPES = ("default", "fast", "two-minute", "beyond")
PARTS = ("throughput", "accuracy", "datapath", "scaling")
Part = Literal["throughput", "accuracy", "datapath", "scaling"]


@dataclass(frozen=True)
class Job:
    """One measurement, run in a process of its own: a part, and the variant (``seed``, an option, a recipe)."""

    part: Part
    variant: str
    seed: int = 0  # train.seed
    per_seed: bool = False  # an accuracy row of a run over several seeds: named VARIANT/seedS
    round: int = 0  # throughput rounds run every variant in turn
    batch: int = 0  # an accuracy row of a recipe at this global batch (NAME@bB); 0: the recipe's own

    @property
    def row(self) -> str:
        name = f"{self.variant}@b{self.batch}" if self.batch else self.variant
        return f"{name}/seed{self.seed}" if self.per_seed else name

    def __str__(self) -> str:
        return f"{self.part}:{self.row}" + (f" (round {self.round + 1})" if self.part == "throughput" else "")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


def non_negative(text: str) -> int:
    """An argparse type: an integer >= 0 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


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
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS[:3]),
                   help="what to measure (default: %(default)s)")  # fmt: skip
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS), help="throughput rows")
    p.add_argument(
        "--recipes", nargs="+", choices=RECIPES, default=list(RECIPES), help="time-to-accuracy and data-path rows"
    )
    p.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.91], help="test accuracies to time")
    p.add_argument("--batches", type=int, nargs="+", default=[], help="also time each recipe at these global batches")
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
    p.add_argument("--score-last", type=non_negative, default=0, metavar="N", help="score only the last N epochs "
                   "of each recipe on the test set (default: all; a time to a target the first scored epoch passes "
                   "is an upper bound)")  # fmt: skip
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--report", metavar="JSON", help="measure nothing: print (and with --out write) a saved "
                   "report again, summarised for --targets")  # fmt: skip
    p.add_argument("--job", type=Job.from_json, help=argparse.SUPPRESS)  # internal: run one job in this process
    return p.parse_args()


def peak_memory() -> dict[str, float]:
    """This process's peak RSS and its children's (the train stage), plus peak GPU memory."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"peak_rss_mb": round(max(own, children) / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run_job(job: Job, data: Path, samples: int, quick: bool, score_last: int = 0) -> dict[str, Any]:
    """Measure ``job`` in this process; its row, with this process's peak memory."""
    if job.part == "throughput":
        if job.variant == "seed":
            result = run_tutorial_loop(data, 0, 1, 0, time_only=samples)
        else:
            result = run_option(data, samples, OPTIONS[job.variant], job.seed)
    elif job.part == "accuracy" and job.variant == "seed":
        sizes = (QUICK["train"] + QUICK["val"], QUICK["epochs"], QUICK["test"]) if quick else (0, 10, 0)
        result = run_tutorial_loop(data, *sizes)
    elif job.part == "accuracy":
        result = run_recipe(data, job.variant, job.seed, quick, job.batch, score_last=score_last)
    elif job.part == "scaling":
        result = run_scaling(data, samples, job.variant, job.seed)
    else:
        result = profile_data_path(data, job.variant)
    return {**result, **peak_memory()}


def plan(args: argparse.Namespace) -> list[Job]:
    """Every job the arguments ask for, in the order they run."""
    jobs: list[Job] = []
    if "throughput" in args.parts:
        variants = ["seed"] + [o for o in args.options if torch.cuda.is_available() or o not in GPU_ONLY]
        rounds = 1 if args.quick else args.repeats
        jobs += [Job("throughput", v, args.seeds[0], round=r) for r in range(rounds) for v in variants]
    if "accuracy" in args.parts:
        per_seed = len(args.seeds) > 1
        jobs += [Job("accuracy", "seed")]
        jobs += [Job("accuracy", r, s, per_seed, batch=b) for r in args.recipes for b in [0, *args.batches]
                 for s in args.seeds]  # fmt: skip
    if "datapath" in args.parts:
        jobs += [Job("datapath", r) for r in args.recipes]
    if "scaling" in args.parts:
        jobs += [Job("scaling", v, args.seeds[0]) for v in SCALING]
    return jobs


def machine_info(samples: int) -> dict:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "throughput_samples_per_epoch": samples,
        # threads: the seed loop's (torch's default here) and a 1-process stage's (its share of the cores)
        "seed_loop_threads": torch.get_num_threads(),
        "stage_threads": cpu_threads_for(int(os.environ.get(CPU_THREADS_VAR) or 0), os.cpu_count(), 1),
    }


def report_again(path: Path, targets: list[float], out: str | None) -> int:
    """``--report``: a saved report's tables again, with times to ``targets``; nothing is measured."""
    try:
        report = retarget(json.loads(path.read_text()), targets, SPEED_ROWS)  # a report's own speed rows win
    except (OSError, ValueError) as e:  # json's errors are ValueErrors
        print(f"error: cannot report {path} again: {e}; pass the JSON a benchmark run wrote with --out",
              file=sys.stderr)  # fmt: skip
        return 1
    print(markdown(report))
    if out:
        write_json(out, report)
    return 0


def main() -> int:
    args = parse_args()
    samples = QUICK["throughput"] if args.quick else args.samples
    data = Path(args.data).resolve()
    if args.job:  # a child process: one measurement
        print(json.dumps(run_job(args.job, data, samples, args.quick, args.score_last)))
        return 0
    if args.report:
        return report_again(Path(args.report), args.targets, args.out)
    if not (data / "train-images-idx3-ubyte").is_file():
        print(f"error: no IDX files in {data}; run `dvc repro download`", file=sys.stderr)
        return 1
    results: dict[str, dict] = {part: {} for part in PARTS}
    rounds: dict[str, list[dict]] = {}  # throughput variant -> one result per round
    for job in plan(args):
        cmd = [sys.executable, "-m", "bench.benchmark", "--job", job.to_json(), "--data", str(data),
               "--samples", str(samples), "--score-last", str(args.score_last),
               *(["--quick"] if args.quick else [])]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            print(f"error: {job} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if job.part == "throughput":
            rounds.setdefault(job.variant, []).append(result)
        else:
            results[job.part][job.row] = result
        print(f"{job}: {result}", file=sys.stderr, flush=True)
    results["throughput"] = merge_rounds(rounds)
    report = {**summarise(results, args.targets, SPEED_ROWS), "machine": machine_info(samples)}
    print(markdown(report))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
