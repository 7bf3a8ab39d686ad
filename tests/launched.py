"""A stand-in stage for tests/test_launch.py: ``python -m tests.launched PLAN READY_DIR``.

Each process marks itself ready (``READY_DIR/<rank>``, which holds the CUDA_VISIBLE_DEVICES it was given), then
acts on PLAN ``action:who`` (who: a rank or ``all``; action: ``error`` a PipelineError, ``bug`` an uncaught
exception, ``kill`` SIGKILL itself, ``ok`` exit 0); the other processes wait until they are stopped (60 s at most).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError, cli
from pipeline.guard import Stopper


def act(action: str, rank: int, alone: bool) -> None:
    if action == "error":
        raise PipelineError("the params are bad; fix them" if alone else f"rank {rank} has no data; fetch it")
    if action == "bug":
        raise RuntimeError("a bug")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


@cli
def main(argv: list[str] | None = None) -> int:
    plan, ready = (sys.argv[1:] if argv is None else argv)[:2]
    rank = int(os.environ.get("RANK", "0"))
    action, _, who = plan.partition(":")
    with Stopper([]):
        (Path(ready) / str(rank)).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        if who in ("all", str(rank)):
            if action == "ok":
                return 0
            act(action, rank, alone=who == "all")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
