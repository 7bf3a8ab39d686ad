"""Training checkpoints: the whole state of a run, captured, written atomically, checked and restored.

:func:`capture` takes a :class:`Checkpoint` of a :class:`~pipeline.recipe.optim.Learner` and where training
stands; :func:`save_checkpoint` writes it; :func:`resumable` finds the newest one that fits the run at hand
(:func:`misfit` says why one does not); :func:`restore` puts it back. Nothing else touches its fields. Run
folders (``checkpoints/<run>/``) are :mod:`pipeline.runs`'. A checkpoint folder ``step-00000421`` (named by
global step) holds

- ``model.safetensors`` and ``best.safetensors``: current and best-by-validation weights;
- ``ema.safetensors``, with ``train.ema`` on: the moving average of the weights (torch's ``AveragedModel``);
- ``lookahead.safetensors``, with ``train.lookahead`` on: the slow weights and their step count;
- ``optimizer.pt`` and ``scheduler.pt``: their ``state_dict``s, read with ``weights_only=True``;
- ``rng.safetensors`` and ``state.json``: epoch, step within the epoch, running epoch sums, the history
  of logged rows.

It is built in a temporary folder and renamed into place, so a folder named ``step-*`` is always
complete (pipeline/files.py); a kill during a save leaves only a ``.tmp-*`` folder, removed on the next start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.files import atomic_path
from pipeline.recipe.optim import Learner
from pipeline.recipe.step import SUM_CORRECT, SUM_LOSS, SUM_SAMPLES

PREFIX = "step-"
EMA_FILE = "ema.safetensors"
LOOKAHEAD_FILE = "lookahead.safetensors"


@dataclass(frozen=True)
class EpochSums:
    """What an epoch's training loss and accuracy are made of, summed over its batches so far."""

    loss: float = 0.0  # per-sample loss, summed
    correct: float = 0.0  # samples predicted right
    samples: float = 0.0

    def finite(self) -> bool:
        return all(math.isfinite(x) for x in dataclasses.astuple(self))

    @classmethod
    def of(cls, sums: torch.Tensor) -> EpochSums:
        """The running sums a training step adds to (:func:`pipeline.recipe.step.new_sums`)."""
        values = sums.tolist()
        return cls(loss=values[SUM_LOSS], correct=values[SUM_CORRECT], samples=values[SUM_SAMPLES])

    def as_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """These sums in the layout a training step adds to."""
        values = [0.0] * 3
        values[SUM_LOSS], values[SUM_CORRECT], values[SUM_SAMPLES] = self.loss, self.correct, self.samples
        return torch.tensor(values, dtype=torch.float64, device=device)


@dataclass
class TrainState:
    """Where training stands; everything except tensors, which sit beside it."""

    fingerprint: str
    epoch: int = 0  # epochs fully done
    step: int = 0  # steps done inside ``epoch``
    global_step: int = 0
    sums: EpochSums = field(default_factory=EpochSums)  # this epoch's, up to this checkpoint
    best_val: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)  # one logged row per finished epoch


@dataclass
class Checkpoint:
    """A run's whole state: where training stands, and the tensors of the model, optimizer, schedule and RNG."""

    path: Path | None  # where it was read from (None: captured, not yet saved)
    state: TrainState
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: torch.Tensor
    ema: dict[str, torch.Tensor] | None = None  # AveragedModel's state dict, with train.ema on
    lookahead: dict[str, torch.Tensor] | None = None  # the slow weights, with train.lookahead on

    def scored(self) -> dict[str, torch.Tensor]:
        """The weights this checkpoint's run scores and exports: the moving average if it keeps one."""
        return self.model if self.ema is None else ema_weights(self.ema)


