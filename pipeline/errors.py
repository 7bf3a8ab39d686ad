"""User-facing errors and the one place that turns them into a one-line exit."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

# Set by pipeline.launch in the processes it starts: the folder that collects each process's error line,
# and the launcher's pid (a process whose parent is no longer that launcher prints its line itself).
ERROR_DIR_VAR = "PIPELINE_ERROR_DIR"
LAUNCHER_PID_VAR = "PIPELINE_LAUNCHER_PID"
ERROR_DIR_PREFIX = "pipeline-launch-"  # the launcher's error folder is a temporary folder of this name
# set by pipeline.launch when its stderr is a terminal: its processes' stderr may be a pipe that it passes on live
TERMINAL_VAR = "PIPELINE_TERMINAL"
DVC_STAGE_VAR = "DVC_STAGE"  # set by DVC in every stage command it runs
# DVC removes a stage's outputs before its command runs; every output is cached (dvc.yaml), and dvc.lock keeps the
# hashes of the last run that succeeded, so this brings that run's outputs back, byte for byte
RESTORE = "`dvc checkout --force` brings back the last good run's outputs"


class PipelineError(Exception):
    """An error the user can fix; its message says what is wrong and what to do."""


class ParamsError(PipelineError):
    """params.yaml holds an unknown key, a wrong type or an out-of-range value."""


class DataError(PipelineError):
    """Input data is missing or does not match what the stage expects."""


class DownloadError(PipelineError):
    """No source could provide a verified file."""


class ModelArtifactError(PipelineError):
    """A model artifact is missing, unknown or inconsistent."""


class DiskFullError(PipelineError):
    """A write ran out of space; nothing partial was left in its place."""


class Stopped(PipelineError):
    """The run was told to stop (SIGTERM, or the process that started it is gone)."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process ended by it
    consequence = True  # of another process's failure, or of the user's stop: a group's launcher tells the cause


# How a collective reports a peer process that died mid-step (gloo on CPU; NCCL aborts the communicator).
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted")


def peer_lost(e: BaseException) -> str | None:
    """The one line for a collective that failed because another process of the group died; None otherwise."""
    if not isinstance(e, RuntimeError) or not any(s in str(e) for s in PEER_LOST):
        return None
    return (
        "another process of this group died mid-step, so this one cannot go on; its own line (or the launcher's) "
        "says why; run it again to resume from the newest checkpoint"
    )


def cli(main: F) -> F:
    """Wrap a stage's ``main``: a PipelineError becomes ``error: ...`` on stderr and exit 2 (143 if stopped), as
    does an OSError about a path (:func:`path_problem`), and Ctrl-C ``error: interrupted`` and exit 130."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> int | None:
        if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:  # from here on, Ctrl-C is caught below
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return main(*args, **kwargs)
        except PipelineError as e:
            told = (str(e), getattr(e, "exit_code", 2), getattr(e, "consequence", False), getattr(e, "blames", ()))
            raise SystemExit(report(*told)) from None
        except KeyboardInterrupt:
            raise SystemExit(report("interrupted", 130)) from None
        except OSError as e:  # a path the user named (or a folder above it) that cannot be read or written
            if e.filename is None:
                raise
            raise SystemExit(report(path_problem(e), 2)) from None
        except RuntimeError as e:
            line = peer_lost(e)
            if line is None:
                raise
            raise SystemExit(report(line, 1, consequence=True)) from None

    return wrapper  # type: ignore[return-value]


# a URL's userinfo: everything between its scheme and the last "@" before the path (a password may hold "@")
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^/\s?#]*)@")


def redact(text: str) -> str:
    """``text`` fit to print: each URL's password as ``***`` (``http://user:***@host/``), a lone user (a token) too."""

    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m[2].partition(":")
        return f"{m[1]}{user + ':***' if colon else '***'}@"

    return _USERINFO.sub(hide, text)


def with_restore_hint(message: str, env: Mapping[str, str] | None = None, lock: Path = Path("dvc.lock")) -> str:
    """``message``, and under DVC how the outputs that DVC removed before the failed command come back: when
    ``lock`` records a run of this stage (a first run, which has none, has nothing to bring back)."""
    env = os.environ if env is None else env
    stage = env.get(DVC_STAGE_VAR)
    if not stage or RESTORE in message:
        return message
    try:
        recorded = f"\n  {stage}:\n" in lock.read_text()  # dvc.lock's `stages:` entry of this stage
    except OSError:
        recorded = False
    return f"{message}; {RESTORE}" if recorded else message


