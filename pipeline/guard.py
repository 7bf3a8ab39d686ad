"""The train stage's guard: no trainer outlives its launcher.

:class:`Stopper` turns SIGTERM into a one-line :class:`~pipeline.errors.Stopped`, takes one Ctrl-C
  (the terminal's and a launcher's copy of the same interrupt arrive both), and stops the
  run when the processes it was started by (``dvc``, the shell ``dvc`` ran, ``accelerate launch``,
  torchrun) are gone, so that no trainer trains on as an orphan.
:func:`held_stops` lets such a stop wait for the end of a block (a checkpoint being written), so that
  what was trained is kept rather than thrown away half-written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

import psutil

from pipeline.errors import DVC_STAGE_VAR, Stopped, launcher_stderr, outlive_launcher

# set by a launcher in the processes it starts: torchrun's elastic agent (also under accelerate launch's
# multi-process launcher), accelerate's one-process launcher, SLURM's srun, Open MPI's and MPICH's mpirun
LAUNCHER_VARS = (
    "TORCHELASTIC_RUN_ID",
    "LOCAL_RANK",
    "ACCELERATE_MIXED_PRECISION",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
)


class _Held:
    """The stop that came while :func:`held_stops` was open (signals are per process; blocks do not nest)."""

    open = False
    pending: BaseException | None = None


@contextmanager
def held_stops() -> Iterator[None]:
    """Hold a SIGTERM, a Ctrl-C or a gone launcher that arrives inside the block until the block ends."""
    _Held.open = True
    try:
        yield
    finally:
        _Held.open, pending, _Held.pending = False, _Held.pending, None
    if pending is not None:  # the block ended well; had it failed, its own error says more than the stop
        raise pending


def _stop(exc: BaseException) -> None:
    if not _Held.open:
        raise exc
    _Held.pending = _Held.pending or exc


def _is_gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.name()} (pid {proc.pid})"
    except psutil.Error:
        return f"pid {proc.pid}"


def starters(env: Mapping[str, str] | None = None) -> list[psutil.Process]:
    """The processes whose death must stop this one, nearest first.

    Under ``dvc repro`` / ``dvc exp run`` (DVC_STAGE set): every ancestor up to and including
    ``dvc`` itself, the first one outside the stage's environment. Under a launcher alone: the
    launcher. Run by hand (``python -m pipeline.train``): none, so ``nohup`` keeps working.
    """
    env = os.environ if env is None else env
    me = psutil.Process()
    if env.get(DVC_STAGE_VAR):
        chain = []
        for parent in me.parents():
            chain.append(parent)
            try:
                if DVC_STAGE_VAR not in parent.environ():
                    break
            except psutil.Error:
                break
        return chain
    if any(env.get(v) for v in LAUNCHER_VARS):
        parent = me.parent()
        return [parent] if parent is not None else []
    return []


class Stopper:
    """Raise :class:`Stopped` in the main thread on SIGTERM, or when a starter process is gone.

    The first SIGINT raises KeyboardInterrupt and later ones are ignored, so that the copies of one Ctrl-C
    (from the terminal, and forwarded by the launcher) cannot break into the unwinding of the first.
    Use as a context manager around the run; it restores the previous handlers on exit (SIGINT's only
    when there was no interrupt).
    """

    def __init__(self, watch: list[psutil.Process], poll_s: float = 1.0, grace_s: float = 30.0) -> None:
        self.watch, self.poll_s, self.grace_s = watch, poll_s, grace_s
        self.names = {p.pid: _describe(p) for p in watch}  # while they are alive to be asked
        self._stderr = launcher_stderr() if watch else None  # where to say the stop line if the launcher dies
        self.reason = ""
        self._done = threading.Event()
        self._previous: dict[int, Any] = {}
        self._interrupted = False

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
                signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint),
            }
        if self.watch:
            threading.Thread(target=self._watch, name="starter-watch", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._stderr is not None:
            os.close(self._stderr)
        for signum, handler in self._previous.items():
            if not (signum == signal.SIGINT and self._interrupted):
                signal.signal(signum, handler)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(KeyboardInterrupt())

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        reason = self.reason or "stopped by SIGTERM"
        _stop(Stopped(f"{reason}; run it again to resume from the newest checkpoint"))

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            gone = next((p for p in self.watch if _is_gone(p)), None)
            if gone is None:
                continue
            self.reason = f"{self.names[gone.pid]}, which started this run, has exited: stopping, not training on alone"
            outlive_launcher(gone.pid, self._stderr)
            os.kill(os.getpid(), signal.SIGTERM)
            if not self._done.wait(self.grace_s):  # the main thread is stuck in C code (a collective)
                print(f"error: {self.reason} (forced after {self.grace_s:g}s)", file=sys.stderr, flush=True)
                os._exit(Stopped.exit_code)
            return
