"""User-facing errors and the one place that turns them into a one-line exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


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
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(getattr(e, "exit_code", 2)) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
