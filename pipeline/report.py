"""What a stage prints: lines from the global main process only, and the summary at its end."""

from __future__ import annotations

from accelerate import Accelerator


def print_once(accelerator: Accelerator, message: str) -> None:
    """Print on the global main process only (``accelerator.print`` prints once per machine)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def summary_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns under a title, for the end of a stage."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(["summary"] + [f"  {k.ljust(width)}  {v}" for k, v in rows])
