"""A stand-in run for tests/test_gpus.py: ``python -m tests.gpu_holder NAME NEED EVENTS``.

It takes NEED of the GPUs ``PIPELINE_GPUS`` names, as pipeline.launch does (waiting, or failing under
``PIPELINE_GPU_WAIT=0``), appends ``NAME took 0,1`` to the file EVENTS, holds them until a file ``release-NAME``
appears beside EVENTS (60 s at most), appends ``NAME released 0,1`` and ends, which frees them.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

from pipeline import gpus
from pipeline.errors import cli


def note(events: Path, line: str) -> None:
    with events.open("a") as f:  # one short write in append mode: the lines of several runs never mix
        f.write(f"{line}\n")


@cli
def main(argv: list[str] | None = None) -> int:
    name, need, events = (sys.argv[1:] if argv is None else argv)[:3]
    release = Path(events).parent / f"release-{name}"
    pool = gpus.pool(os.environ, [])
    say = functools.partial(print, flush=True)
    with gpus.held(pool, int(need), gpus.lock_folder(os.environ), gpus.waits(os.environ), say, poll=0.05) as taken:
        note(Path(events), f"{name} took {','.join(taken)}")
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        note(Path(events), f"{name} released {','.join(taken)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
