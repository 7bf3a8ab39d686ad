"""Measure a recipe's test accuracy over several seeds: ``python -m bench.recipe_check [--recipe fast]``.

Runs the train and evaluate stages (as subprocesses, exactly as DVC would, without
touching the workspace's outputs) once per seed on params.yaml (with ``recipes/<name>.yaml``
laid over it for ``--recipe``) with ``train.seed`` replaced, then prints one row per seed
and the mean. ``--set train.epochs=5`` overrides any other key. Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import evaluate, train
from pipeline.errors import PipelineError, cli
from pipeline.files import write_json
from pipeline.params import Params, as_dict, assignment, load_params, read_yaml, save_params, with_changes

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="base params file (default: %(default)s)")
    p.add_argument("--data", default=str(ROOT / "data" / "raw"), help="IDX folder (default: %(default)s)")
    p.add_argument("--recipe", default=None, help="lay recipes/RECIPE.yaml over the params (e.g. fast, beyond)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default: 0 1 2)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a param")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def recipe_layer(name: str) -> dict[str, Any]:
    path = ROOT / "recipes" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")))
        raise PipelineError(f"recipe {name!r} not found in recipes/; known: {known}")
    return read_yaml(path)


def stage(cmd: list[str], what: str) -> None:
    """Run one stage; its own output shows, and a failure ends the check in one line."""
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise PipelineError(f"the {what} failed (its error is above); nothing was written")


def train_one_seed(params: Params, data: Path, tmp: Path) -> dict[str, Any]:
    """Train and evaluate ``params`` under ``tmp``; the seed's row."""
    out = tmp / str(params.train.seed)
    save_params(params, out / "params.yaml")
    t0 = time.perf_counter()
    stage(train.command(out / "params.yaml", train.Paths.under(out, data)), f"train stage (seed {params.train.seed})")
    train_s = time.perf_counter() - t0
    stage(evaluate.command(out / "params.yaml", data, out / "models", out / "test.json", out / "eval"), "evaluation")
    test = json.loads((out / "test.json").read_text())
    model = json.loads((out / "models" / "model.json").read_text())
    return {"seed": params.train.seed, "test_accuracy": test["test"]["accuracy"],
            "best_val_accuracy": model["best_val_accuracy"], "train_wall_s": round(train_s, 1)}  # fmt: skip


@cli
def main() -> int:
    args = parse_args()
    layers = ([recipe_layer(args.recipe)] if args.recipe else []) + [assignment(item) for item in args.set]
    base = load_params(args.params, *layers)  # a bad recipe or override stops here, before any training
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows.append(train_one_seed(with_changes(base, {"train": {"seed": seed}}), Path(args.data), Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    accs = [r["test_accuracy"] for r in rows]
    summary = {
        "recipe": args.recipe or "default",
        "overrides": args.set,
        "params": {k: v for k, v in as_dict(base).items() if k != "download"},  # train.seed: see each run
        "runs": rows,
        "mean_test_accuracy": round(statistics.mean(accs), 5),
        "stdev_test_accuracy": round(statistics.stdev(accs), 5) if len(accs) > 1 else 0.0,
        "torch": torch.__version__,
    }
    print(f"mean test accuracy {summary['mean_test_accuracy']:.4f} ± {summary['stdev_test_accuracy']:.4f} "
          f"over seeds {args.seeds}")  # fmt: skip
    if args.out:
        write_json(args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
