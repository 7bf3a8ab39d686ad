"""Where a training step's time goes: ``python -m bench.profile_step [--steps 60] [--out benchmarks/profile.json]``.

Three measurements on the same machine, in one process:

1. **The seed tutorial's loop** (PIL + ``ToTensor`` DataLoader, batch 32, 2 workers): the time
   the loop waits for the next batch (data) against the time of forward + backward + step
   (compute), per sample. The data share bounds what any data-path fix can gain:
   at most ``1 / (1 - data share)``.
2. **This pipeline's step** at the default recipe (and under bf16): ``torch.profiler`` over
   ``--steps`` steps, the top operators by self CPU time, grouped into convolution,
   matmul, optimizer and data path.
3. **A compute ceiling**: the floating-point work of one training sample (forward + backward,
   counted by ``torch.utils.flop_counter``) against the rate of a large dense matmul on this
   machine in fp32 and bf16. ``ceiling_samples_per_s`` is what the step would reach if every
   FLOP ran as fast as that matmul. Beside it, the rate each of the CNN's convolutions
   actually runs at inside the step (forward and backward, from the profiler's per-shape times);
   ``--batches 64 256 1024`` repeats that at other batch sizes (the same number of samples each).

This is what bounds the CPU speed-up: see the README's Performance section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from bench.bench_stage import recipe_params
from bench.seed_loop import Net, seed_datasets, seed_step
from pipeline.dataset import Split, load_split
from pipeline.files import write_json
from pipeline.model import ModelConfig, build_model
from pipeline.params import TrainParams
from pipeline.recipe.optim import make_learner
from pipeline.recipe.sampling import Batch, rank_batches
from pipeline.recipe.step import train_step

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "raw"), help="IDX folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="steps profiled per measurement (default: %(default)s)")
    p.add_argument("--batches", type=int, nargs="*", default=[], help="also the convolution rates at these batches")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def seed_loop_split(data: Path, steps: int) -> dict:
    """Per-sample data wait vs compute of the tutorial's loop (its CNN, Adam 1e-3, batch 32)."""
    from torch.utils.data import DataLoader, Subset

    with seed_datasets(data) as (trainset, _):
        loader = DataLoader(Subset(trainset, range((steps + 20) * 32)), batch_size=32, shuffle=True, num_workers=2)
        torch.manual_seed(0)
        net = Net()
        optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
        wait = compute = 0.0
        it = iter(loader)
        for i in range(steps + 20):
            t0 = time.perf_counter()
            inputs, labels = next(it)
            t1 = time.perf_counter()
            seed_step(net, optimizer, inputs, labels)
            t2 = time.perf_counter()
            if i >= 20:  # after the workers' start-up
                wait, compute = wait + t1 - t0, compute + t2 - t1
    n = steps * 32
    return {
        "data_us_per_sample": round(1e6 * wait / n, 1),
        "compute_us_per_sample": round(1e6 * compute / n, 1),
        "data_share": round(wait / (wait + compute), 3),
        "max_gain_from_data_path": round((wait + compute) / compute, 2),
    }


GROUPS = {
    "convolution": ("conv", "mkldnn_convolution", "convolution"),
    "matmul (linear)": ("addmm", "mm", "linear"),
    "optimizer": ("adam", "foreach", "_fused", "lerp", "addcdiv", "sqrt"),
    "pooling / relu": ("max_pool", "relu", "threshold"),
    "data path (index, flip, float)": ("index", "where", "flip", "div", "to_copy", "copy_", "unsqueeze"),
}


