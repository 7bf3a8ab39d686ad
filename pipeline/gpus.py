"""One GPU, or one group of GPUs, per run on a shared machine: ``dvc queue start -j N`` on N GPUs runs N at once.

pipeline.launch takes the GPUs its processes will use before it starts them and holds them until they end: one
exclusive OS lock (``flock``) per GPU, on a file in a folder that every run on the machine shares, whatever its
workspace. The OS drops a lock when its holder dies, however it dies, so a killed run never keeps a GPU. A run that
finds too few free GPUs waits, polling, and says once what it waits for.

- ``PIPELINE_GPUS``: the GPUs runs may take (``0,1``, named as ``CUDA_VISIBLE_DEVICES`` names them); by default
  those the launch would use: accelerate's ``gpu_ids`` when it names some, else ``CUDA_VISIBLE_DEVICES``, else
  every GPU torch counts. ``shared``: take none, every run sees them all. On a machine where torch counts no GPU
  the list is taken as given: that is how the tests play a GPU machine on CPU.
- ``PIPELINE_GPU_WAIT=0``: too few free GPUs is a one-line error at once instead of a wait.
- ``PIPELINE_GPU_LOCK_DIR``: the lock folder; by default ``pipeline-gpus`` in the system's temporary folder, one per
  Slurm job under Slurm (which numbers each job's GPUs from 0, so two jobs' "GPU 0" may be two GPUs).

The pure part (which GPUs, the lines) takes the environment as an argument; :func:`held` does the locking.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError, path_problem

POOL_VAR = "PIPELINE_GPUS"
WAIT_VAR = "PIPELINE_GPU_WAIT"
LOCK_DIR_VAR = "PIPELINE_GPU_LOCK_DIR"
VISIBLE_VAR = "CUDA_VISIBLE_DEVICES"
SHARED = "shared"  # PIPELINE_GPUS's value for "take none"
POLL_S = 1.0  # seconds between tries while waiting: a run that ends frees its GPUs within this


def names(text: str) -> list[str]:
    """``"0, 1"`` -> ``["0", "1"]``: GPUs as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def visible(env: Mapping[str, str], count: int, gpu_ids: str | None = None) -> list[str]:
    """The GPUs a launch's processes would see: accelerate's ``gpu_ids`` when it names some, else the first
    ``count`` of ``CUDA_VISIBLE_DEVICES``, else ``0`` to ``count - 1``; none when torch counts ``count`` = 0."""
    if count == 0:
        return []
    if gpu_ids and gpu_ids != "all":
        return names(gpu_ids)
    if VISIBLE_VAR in env:
        return names(env[VISIBLE_VAR])[:count]  # CUDA stops at the first entry it cannot use; torch counts so too
    return [str(i) for i in range(count)]


def pool(env: Mapping[str, str], seen: Sequence[str]) -> list[str]:
    """The GPUs this run may take: those ``PIPELINE_GPUS`` names, each among ``seen`` when torch sees any, else
    ``seen``; empty: take none (``PIPELINE_GPUS=shared``, or no GPU)."""
    text = env.get(POOL_VAR, "").strip()
    if not text:
        return list(seen)
    if text == SHARED:
        return []
    named = names(text)
    if not named or len(set(named)) < len(named):
        why = "names no GPU" if not named else "names a GPU twice"
        raise PipelineError(f"{POOL_VAR}={text!r} {why}; list the GPUs runs may take (0,1), {SHARED}, or unset it")
    unseen = [gpu for gpu in named if seen and gpu not in seen]
    if unseen:
        raise PipelineError(f"{POOL_VAR}={text!r} names GPU {unseen[0]}, which this launch does not see (it sees "
                            f"{','.join(seen)}); name GPUs among those, or unset it")  # fmt: skip
    return named


def in_use(env: Mapping[str, str], count: int) -> list[str]:
    """The GPUs this machine's processes of a run use: one each, the first of those they see (process ``i`` uses
    GPU ``i``; one process without a launcher, the first)."""
    local = int(env.get("LOCAL_WORLD_SIZE") or 1)
    return visible(env, count)[:local]


def waits(env: Mapping[str, str]) -> bool:
    """Whether a run that finds too few free GPUs waits (``PIPELINE_GPU_WAIT``: 1 or unset) or fails (0)."""
    text = env.get(WAIT_VAR) or "1"
    if text not in ("0", "1"):
        raise PipelineError(f"{WAIT_VAR}={text!r} is neither 0 (fail at once when no GPU is free) nor 1 (wait for "
                            "one); set it to one of them, or unset it")  # fmt: skip
    return text == "1"


def lock_folder(env: Mapping[str, str]) -> Path:
    """Where the runs on this machine keep their GPU locks (not in a workspace: each queued run has its own)."""
    if env.get(LOCK_DIR_VAR):
        return Path(env[LOCK_DIR_VAR])
    job = env.get("SLURM_JOB_ID")
    return Path(tempfile.gettempdir()) / (f"pipeline-gpus-slurm-{job}" if job else "pipeline-gpus")


