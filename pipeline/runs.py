"""Run folders: each run's checkpoints in a folder of its own, kept for its resume, each under its own lock.

Each run (a :class:`~pipeline.provenance.RunKey`: code, data, training params, process count) has its
own folder in the checkpoint store, named by the key's fingerprint::

    checkpoints/<fingerprint>/run.json             the key, to say later what differs
    checkpoints/<fingerprint>/.lock                held by the one trainer of this run
    checkpoints/<fingerprint>/step-00000421/       one checkpoint (pipeline/checkpoint.py)

so an interrupted experiment keeps its state while others run, up to ``train.keep_runs`` runs. The store is
shared by every workspace of the repository (:func:`checkpoint_store`): a queued run (``dvc queue start``) or a
``dvc exp run --temp`` trains in a temporary copy of the repository, and its state is kept in the main
workspace's store, so the same experiment run again resumes it. :func:`hold_run` takes an OS file lock on a
run's folder for the run's life: a second trainer of the same run is refused in one line, runs of other keys
train side by side, and the OS drops the lock when its holder dies, however it dies, so a stale lock never
blocks anyone. A run in use is never pruned.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
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
STORE_VAR = "PIPELINE_CHECKPOINT_STORE"  # a checkpoint store to use instead of --checkpoint-dir (a shared disk)
DVC_ROOT_VAR = "DVC_ROOT"  # set by DVC in a stage's environment: the main workspace, also for queued and temp runs


def checkpoint_store(given: Path, cwd: Path, env: Mapping[str, str]) -> tuple[Path, str]:
    """Where the runs' folders live, and a line saying why when it is not ``given`` (``--checkpoint-dir``).

    ``$PIPELINE_CHECKPOINT_STORE`` when set; else, in a DVC temporary workspace (a queued experiment, ``dvc exp
    run --temp``), the main workspace's folder of ``given``'s relative name, so that the state outlives the
    temporary copy; else ``given``.
    """
    if env.get(STORE_VAR):
        return Path(env[STORE_VAR]), f"checkpoints in {env[STORE_VAR]} (${STORE_VAR})"
    main = env.get(DVC_ROOT_VAR)
    if main and not given.is_absolute() and Path(main).resolve() != cwd.resolve():
        store = Path(main) / given
        return store, f"checkpoints in the main workspace's {store} (this is a DVC temporary workspace)"
    return given, ""


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
    others = [p for p in list_runs(root) if p != run and not in_use(p)]
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
        for path in list_checkpoints(run):  # not the folder: its lock is held
            shutil.rmtree(path, ignore_errors=True)
    else:
        ckpt, passed_over = resumable(run, expected)
        notes += passed_over
        if ckpt is None and not passed_over:
            notes += _why_not_others(root, run, key)
    start_run(root, key)
    return run, ckpt, notes + _prune(root, run, keep_runs)


def in_use(run: Path) -> bool:
    """Whether a live trainer holds the run folder ``run``."""
    lock = FileLock(str(run / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


@contextmanager
def hold_run(root: Path) -> Iterator[None]:
    """Hold the run folder ``root``'s lock while the block runs; refuse in one line when another trainer holds
    it, or when ``root`` cannot be a folder this user writes (a file or a dangling symlink in the way, no
    permission)."""
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
            f"this run ({root}) is being trained by another trainer ({_owner(root)}); wait for it to end or stop "
            "it (it keeps its checkpoints: a run of the same experiment resumes them)"
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
