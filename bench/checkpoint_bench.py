"""Time a full checkpoint save and load of the default model: ``python -m bench.checkpoint_bench``.

Saves model, best weights, AdamW and one-cycle state and the train state the way
training does (atomically, fsync'd), ``--repeat`` times, and prints the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.checkpoint import TrainState, read_checkpoint, save_checkpoint
from pipeline.model import ModelConfig, build_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=20, help="saves to time (default: %(default)s)")
    args = p.parse_args()
    model = build_model(ModelConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(8, 1, 28, 28)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=1000)
    params = sum(p.numel() for p in model.parameters())
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            state = TrainState(fingerprint="bench", global_step=i + 1, history=[{"accuracy/val": 0.9}] * 10)
            t0 = time.perf_counter()
            path = save_checkpoint(Path(tmp), state, model.state_dict(), model.state_dict(), opt.state_dict(),
                                   sched.state_dict(), keep=2)  # fmt: skip
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
