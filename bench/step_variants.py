"""The tutorial CNN's training step under variants the default does not use: ``python -m bench.step_variants``.

Each variant runs the train stage's own step (:func:`pipeline.recipe.step.train_step`, through
``bench.profile_step.stage_step``) at the default recipe, in fp32 or under bf16 autocast, on random uint8 images:

- ``base``: the step as the default recipe runs it;
- ``inplace``: every ReLU in place (no new tensor for its output);
- ``pool_first``: each ReLU that comes just before a max-pool moved after it. ReLU and max commute, so
  this is the same function with the same gradients (``tests/test_step_variants.py`` checks it bitwise),
  on a quarter of the elements;
- ``compile`` and ``compile_max_autotune``: ``torch.compile`` in its default mode and in
  ``max-autotune-no-cudagraphs``.

Every variant has its own model and optimizer; each round runs ``--steps`` steps of every variant in
turn, so a slow spell of a shared host hits them all. Rows give the median samples/s of the rounds and
the median of the per-round ratios to ``base``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from bench.bench_stage import recipe_params
from bench.profile_step import random_split, stage_step
from pipeline.files import write_json
from pipeline.model import ModelConfig, build_model
from pipeline.provenance import cpu_model
from pipeline.recipe.sampling import rank_batches

VARIANTS = ("base", "inplace", "pool_first", "compile", "compile_max_autotune")
COMPILE_MODES = {"compile": None, "compile_max_autotune": "max-autotune-no-cudagraphs"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="(default: all)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant per round (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def pool_first(features: nn.Sequential) -> nn.Sequential:
    """``features`` with every ``ReLU, MaxPool2d`` pair swapped: relu(max(x)) == max(relu(x)), gradients too."""
    layers = list(features)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], nn.MaxPool2d):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return nn.Sequential(*layers)


def variant_model(variant: str) -> nn.Module:
    """The tutorial CNN as ``variant`` changes it (compilation aside), seeded alike for every variant."""
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    if variant == "pool_first":
        assert isinstance(model.features, nn.Sequential)
        model.features = pool_first(model.features)
    if variant == "inplace":
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = True
    return model.to(memory_format=torch.channels_last)


def make_step(variant: str, bf16: bool, batch: int) -> Callable[[int], None]:
    """One training step of ``variant`` on the ``k``-th batch of a fixed random uint8 set."""
    model = variant_model(variant)
    if variant in COMPILE_MODES:
        model = torch.compile(model, mode=COMPILE_MODES[variant])  # type: ignore[assignment]
    cfg = replace(recipe_params("default").train, batch_size=batch)
    data = random_split(16 * batch)
    batches = list(rank_batches(len(data), batch_size=batch, seed=0, epoch=0))
    step = stage_step(data, cfg, bf16, model)
    return lambda k: step(batches[k % len(batches)])


def measure(variants: list[str], bf16: bool, batch: int, rounds: int, steps: int) -> dict[str, dict]:
    """Samples/s of each variant, ``rounds`` interleaved rounds of ``steps`` steps, after 10 warm-up steps."""
    stepper = {v: make_step(v, bf16, batch) for v in variants}
    warm = {}
    for v, step in stepper.items():
        t0 = time.perf_counter()
        for k in range(10):
            step(k)
        warm[v] = round(time.perf_counter() - t0, 2)  # compile variants pay their compile here
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, step in stepper.items():
            t0 = time.perf_counter()
            for k in range(steps):
                step(k)
            rates[v].append(round(steps * batch / (time.perf_counter() - t0), 1))
    rows = {}
    for v in variants:
        row = {"samples_per_s": statistics.median(rates[v]), "rounds": rates[v], "warmup_s": warm[v]}
        if "base" in rates:
            row["vs_base"] = round(statistics.median(a / b for a, b in zip(rates[v], rates["base"], strict=True)), 3)
        rows[v] = row
    return rows


def main() -> int:
    args = parse_args()
    report = {
        "machine": {"processor": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "batch": args.batch, "rounds": args.rounds, "steps": args.steps,
    }  # fmt: skip
    for precision in args.precisions:
        rows = measure(args.variants, precision == "bf16", args.batch, args.rounds, args.steps)
        report[precision] = rows
        for v, row in rows.items():
            ratio = f"  x{row['vs_base']} of base" if "vs_base" in row else ""
            print(f"{precision} {v:22s} {row['samples_per_s']:8,.0f} samples/s{ratio}", flush=True)
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
