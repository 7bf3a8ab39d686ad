"""One technique at a time on a base recipe: ``python -m bench.ablation [--recipe beyond] [--epochs 4] [--quick]``.

Each row trains the base recipe (``--recipe``, cut to ``--epochs``, with every technique of :data:`TECHNIQUES` off)
on the real train stage at seed 0, with one speed technique added (``base`` adds none), one after the other on this
host; then scores the last checkpoint on the test set (not timed). A technique pays when its row beats ``base``.
Results go to ``--out`` (JSON) and stdout (a Markdown table).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.bench_stage import ROOT, recipe_params, run_recipe
from pipeline.files import write_json, write_text
from pipeline.provenance import cpu_model

# name -> train changes; learning rates for SGD follow the mean-reduced loss (airbench's 11.5 per 1024 samples
# with its summed loss, momentum 0.85, at a batch of 256 is about 0.37)
TECHNIQUES: dict[str, dict[str, Any]] = {
    "base": {},
    "sgd-nesterov": {"optimizer": "sgd_nesterov", "lr": 0.2, "momentum": 0.85, "weight_decay": 5e-4},
    "triangular": {"schedule": "triangular"},
    "bn-bias-lr-x8": {"bn_bias_lr_scale": 8.0},
    "alternate-flip": {"alternate_flip": True},
    "lookahead": {"lookahead": 0.8, "lookahead_every": 5},
    "dirac-init": {"dirac_init": True},
    "whiten-init": {"whiten_init": True},
    "muon": {"optimizer": "muon", "lr": 0.1, "momentum": 0.85, "weight_decay": 5e-4},
}


def techniques_off(recipe: str) -> dict[str, Any]:
    """The train changes that turn every technique of :data:`TECHNIQUES` off in ``recipe`` (params.yaml's values),
    so each row adds its one technique to the same base whether or not the recipe uses it."""
    default = vars(recipe_params("default").train)
    keys = {key for changes in TECHNIQUES.values() for key in changes}
    return {key: default[key] for key in sorted(keys)} | {"lr": vars(recipe_params(recipe).train)["lr"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "raw"), help="IDX folder (default: %(default)s)")
    p.add_argument("--recipe", default="beyond", help="the base recipe in recipes/ (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="the base recipe cut to this many epochs (default: 4)")
    p.add_argument("--only", nargs="+", choices=list(TECHNIQUES), default=list(TECHNIQUES), help="(default: all)")
    p.add_argument("--quick", action="store_true", help="a smoke run on a few hundred images")
    p.add_argument("--out", default=None, help="write the results as JSON here, and the table beside it (.md)")
    return p.parse_args(argv)


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The rows as Markdown: final test accuracy, its difference to ``base``, training time."""
    base = rows.get("base", {}).get("curve", [{}])[-1].get("test_accuracy")
    lines = ["| technique | test accuracy | vs base | training s |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        accuracy = row["curve"][-1]["test_accuracy"]
        delta = f"{100 * (accuracy - base):+.2f} pts" if base is not None and name != "base" else ""
        lines.append(f"| {name} | {100 * accuracy:.2f} % | {delta} | {row['train_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = {}
    for name in args.only:
        changes = {"train": {**techniques_off(args.recipe), "epochs": args.epochs, **TECHNIQUES[name]}}
        rows[name] = run_recipe(Path(args.data), args.recipe, seed=0, quick=args.quick, changes=changes, score_last=1)
        print(
            f"{name}: {100 * rows[name]['curve'][-1]['test_accuracy']:.2f} % in {rows[name]['train_s']} s", flush=True
        )
    report = {"machine": cpu_model(), "recipe": args.recipe, "epochs": args.epochs, "seed": 0, "rows": rows}
    print(table(rows))
    if args.out:
        write_json(args.out, report)
        write_text(Path(args.out).with_suffix(".md"), f"Base: {args.recipe} cut to {args.epochs} epochs, seed 0, "
                   f"{report['machine']}.\n\n{table(rows)}\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