def ema_weights(averaged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The averaged model's own weights from an ``AveragedModel`` state dict (``module.`` keys, less its count)."""
    return {k.removeprefix("module."): v for k, v in averaged.items() if k.startswith("module.")}


@dataclass(frozen=True)
class Expected:
    """What a resumable checkpoint must fit: the fresh model, optimizer and schedule of this run."""

    model: dict[str, torch.Tensor]  # state dict (parameters and buffers)
    param_shapes: list[torch.Size]  # in the optimizer's order (its groups', as its state dict numbers them)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epochs: int
    steps_per_epoch: int
    fingerprint: str  # the run's key: a checkpoint made by another run never fits
    ema: dict[str, torch.Tensor] | None = None  # the fresh AveragedModel's state dict, with train.ema on
    lookahead: dict[str, torch.Tensor] | None = None  # the fresh slow weights, with train.lookahead on


def capture(learner: Learner, state: TrainState, best: dict[str, torch.Tensor] | None) -> Checkpoint:
    """The state of ``learner`` and of training (``best``: the best weights so far; None: the scored ones now)."""
    ema = None if learner.ema is None else learner.ema.state_dict()
    return Checkpoint(
        path=None,
        state=state,
        model=learner.network.state_dict(),
        best=best if best is not None else learner.scored.state_dict(),
        optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict(),
        rng=torch.get_rng_state(),
        ema=ema,
        lookahead=None if learner.lookahead is None else learner.lookahead.state_dict(),
    )


def restore(ckpt: Checkpoint, learner: Learner) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Put ``ckpt`` back into ``learner`` (before it is prepared) and the CPU RNG; returns where training
    stands and the best weights so far."""
    learner.model.load_state_dict(ckpt.model)
    learner.optimizer.load_state_dict(ckpt.optimizer)
    learner.scheduler.load_state_dict(ckpt.scheduler)
    if learner.ema is not None and ckpt.ema is not None:
        learner.ema.load_state_dict(ckpt.ema)
    if learner.lookahead is not None and ckpt.lookahead is not None:
        learner.lookahead.load_state_dict(ckpt.lookahead)
    torch.set_rng_state(ckpt.rng)
    return ckpt.state, ckpt.best


def expected_of(learner: Learner, epochs: int, steps_per_epoch: int, fingerprint: str) -> Expected:
    """What a checkpoint must fit to resume ``learner`` (fresh, unprepared) in the run ``fingerprint``."""
    return Expected(
        model=learner.model.state_dict(),
        param_shapes=[p.shape for group in learner.optimizer.param_groups for p in group["params"]],
        optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict(),
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        fingerprint=fingerprint,
        ema=None if learner.ema is None else learner.ema.state_dict(),
        lookahead=None if learner.lookahead is None else learner.lookahead.state_dict(),
    )


def checkpoint_name(global_step: int) -> str:
    return f"{PREFIX}{global_step:08d}"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints in the run folder ``run``, oldest first."""
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def tensor_bytes(obj: object) -> int:
    """The bytes of every tensor in ``obj`` (tensors, and dicts, lists and tuples of them, nested)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(run: Path, ckpt: Checkpoint, keep: int) -> Path:
    """Write ``ckpt`` atomically into the run folder ``run``, then drop all but the newest ``keep``.

    The same step saved again (a resumed run finishing, say) replaces the one there.
    """
    final = run / checkpoint_name(ckpt.state.global_step)
    needs = tensor_bytes((ckpt.model, ckpt.best, ckpt.optimizer, ckpt.ema, ckpt.lookahead))
    with atomic_path(final, folder=True, needs=needs) as tmp:
        save_file(_cpu(ckpt.model), str(tmp / "model.safetensors"))
        save_file(_cpu(ckpt.best), str(tmp / "best.safetensors"))
        if ckpt.ema is not None:
            save_file(_cpu(ckpt.ema), str(tmp / EMA_FILE))
        if ckpt.lookahead is not None:
            save_file(_cpu(ckpt.lookahead), str(tmp / LOOKAHEAD_FILE))
        torch.save(ckpt.optimizer, tmp / "optimizer.pt")
        torch.save(ckpt.scheduler, tmp / "scheduler.pt")
        save_file({"cpu": ckpt.rng}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(ckpt.state), indent=1))
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint; any damage raises an exception describing it."""
    raw = json.loads((path / "state.json").read_text())
    state = TrainState(**{**raw, "sums": EpochSums(**raw["sums"])})
    return Checkpoint(
        path=path,
        state=state,
        model=load_file(str(path / "model.safetensors")),
        best=load_file(str(path / "best.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        scheduler=torch.load(path / "scheduler.pt", weights_only=True),
        rng=load_file(str(path / "rng.safetensors"))["cpu"],
        ema=load_file(str(path / EMA_FILE)) if (path / EMA_FILE).exists() else None,
        lookahead=load_file(str(path / LOOKAHEAD_FILE)) if (path / LOOKAHEAD_FILE).exists() else None,
    )


def _weights_misfit(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> str | None:
    if got.keys() != want.keys():
        return f"its {name} has other tensors ({sorted(set(got) ^ set(want))[:2]})"
    for k, v in want.items():
        if got[k].shape != v.shape or got[k].dtype != v.dtype:
            return f"its {name} tensor {k} is {tuple(got[k].shape)} {got[k].dtype}, the model's {tuple(v.shape)}"
    return None


def _optimizer_misfit(got: dict[str, Any], want: dict[str, Any], shapes: list[torch.Size]) -> str | None:
    groups, want_groups = got.get("param_groups"), want["param_groups"]
    if not isinstance(groups, list) or [g.get("params") for g in groups] != [g["params"] for g in want_groups]:
        return "its optimizer state is for other parameters"
    state = got.get("state")
    if not isinstance(state, dict) or not set(state) <= set(range(len(shapes))):
        return "its optimizer state is for other parameters"
    for index, entry in state.items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != shapes[index]:
                return f"its optimizer {name} of parameter {index} is {tuple(value.shape)}, not {tuple(shapes[index])}"
    return None


def _position_misfit(st: TrainState, expected: Expected) -> str | None:
    steps = expected.steps_per_epoch
    if st.fingerprint != expected.fingerprint:
        return f"it was made by another run ({st.fingerprint})"
    inside = 0 <= st.epoch < expected.epochs or (st.epoch == expected.epochs and st.step == 0)  # or at the end
    if not (inside and 0 <= st.step < steps and st.global_step == st.epoch * steps + st.step):
        return f"its position (epoch {st.epoch}, step {st.step}, global step {st.global_step}) is out of range"
    if len(st.history) != st.epoch or not st.sums.finite():
        return "its history or running sums do not match its position"
    if not -1 <= st.best_epoch < max(st.epoch, 1):
        return f"its best epoch {st.best_epoch} is out of range"
    return None


def _schedule_misfit(ckpt: Checkpoint, expected: Expected) -> str | None:
    if set(ckpt.scheduler) != set(expected.scheduler) or ckpt.scheduler.get("last_epoch") != ckpt.state.global_step:
        return "its schedule state is of another schedule or position"
    if ckpt.scheduler.get("total_steps") != expected.scheduler.get("total_steps"):
        return "its schedule has another length"
    if ckpt.rng.dtype != torch.uint8 or ckpt.rng.shape != torch.get_rng_state().shape:
        return "its RNG state is not a torch CPU generator state"
    return None


def _lookahead_misfit(got: dict[str, torch.Tensor] | None, want: dict[str, torch.Tensor] | None) -> str | None:
    if want is None:
        return None if got is None else "it holds lookahead's slow weights, which this run does not keep"
    if got is None:
        return "it holds no lookahead slow weights (train.lookahead)"
    return _weights_misfit("lookahead", got, want)


def _ema_misfit(got: dict[str, torch.Tensor] | None, want: dict[str, torch.Tensor] | None) -> str | None:
    if want is None:
        return None if got is None else "it holds a moving average of the weights, which this run does not keep"
    if got is None:
        return "it holds no moving average of the weights (train.ema)"
    return _weights_misfit("moving average", got, want)


def misfit(ckpt: Checkpoint, expected: Expected) -> str | None:
    """Why ``ckpt`` cannot resume the run ``expected`` describes, in a few words; None if it fits."""
    checks: list[Callable[[], str | None]] = [
        lambda: _position_misfit(ckpt.state, expected),
        lambda: _weights_misfit("model", ckpt.model, expected.model),
        lambda: _weights_misfit("best weights", ckpt.best, expected.model),
        lambda: _optimizer_misfit(ckpt.optimizer, expected.optimizer, expected.param_shapes),
        lambda: _schedule_misfit(ckpt, expected),
        lambda: _ema_misfit(ckpt.ema, expected.ema),
        lambda: _lookahead_misfit(ckpt.lookahead, expected.lookahead),
    ]
    return next((reason for check in checks if (reason := check()) is not None), None)


def latest_checkpoint(run: Path, fits: Callable[[Checkpoint], str | None]) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint in ``run`` that reads and fits, and one line for each one passed over.

    A checkpoint passed over is removed, so it is reported once and never again; the run then resumes
    from the previous one, or starts fresh when none is left.
    """
    notes: list[str] = []
    for path in reversed(list_checkpoints(run)):
        try:
            ckpt = read_checkpoint(path)
            reason = fits(ckpt)
        except Exception as e:
            reason = f"it is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        if reason is None:
            return ckpt, notes
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"checkpoint {path} cannot resume this run: {reason}; removed it, trying the previous one")
    return None, notes


def resumable(run: Path, expected: Expected) -> tuple[Checkpoint | None, list[str]]:
    """The checkpoint that resumes this run, if any, and one line for each thing passed over.

    The end of a finished run resumes too: its model was not written (a full disk, a kill during the export),
    so the run exports it without training again.
    """
    return latest_checkpoint(run, lambda ckpt: misfit(ckpt, expected))