def and_list(items: Sequence[str]) -> str:
    """``0``, ``0 and 1``, ``0, 1 and 2``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def taken_line(taken: Sequence[str], of: Sequence[str]) -> str:
    """What a run says once it holds its GPUs: ``GPU 1 (of 0,1) for this run``."""
    return f"GPU{'s' if len(taken) > 1 else ''} {','.join(taken)} (of {','.join(of)}) for this run"


def busy(need: int, held: Mapping[str, int | None]) -> str:
    """What a run that needs ``need`` GPUs waits for, and who holds the others (``held``: GPU -> holder's pid)."""
    what = "a free GPU" if need == 1 else f"{need} free GPUs"
    verb = "is held by another run" if len(held) == 1 else "are held by other runs"
    pids = list(dict.fromkeys(str(pid) for pid in held.values() if pid is not None))  # a group's holder once
    by = f" (pid{'s' if len(pids) > 1 else ''} {', '.join(pids)})" if pids else ""
    return f"{what}: {and_list(list(held))} {verb}{by}"


def check_fits(pool: Sequence[str], need: int) -> None:
    """Refuse in one line a launch that needs more GPUs than runs may take here, however long it waited."""
    if need > len(pool):
        raise PipelineError(
            f"this launch needs {need} GPUs (one per process on this machine) but only {len(pool)} may be taken "
            f"({','.join(pool)}); launch {len(pool)} or fewer processes (--num_processes, or num_processes in the "
            "accelerate config)"
        )


@contextmanager
def held(
    pool: Sequence[str], need: int, folder: Path, wait: bool, report: Callable[[str], None], poll: float = POLL_S
) -> Iterator[list[str]]:
    """Hold ``need`` GPUs of ``pool`` (the first free ones) while the block runs; yields their names.

    With too few free, waits (``report`` says what for, once) or, unless ``wait``, raises a one-line error.
    """
    check_fits(pool, need)
    said = False
    while True:
        taken, others = _try_take(pool, need, folder)
        if taken:
            break
        if not wait:
            raise PipelineError(f"this run needs {busy(need, others)}; run it once they end, or unset {WAIT_VAR} "
                                "(0 now) to have it wait")  # fmt: skip
        if not said:
            report(f"waiting for {busy(need, others)}")
            said = True
        time.sleep(poll)
    try:
        yield list(taken)
    finally:
        for fd in taken.values():
            os.close(fd)  # drops the lock (as the OS does for a holder that dies)


def _try_take(pool: Sequence[str], need: int, folder: Path) -> tuple[dict[str, int], dict[str, int | None]]:
    """Lock the first ``need`` free GPUs of ``pool``: ({GPU: descriptor}, {}), or ({}, {held GPU: holder's pid}).

    All or none: a run that kept some while it waited for more could wait forever on another that keeps the rest.
    """
    taken: dict[str, int] = {}
    others: list[str] = []
    try:
        _make_folder(folder)
        for gpu in pool:
            if len(taken) == need:
                break
            fd = _try_lock(_lock_file(folder, gpu))
            if fd is None:
                others.append(gpu)
            else:
                taken[gpu] = fd
    except OSError as e:
        for fd in taken.values():
            os.close(fd)
        raise PipelineError(f"GPU locks: {path_problem(e, f'set {LOCK_DIR_VAR} to another folder')}") from None
    if len(taken) == need:
        return taken, {}
    for fd in taken.values():
        os.close(fd)
    return {}, {gpu: _holder(_lock_file(folder, gpu)) for gpu in others}


def _lock_file(folder: Path, gpu: str) -> Path:
    return folder / f"gpu-{gpu.replace('/', '_')}.lock"  # a MIG device's name may hold slashes


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return
    if folder.parent == Path(tempfile.gettempdir()):
        folder.chmod(0o1777)  # as the temporary folder itself: every user's runs share it, none removes another's


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s exclusive lock, the holder's pid written in it; None if it is held."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the runs that wait: who holds it
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def _open_lock(path: Path) -> int:
    """An open descriptor on the lock file ``path``, made readable and writable by every user if it is new.

    No symlink is followed (in a folder every user writes, one could point elsewhere). A new file is made under a
    draft name and linked in whole, mode and all, so no run ever opens it half made; an existing one is opened
    without O_CREAT, which the kernel refuses on another user's file in a sticky folder (fs.protected_regular).
    """
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        pass
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        os.fchmod(fd, 0o666)  # the umask would leave it read-only to other users' runs
        os.link(draft, path)
    except FileExistsError:  # another run made it first: lock theirs
        os.close(fd)
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    finally:
        draft.unlink()
    return fd


def _holder(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
