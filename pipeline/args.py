"""Command-line arguments the stages share: paths, the params file, CPU threads."""

from __future__ import annotations

import argparse

from pipeline.accelerator import CPU_THREADS_VAR, env_count


def add_path_args(p: argparse.ArgumentParser, paths: dict[str, tuple[str, str]]) -> None:
    """One ``--flag PATH`` argument per entry of ``paths`` (flag -> (default, what it holds))."""
    for flag, (default, what) in paths.items():
        p.add_argument(flag, default=default, help=f"{what} (default: %(default)s)")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The arguments every stage that runs a model shares: params file, data folder, CPU threads."""
    add_path_args(
        p, {"--params": ("params.yaml", "params file"), "--data": ("data/raw", "folder with the four IDX files")}
    )
    p.add_argument(
        "--cpu-threads",
        type=_thread_count,
        default=env_count(CPU_THREADS_VAR, 0),
        help=f"threads per process when running on CPU; 0 = the host's cores split across its processes and, "
        f"under `dvc queue start -j N`, the N runs side by side (default: ${CPU_THREADS_VAR}, else 0). "
        "Results on CPU are bitwise reproducible for a fixed thread count.",
    )


def _thread_count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no count") from None
