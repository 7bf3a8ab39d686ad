"""A process that stops making progress ends the run, in one line that names it.

Every collective of the group waits at most the stall timeout (``PIPELINE_STALL_TIMEOUT`` seconds, 90 by
default; :func:`stall_timeout`). Meanwhile each process beats into the group's rendezvous store from a thread
(:class:`Heartbeat`): the time, how far its training got, its host and pid. A stopped process (SIGSTOP, a frozen
node) falls silent; one stuck before its step's all-reduce keeps beating but stays behind. When a gloo collective
times out, the processes that waited read the beats and name the ones that stopped (:meth:`Heartbeat.stalled`); a
stopped process on the same host is killed, so the group ends now rather than after the launcher's grace period.
On GPUs, NCCL's own watchdog aborts a process whose collective waits past the same timeout: the group still ends
then, and the launcher names the rank that aborted.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psutil

from pipeline.errors import PipelineError

STALL_VAR = "PIPELINE_STALL_TIMEOUT"
DEFAULT_STALL_S = 90.0
BEAT_S = 2.0  # seconds between beats; a process silent for 3 beats has stopped
KEY = "pipeline/heartbeat/{rank}"
# how a collective says it waited past the group's timeout (gloo); NCCL's watchdog aborts the process instead
TIMED_OUT = ("Timed out waiting", "timed out", "Timeout")


class StalledError(PipelineError):
    """A collective waited past the stall timeout; ``blames`` are the ranks that stopped making progress."""

    exit_code = 1

    def __init__(self, message: str, blames: tuple[int, ...]) -> None:
        super().__init__(message)
        self.blames = blames


def stall_timeout(env: Mapping[str, str] | None = None) -> timedelta:
    """How long a collective may wait for the rest of the group: ``PIPELINE_STALL_TIMEOUT`` seconds, or 90."""
    text = (os.environ if env is None else env).get(STALL_VAR, "")
    try:
        seconds = float(text) if text else DEFAULT_STALL_S
    except ValueError:
        seconds = -1.0
    if not 10 <= seconds < 10**7:  # under 10 s, a busy but live process could look silent
        raise PipelineError(f"{STALL_VAR}={text!r} is not a number of seconds from 10 up; unset it for 90")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Beat:
    """One process's last sign of life."""

    rank: int
    time: float
    progress: int
    host: str
    pid: int

    def encode(self) -> str:
        return f"{self.time} {self.progress} {self.host} {self.pid}"

    @classmethod
    def decode(cls, rank: int, text: str) -> Beat:
        t, progress, host, pid = text.split()
        return cls(rank, float(t), int(progress), host, int(pid))


class Heartbeat:
    """Beats this process's progress into the group's store every :data:`BEAT_S` seconds while training runs.

    ``progress`` is a counter the training loop moves on (twice a step: before the forward pass and before the
    backward pass, so a process stuck inside a step is behind one that waits in the step's all-reduce).
    """

    def __init__(self, rank: int, world: int, store: Any) -> None:
        self.rank, self.world, self.store = rank, world, store
        self.progress = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    @classmethod
    def of_group(cls, rank: int, world: int) -> Heartbeat:
        """The heartbeat of this process in the default process group (none to keep with one process)."""
        store = None
        if world > 1:
            import torch.distributed as dist

            store = dist.distributed_c10d._get_default_store()
        return cls(rank, world, store)

    def __enter__(self) -> Heartbeat:
        if self.store is not None:
            self.beat()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def beat(self) -> None:
        beat = Beat(self.rank, time.time(), self.progress, socket.gethostname(), os.getpid())
        self.store.set(KEY.format(rank=self.rank), beat.encode())

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.beat()
            except Exception:  # the store went with the group's end; nothing left to tell
                return

    def beats(self) -> list[Beat]:
        """Every process's last beat (those never heard from are left out)."""
        keys = [KEY.format(rank=r) for r in range(self.world)]
        found = [(r, k) for r, k in enumerate(keys) if self.store.check([k])]
        return [Beat.decode(r, self.store.get(k).decode()) for r, k in found]

    def stalled(self, error: BaseException, waited: timedelta) -> StalledError | None:
        """The one-line error for a collective that timed out (None for any other error)."""
        if self.store is None or not isinstance(error, RuntimeError) or not any(s in str(error) for s in TIMED_OUT):
            return None
        try:
            beats = self.beats()
        except Exception:
            beats = []
        blamed = blame(beats, time.time(), self.rank)
        for beat in blamed:
            if beat.host == socket.gethostname():
                _kill_if_stopped(beat.pid)  # it would ignore the launcher's SIGTERM for its whole grace period
        who = ", ".join(describe(b, time.time()) for b in blamed) or "no process is behind (a collective hung)"
        return StalledError(
            f"the group waited {waited.total_seconds():.0f} s ({STALL_VAR}) for a process that stopped making "
            f"progress: {who}; run it again to resume from the newest checkpoint",
            tuple(b.rank for b in blamed),
        )


def blame(beats: list[Beat], now: float, me: int) -> list[Beat]:
    """The processes that stopped: silent for 3 beats, or else (all alive) behind the furthest one."""
    silent = [b for b in beats if now - b.time > 3 * BEAT_S and b.rank != me]
    if silent:
        return silent
    furthest = max((b.progress for b in beats), default=0)
    return [b for b in beats if b.progress < furthest]


def describe(beat: Beat, now: float) -> str:
    """A blamed process, in the same words on every process that waited for it (so the launcher says it once)."""
    state = "silent" if now - beat.time > 3 * BEAT_S else "alive but behind"
    return f"rank {beat.rank} (pid {beat.pid} on {beat.host}) {state}"


def _kill_if_stopped(pid: int) -> None:
    """SIGKILL ``pid`` if it is a stopped process (SIGSTOP, a debugger): never a running one that shares the pid."""
    try:
        if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
            os.kill(pid, signal.SIGKILL)
    except (psutil.Error, OSError):
        pass
