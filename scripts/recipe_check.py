"""Measure a recipe's test accuracy over several seeds: ``python -m scripts.recipe_check [--recipe fast]``.

Runs the train and evaluate stages (as subprocesses, exactly as DVC would, without
touching the workspace's outputs) once per seed on params.yaml (with ``recipes/<name>.yaml``
merged on top for ``--recipe``) with ``train.seed`` replaced, then prints one row per seed
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

import yaml

from pipeline.errors import cli
from pipeline.params import load_params, with_overrides
from pipeline.train import Paths, command

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="base params file (default: %(default)s)")
    p.add_argument("--data", default=str(ROOT / "data" / "raw"), help="IDX folder (default: %(default)s)")
    p.add_argument("--recipe", default=None, help="merge recipes/RECIPE.yaml over the params (e.g. fast, beyond)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default: 0 1 2)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a param")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


@cli
def main() -> int:
    args = parse_args()
    base = yaml.safe_load(Path(args.params).read_text())
    if args.recipe:
        base = with_overrides(base, yaml.safe_load((ROOT / "recipes" / f"{args.recipe}.yaml").read_text()))
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        base = with_overrides(base, {section: {name: yaml.safe_load(value)}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base["train"]["seed"] = seed
            params = Path(tmp) / f"params-{seed}.yaml"
            params.write_text(yaml.safe_dump(base))
            load_params(params)  # fail fast on a bad override
            out = Path(tmp) / str(seed)
            t0 = time.perf_counter()
            subprocess.run(command(params, Paths.under(out, Path(args.data))), cwd=ROOT, check=True)
            train_s = time.perf_counter() - t0
            subprocess.run(
                [sys.executable, "-m", "pipeline.evaluate", "--params", str(params), "--data", args.data,
                 "--model-dir", str(out / "models"), "--out", str(out / "test.json"),
                 "--eval-dir", str(out / "eval")],
                cwd=ROOT, check=True,
            )  # fmt: skip
            test = json.loads((out / "test.json").read_text())
            live = json.loads((out / "live" / "metrics.json").read_text())
            rows.append(
                {"seed": seed, "test_accuracy": test["accuracy"], "best_val_accuracy": live["best_val_accuracy"],
                 "train_wall_s": round(train_s, 1)}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    accs = [r["test_accuracy"] for r in rows]
    summary = {
        "recipe": args.recipe or "default",
        "overrides": args.set,
        "params": {k: v for k, v in base.items() if k != "download"},  # as run (train.seed: the last one)
        "runs": rows,
        "mean_test_accuracy": round(statistics.mean(accs), 5),
        "stdev_test_accuracy": round(statistics.stdev(accs), 5) if len(accs) > 1 else 0.0,
        "torch": __import__("torch").__version__,
    }
    print(f"mean test accuracy {summary['mean_test_accuracy']:.4f} ± {summary['stdev_test_accuracy']:.4f} "
          f"over seeds {args.seeds}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