def stage_step(
    data: Split, cfg: TrainParams, bf16: bool = False, model: nn.Module | None = None
) -> Callable[[Batch], None]:
    """The train stage's own step (:func:`~pipeline.recipe.step.train_step`) on ``data`` with ``cfg``, on one CPU
    process: the default recipe's model (or ``model``) and learner, seeded alike for every caller; under bf16
    autocast with ``bf16``."""
    torch.manual_seed(0)
    model = build_model(ModelConfig()) if model is None else model
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    learner = make_learner(model, cfg, total_steps=10**6)

    def step(batch: Batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            train_step(learner, data, batch, cfg)

    return step


def pipeline_profile(data: Path, steps: int, bf16: bool) -> dict:
    """torch.profiler over ``steps`` steps of the train stage's step at the default recipe."""
    from torch.profiler import ProfilerActivity, profile

    cfg = recipe_params("default").train
    train = load_split(data, "train")
    batches = list(rank_batches(len(train), batch_size=cfg.batch_size, seed=0, epoch=0))[: steps + 10]
    step = stage_step(train, cfg, bf16)
    for b in batches[:10]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for b in batches[10:]:
            step(b)
        wall = time.perf_counter() - t0
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events)
    groups = {g: 0.0 for g in GROUPS}
    for key, t in events:
        for g, words in GROUPS.items():
            if any(w in key.lower() for w in words):
                groups[g] += t
                break
    top = sorted(events, key=lambda e: -e[1])[:10]
    return {
        "samples_per_s_profiled": round(steps * cfg.batch_size / wall, 1),
        "share_by_group": {g: round(t / total, 3) for g, t in groups.items()},
        "top_ops": [{"op": k, "share": round(t / total, 3)} for k, t in top],
    }


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 20) -> float:
    """Rate of a large square matmul: close to the best this machine's BLAS/oneDNN does."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def compute_ceiling(seed_samples_per_s: float) -> dict:
    """FLOPs per training sample against this machine's dense-matmul rate, and what 8x the seed loop needs."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(ModelConfig())
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    flops = counter.get_total_flops() / 128
    needed = 8 * seed_samples_per_s
    report: dict = {
        "mflop_per_sample": round(flops / 1e6, 2),
        "seed_loop_samples_per_s": round(seed_samples_per_s, 1),
        "samples_per_s_for_8x_seed": round(needed, 1),
        "gflops_needed_for_8x_seed": round(needed * flops / 1e9, 1),
    }
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = matmul_gflops(dtype)
        report[f"matmul_gflops_{name}"] = round(rate, 1)
        report[f"ceiling_samples_per_s_{name}"] = round(rate * 1e9 / flops, 1)
    return report


def random_split(n: int, seed: int = 0) -> Split:
    """``n`` random uint8 images with random labels: the step's cost does not depend on the pixels."""
    gen = torch.Generator().manual_seed(seed)
    return Split(
        torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    )


def conv_rates(steps: int, batch: int = 128) -> dict:
    """Time and GFLOP/s of each convolution of the tutorial CNN inside the train stage's fp32 step (channels_last),
    forward and backward, and the whole step's time per sample."""
    from torch.profiler import ProfilerActivity, profile

    cfg = replace(recipe_params("default").train, batch_size=batch)
    data = random_split(16 * batch)
    batches = list(rank_batches(len(data), batch_size=batch, seed=0, epoch=0))
    step = stage_step(data, cfg)
    for k in range(10):
        step(batches[k % len(batches)])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for k in range(steps):
            step(batches[k % len(batches)])
        wall = time.perf_counter() - t0
    layers: dict[tuple, dict] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::mkldnn_convolution":
            (n, c_in, h, w), weight, kind = e.input_shapes[0], e.input_shapes[1], "forward"
        elif e.key == "aten::convolution_backward":
            (n, c_in, h, w), weight, kind = e.input_shapes[1], e.input_shapes[2], "backward"
        else:
            continue
        c_out, _, kh, kw = weight
        macs = n * c_out * (h - kh + 1) * (w - kw + 1) * c_in * kh * kw  # stride 1, no padding (the tutorial CNN)
        # backward computes the weight gradient, and the input gradient except for the first layer (its input is data)
        passes = 1 if kind == "forward" or (h, w) == (28, 28) else 2
        ms = e.cpu_time_total / e.count / 1e3
        row = layers.setdefault(tuple(weight), {"layer": f"{c_in}->{c_out} {kh}x{kw} on {h}x{w}"})
        row[f"{kind}_ms"] = round(ms, 3)
        row[f"{kind}_gflops"] = round(2 * macs * passes / (ms / 1e3) / 1e9, 1)
    return {"batch": batch, "step_us_per_sample": round(1e6 * wall / steps / batch, 1), "layers": list(layers.values())}


def main() -> int:
    args = parse_args()
    data = Path(args.data)
    if not (data / "train-images-idx3-ubyte").is_file():
        print(f"error: no IDX files in {data}; run `dvc repro download`", file=sys.stderr)
        return 1
    torch.set_num_threads(torch.get_num_threads())
    seed = seed_loop_split(data, args.steps)
    report = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seed_loop": seed,
        "pipeline_fp32": pipeline_profile(data, args.steps, bf16=False),
        "pipeline_bf16": pipeline_profile(data, args.steps, bf16=True),
        "compute_ceiling": compute_ceiling(1e6 / (seed["data_us_per_sample"] + seed["compute_us_per_sample"])),
        "conv_rates_fp32": conv_rates(args.steps),
        "conv_rates_fp32_other_batches": [conv_rates(max(5, args.steps * 128 // b), b) for b in args.batches],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