def report(message: str, code: int, consequence: bool = False, blames: tuple[int, ...] = ()) -> int:
    """Say ``error: message`` once, passwords hidden; return ``code``. Under DVC it says how the last good outputs
    come back.

    Under pipeline.launch the line goes to the launcher, which prints one line for the whole group
    (every process of a group usually fails alike, and a ``consequence`` of another's failure is left out
    when that one told its cause; so is the end of a rank the line ``blames``); anywhere else, or once that
    launcher is gone, to stderr.
    """
    message = redact(with_restore_hint(message))
    folder, launcher = os.environ.get(ERROR_DIR_VAR), os.environ.get(LAUNCHER_PID_VAR)
    if folder and launcher == str(os.getppid()):
        entry = {"message": message, "code": code, "consequence": consequence, "time": time.time(),
                 "rank": int(os.environ.get("RANK", "0")),
                 "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "blames": list(blames)}  # fmt: skip
        try:
            (Path(folder) / f"{os.getpid()}.json").write_text(json.dumps(entry))
            return code
        except OSError:
            pass
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def path_problem(e: OSError, instead: str = "name another path") -> str:
    """The one line for an OSError about a path: what is in the way, or what this user may not do, and what to do
    (fix it, or ``instead``, e.g. ``pass another --checkpoint-dir``)."""
    target = Path(os.fsdecode(e.filename2 if e.filename2 is not None else e.filename))
    if e.errno == errno.EISDIR:
        return f"{target} is a folder where a file must be; remove it or {instead}"
    blocker = in_the_way(target) if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.ENOENT, errno.ELOOP) else None
    if blocker is not None and blocker.is_symlink():
        return f"{blocker} is a symlink to {os.readlink(blocker)}, which does not exist; create it or {instead}"
    if blocker is not None:
        return f"{blocker} is a file where a folder must be; remove it or {instead}"
    if e.errno in (errno.EACCES, errno.EPERM):  # on the path, or on the folder it would be made in
        where = next((p for p in [target, *target.parents] if os.path.lexists(p)), target)
        return f"{where}: permission denied for this user; make it writable (and readable), or {instead}"
    if e.errno == errno.EROFS:
        return f"{target} is on a read-only file system; {instead} on a writable one"
    return f"{target}: {e.strerror}; fix that or {instead}"


def in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s folders, from the top, and ``path`` itself that is a file or a dangling symlink."""
    try:
        return next((p for p in [*reversed(path.parents), path] if os.path.lexists(p) and not p.is_dir()), None)
    except OSError:  # a folder above it that this user may not search
        return None


def _interrupted_while_starting(signum: int, frame: object) -> None:
    raise SystemExit(report("interrupted", 130))


def quiet_interrupt_while_starting(argv: list[str]) -> None:
    """Under ``python -m`` (``argv[0]`` is ``-m`` while the module is found) or a ``fashion-*`` console command:
    Ctrl-C before :func:`cli` wraps ``main`` (while ``import torch`` runs, say) is ``error: interrupted`` and exit
    130, not a traceback."""
    started = argv[:1] == ["-m"] or (bool(argv) and Path(argv[0]).name.startswith("fashion-"))
    if started and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def launcher_stderr() -> int | None:
    """A descriptor of the launcher's own stderr, opened while it lives, when this process's stderr is a pipe.

    accelerate's one-process launcher reads its process's stderr through a pipe and passes it on; if the
    launcher is killed, that pipe leads nowhere, and :func:`outlive_launcher` points stderr here instead.
    """
    launcher = os.environ.get(LAUNCHER_PID_VAR)
    try:
        if launcher == str(os.getppid()) and stat.S_ISFIFO(os.fstat(2).st_mode):
            return os.open(f"/proc/{launcher}/fd/2", os.O_WRONLY | os.O_APPEND)
    except OSError:  # not Linux, or the launcher's stderr cannot be opened (a socket): the pipe is all there is
        pass
    return None


def outlive_launcher(gone: int, stderr: int | None) -> None:
    """When the process ``gone``, which is no more, was this process's launcher (killed, so it cannot clean up): say
    what follows on the launcher's ``stderr`` (:func:`launcher_stderr`), and remove the launcher's error folder."""
    if os.environ.get(LAUNCHER_PID_VAR) != str(gone):
        return
    if stderr is not None:
        os.dup2(stderr, 2)  # the same descriptor under sys.stderr: what is printed from here on goes there
    folder = Path(os.environ.get(ERROR_DIR_VAR, ""))
    if folder.name.startswith(ERROR_DIR_PREFIX) and folder.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(folder, ignore_errors=True)
