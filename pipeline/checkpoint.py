"""Training checkpoints: full state, written atomically, found again after a kill.

A checkpoint is a folder ``checkpoints/step-00000421/`` holding

- ``model.safetensors`` and ``best.safetensors``: current and best-by-validation weights;
- ``optimizer.pt`` and ``scheduler.pt``: their ``state_dict``s, read with ``weights_only=True``;
- ``state.json``: epoch, step within the epoch, running epoch sums, history of logged rows,
  the params fingerprint and the RNG state.

It is built in a temporary folder and renamed into place, so a folder named ``step-*`` is
always complete; a kill during a save leaves only a ``.tmp-*`` folder, removed on the next
start. Names carry the global step, so keeping the last K survives restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.params import Params, as_dict

PREFIX = "step-"


@dataclass
class TrainState:
    """Where training stands; everything except tensors, which sit beside it."""

    fingerprint: str
    epoch: int = 0  # epochs fully done
    step: int = 0  # steps done inside ``epoch``
    global_step: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # this epoch: loss sum, correct, samples
    best_val: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)  # one logged row per finished epoch


@dataclass
class Checkpoint:
    path: Path
    state: TrainState
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: torch.Tensor


def fingerprint(params: Params, mixed_precision: str = "no") -> str:
    """Hash of the params that shape training, with the precision in force (the launcher may set it).

    Checkpoints only resume under the same one.
    """
    shaping = {
        "mixed_precision": mixed_precision,
        "data": as_dict(params.data),
        "model": as_dict(params.model),
        "train": {
            k: v
            for k, v in as_dict(params.train).items()
            if k not in ("eval_batch_size", "checkpoint_every_steps", "keep_checkpoints", "mixed_precision")
        },
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_name(global_step: int) -> str:
    return f"{PREFIX}{global_step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def clean_partial(root: Path) -> None:
    """Remove the temporary folders of saves that a kill interrupted."""
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_checkpoint(
    root: Path,
    state: TrainState,
    model: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    keep: int,
) -> Path:
    """Write one checkpoint atomically, then drop all but the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(_cpu(model), str(tmp / "model.safetensors"))
        save_file(_cpu(best), str(tmp / "best.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1))
        for f in tmp.iterdir():  # contents reach the disk before the rename makes them visible
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        final = root / checkpoint_name(state.global_step)
        if final.exists():  # the same step saved again (e.g. a resumed run finishing) - replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint; any damage raises an exception describing it."""
    state = TrainState(**json.loads((path / "state.json").read_text()))
    return Checkpoint(
        path=path,
        state=state,
        model=load_file(str(path / "model.safetensors")),
        best=load_file(str(path / "best.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        scheduler=torch.load(path / "scheduler.pt", weights_only=True),
        rng=load_file(str(path / "rng.safetensors"))["cpu"],
    )


def latest_checkpoint(root: Path, expected_fingerprint: str) -> tuple[Checkpoint | None, list[str]]:
    """The newest readable checkpoint with ``expected_fingerprint``, and what was said on the way.

    Unreadable checkpoints are reported and skipped for the previous one. If the newest
    readable one was made under other params, nothing is resumed.
    """
    notes: list[str] = []
    for path in reversed(list_checkpoints(root)):
        try:
            ckpt = read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any damage means: report, try the previous one
            notes.append(
                f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); trying the previous one"
            )
            continue
        if ckpt.state.fingerprint != expected_fingerprint:
            notes.append(
                f"checkpoint {path} was made with other training params (fingerprint "
                f"{ckpt.state.fingerprint} != {expected_fingerprint}); starting fresh"
            )
            return None, notes
        return ckpt, notes
    return None, notes


def clear(root: Path) -> None:
    """Remove every checkpoint under ``root`` (used when starting fresh under new params)."""
    for p in list_checkpoints(root):
        shutil.rmtree(p, ignore_errors=True)
    clean_partial(root)
