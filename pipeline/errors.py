"""User-facing errors and the one place that turns them into a one-line exit."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

# Set by pipeline.launch in the processes it starts: the folder that collects each process's error line,
# and the launcher's pid (a process whose parent is no longer that launcher prints its line itself).
ERROR_DIR_VAR = "PIPELINE_ERROR_DIR"
LAUNCHER_PID_VAR = "PIPELINE_LAUNCHER_PID"


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


def cli(main: F) -> F:
    """Wrap a stage's ``main``: a PipelineError becomes ``error: ...`` on stderr and exit 2 (143 if stopped)."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> int | None:
        try:
            return main(*args, **kwargs)
        except PipelineError as e:
            raise SystemExit(report(str(e), getattr(e, "exit_code", 2))) from None
        except KeyboardInterrupt:
            raise SystemExit(report("interrupted", 130)) from None

    return wrapper  # type: ignore[return-value]


def report(message: str, code: int) -> int:
    """Say ``error: message`` once; return ``code``.

    Under pipeline.launch the line goes to the launcher, which prints one line for the whole group
    (every process of a group usually fails alike); anywhere else, or once that launcher is gone, to stderr.
    """
    folder, launcher = os.environ.get(ERROR_DIR_VAR), os.environ.get(LAUNCHER_PID_VAR)
    if folder and launcher == str(os.getppid()):
        entry = {"message": message, "code": code, "rank": int(os.environ.get("RANK", "0")), "time": time.time()}
        try:
            (Path(folder) / f"{os.getpid()}.json").write_text(json.dumps(entry))
            return code
        except OSError:
            pass
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
