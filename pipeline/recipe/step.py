"""The training step: the one place that turns a batch into an optimizer step.

The train stage's :class:`~pipeline.trainer.Trainer` runs it, and so do the benchmarks and the profiler,
so that what they time is what trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn

from pipeline.dataset import Split, to_input
from pipeline.params import TrainParams
from pipeline.recipe.augment import augment
from pipeline.recipe.optim import Learner
from pipeline.recipe.sampling import Batch

# positions in the epoch's running sums (a float64 tensor on the device), which each step adds to
SUM_LOSS, SUM_CORRECT, SUM_SAMPLES = range(3)


def new_sums(device: torch.device | str = "cpu") -> torch.Tensor:
    """Empty running sums: summed per-sample loss, samples predicted right, samples."""
    return torch.zeros(3, dtype=torch.float64, device=device)


def step_inputs(data: Split, batch: Batch, cfg: TrainParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The data path: ``batch``'s images from ``data`` (on its device), augmented, as float inputs; and labels."""
    inputs = to_input(augment(data.images[batch.indices], batch, cfg))
    if cfg.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, data.labels[batch.indices]


def train_step(
    learner: Learner,
    data: Split,
    batch: Batch,
    cfg: TrainParams,
    sums: torch.Tensor | None = None,
    accelerator: Accelerator | None = None,
    progress: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """One optimizer step on ``batch`` (this process's shard of a global batch); returns its training loss.

    The shard is cut into ``cfg.grad_accum`` micro-batches, one backward each; under ``accelerator`` the
    gradients are all-reduced with the last. ``sums`` (from :func:`new_sums`) gets this step's loss, correct
    predictions and samples added. ``progress`` is called as the step starts and after each forward pass.
    """
    progress()
    inputs, labels = step_inputs(data, batch, cfg)
    chunks = cfg.grad_accum
    losses = []
    for i, (x, y) in enumerate(zip(inputs.chunk(chunks), labels.chunk(chunks), strict=True)):
        loss, logits = _backward(learner.model, x, y, cfg, accelerator, sync=i == chunks - 1, progress=progress)
        if sums is not None:
            _add_to_sums(sums, loss, logits, y, cfg)
        losses.append(loss)
    learner.optimizer.step()
    learner.scheduler.step()
    learner.optimizer.zero_grad(set_to_none=True)
    if learner.lookahead is not None:
        learner.lookahead.update(learner.network)
    if learner.ema is not None:
        learner.ema.update_parameters(learner.network)
    return losses[0] if chunks == 1 else torch.stack(losses).mean()


def _backward(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainParams,
    accelerator: Accelerator | None,
    sync: bool,
    progress: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch, all-reducing the gradients only when it is to ``sync``;
    returns its loss (detached) and logits."""
    chunks = cfg.grad_accum
    quiet = accelerator.no_sync(model) if accelerator is not None and not sync else contextlib.nullcontext()
    with quiet:
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        progress()  # past the forward pass: a process stuck before here is behind one in the all-reduce
        scaled = loss if chunks == 1 else loss / chunks  # the mean over the whole batch
        if accelerator is None:
            scaled.backward()
        else:
            accelerator.backward(scaled)
    return loss.detach(), logits


@torch.no_grad()
def _add_to_sums(
    sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, cfg: TrainParams
) -> None:
    """Add a micro-batch to the running sums; the logged loss is plain cross-entropy, as val/loss (no smoothing)."""
    plain = nn.functional.cross_entropy(logits, labels) if cfg.label_smoothing else loss
    sums[SUM_LOSS] += plain.double() * len(labels)
    sums[SUM_CORRECT] += (logits.argmax(1) == labels).sum()
    sums[SUM_SAMPLES] += len(labels)
