"""Time a full checkpoint save and load of the default model: ``python -m bench.checkpoint_bench``.

Captures and saves model, best weights, AdamW and one-cycle state and the train state the way
training does (atomically, fsync'd), ``--repeat`` times, and prints the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_stage import recipe_params
from bench.profile_step import random_split
from pipeline.checkpoint import TrainState, capture, read_checkpoint, save_checkpoint
from pipeline.model import ModelConfig, build_model
from pipeline.recipe.optim import make_learner
from pipeline.recipe.sampling import rank_batches
from pipeline.recipe.step import train_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=20, help="saves to time (default: %(default)s)")
    args = p.parse_args()
    model = build_model(ModelConfig())
    learner_cfg = recipe_params("default").train
    learner = make_learner(model, learner_cfg, total_steps=1000)  # one step below: AdamW's state exists after it
    data = random_split(128)
    train_step(learner, data, next(rank_batches(len(data), batch_size=128, seed=0, epoch=0)), learner_cfg)
    params = sum(p.numel() for p in model.parameters())
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            state = TrainState(fingerprint="bench", global_step=i + 1, history=[{"accuracy/val": 0.9}] * 10)
            t0 = time.perf_counter()
            path = save_checkpoint(Path(tmp), capture(learner, state, best=None), keep=2)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            read_checkpoint(path)
            loads.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
    print(f"{params} parameters; checkpoint {size / 1e6:.2f} MB; save median {statistics.median(saves) * 1e3:.1f} ms, "
          f"load median {statistics.median(loads) * 1e3:.1f} ms over {args.repeat}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
