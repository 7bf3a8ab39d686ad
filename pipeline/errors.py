"""User-facing errors and the one place that turns them into a one-line exit."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

# Set by pipeline.launch in the processes it starts: the folder that collects each process's error line,
# and the launcher's pid (a process whose parent is no longer that launcher prints its line itself).
ERROR_DIR_VAR = "PIPELINE_ERROR_DIR"
LAUNCHER_PID_VAR = "PIPELINE_LAUNCHER_PID"
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
    """Wrap a stage's ``main``: a PipelineError becomes ``error: ...`` on stderr and exit 2 (143 if stopped)."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> int | None:
        try:
            return main(*args, **kwargs)
        except PipelineError as e:
            raise SystemExit(report(str(e), getattr(e, "exit_code", 2), getattr(e, "consequence", False))) from None
        except KeyboardInterrupt:
            raise SystemExit(report("interrupted", 130)) from None
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


def with_restore_hint(message: str, env: Mapping[str, str] | None = None) -> str:
    """``message``, and under DVC how the outputs that DVC removed before the failed command come back."""
    env = os.environ if env is None else env
    return f"{message}; {RESTORE}" if env.get(DVC_STAGE_VAR) and RESTORE not in message else message


def report(message: str, code: int, consequence: bool = False) -> int:
    """Say ``error: message`` once, passwords hidden; return ``code``. Under DVC it says how the last good outputs
    come back.

    Under pipeline.launch the line goes to the launcher, which prints one line for the whole group
    (every process of a group usually fails alike, and a ``consequence`` of another's failure is left out
    when that one told its cause); anywhere else, or once that launcher is gone, to stderr.
    """
    message = redact(with_restore_hint(message))
    folder, launcher = os.environ.get(ERROR_DIR_VAR), os.environ.get(LAUNCHER_PID_VAR)
    if folder and launcher == str(os.getppid()):
        entry = {"message": message, "code": code, "consequence": consequence, "time": time.time(),
                 "rank": int(os.environ.get("RANK", "0")),
                 "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}  # fmt: skip
        try:
            (Path(folder) / f"{os.getpid()}.json").write_text(json.dumps(entry))
            return code
        except OSError:
            pass
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
