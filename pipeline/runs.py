"""Run folders: each run's checkpoints in a folder of its own, kept for its resume, and the lock on them all.

Each run (a :class:`~pipeline.provenance.RunKey`: code, data, training params, process count) has its
own folder under the checkpoint folder, named by the key's fingerprint::

    checkpoints/.lock                              held by the one trainer using the folder
    checkpoints/<fingerprint>/run.json             the key, to say later what differs
    checkpoints/<fingerprint>/step-00000421/       one checkpoint (pipeline/checkpoint.py)

so an interrupted experiment keeps its state while others run, up to ``train.keep_runs`` runs.
:func:`hold_checkpoint_dir` takes an OS file lock on the folder for the run's life: a second trainer on the
same folder is refused in one line, and the OS drops the lock when its holder dies, however it dies, so a
stale lock never blocks anyone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.checkpoint import PREFIX, Checkpoint, Expected, list_checkpoints, resumable
from pipeline.errors import PipelineError, path_problem
from pipeline.files import remove_partial, write_text
from pipeline.provenance import RunKey, first_difference

LOCK_FILE = ".lock"
OWNER_FILE = ".owner.json"
RUN_FILE = "run.json"


def start_run(root: Path, key: RunKey) -> Path:
    """The run folder of ``key`` under ``root``, created with its ``run.json`` if new."""
    run = root / key.fingerprint()
    if not (run / RUN_FILE).is_file():
        write_text(run / RUN_FILE, json.dumps(key.to_json(), indent=1, sort_keys=True))
    return run


def read_run_key(run: Path) -> RunKey | None:
    try:
        return RunKey.from_json(json.loads((run / RUN_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def list_runs(root: Path) -> list[Path]:
    """Run folders under ``root``, least recently saved first."""
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and (p / RUN_FILE).is_file()]
    return sorted(runs, key=lambda p: max((c.stat().st_mtime for c in [p, *list_checkpoints(p)]), default=0.0))


def remove_run(run: Path) -> None:
    shutil.rmtree(run, ignore_errors=True)


def progress(run: Path) -> str:
    """How far the run in ``run`` got, from its newest checkpoint's name."""
    found = list_checkpoints(run)
    return f"saved at global step {int(found[-1].name[len(PREFIX) :])}" if found else "no checkpoint saved"


def _why_not_others(root: Path, run: Path, key: RunKey) -> list[str]:
    others = [p for p in list_runs(root) if p != run]
    if not others:
        return []
    newest = others[-1]
    other_key = read_run_key(newest)
    diff = first_difference(other_key, key) if other_key else "its run.json is unreadable"
    return [
        f"no saved state of this run to resume; the newest other run {newest} ({progress(newest)}) differs in "
        f"{diff}: starting fresh, and keeping that state for its own resume"
    ]


def _prune(root: Path, run: Path, keep_runs: int) -> list[str]:
    others = [p for p in list_runs(root) if p != run]
    notes = []
    for old in others[: max(0, len(others) - (keep_runs - 1))]:
        notes.append(f"removed the resume state of an older run {old} ({progress(old)}; train.keep_runs: {keep_runs})")
        remove_run(old)
    return notes


def open_run(
    root: Path, key: RunKey, expected: Expected, fresh: bool, keep_runs: int
) -> tuple[Path, Checkpoint | None, list[str]]:
    """Set up the run folder of ``key`` under ``root``: (folder, checkpoint to resume or None, lines to print).

    ``fresh`` discards this run's checkpoints. Other runs' state is kept, the oldest removed beyond
    ``keep_runs`` runs in all. When nothing resumes, a line names what differs from the newest other run.
    """
    run = root / key.fingerprint()
    remove_partial(run)
    notes: list[str] = []
    ckpt = None
    if fresh:
        if list_checkpoints(run):
            notes.append(f"--fresh: removing this run's checkpoints in {run}")
        remove_run(run)
    else:
        ckpt, passed_over = resumable(run, expected)
        notes += passed_over
        if ckpt is None and not passed_over:
            notes += _why_not_others(root, run, key)
    start_run(root, key)
    return run, ckpt, notes + _prune(root, run, keep_runs)


@contextmanager
def hold_checkpoint_dir(root: Path) -> Iterator[None]:
    """Hold ``root``'s lock while the block runs; refuse in one line when another trainer holds it, or when
    ``root`` cannot be a folder this user writes (a file or a dangling symlink in the way, no permission)."""
    lock = FileLock(str(root / LOCK_FILE))
    _take(root, lock)
    try:
        yield
    finally:
        (root / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def _take(root: Path, lock: FileLock) -> None:
    """Make ``root``, take its ``lock`` and say who holds it in :data:`OWNER_FILE`, or say in one line why not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise PipelineError(
            f"{root} is in use by another trainer ({_owner(root)}); wait for it to end or stop it, "
            "or give this run another --checkpoint-dir"
        ) from None
    except OSError as e:
        raise PipelineError(f"checkpoint folder: {path_problem(e, 'pass another --checkpoint-dir')}") from None
    try:
        (root / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "started": time.ctime()}))  # fmt: skip
    except OSError as e:  # a folder used before, read-only now: its lock file opens, nothing new can be made
        lock.release()
        raise PipelineError(f"checkpoint folder: {path_problem(e, 'pass another --checkpoint-dir')}") from None


def _owner(root: Path) -> str:
    try:
        info = json.loads((root / OWNER_FILE).read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"
