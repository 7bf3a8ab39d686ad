"""The training loop: one :class:`Trainer` owns an epoch (train, validate, log its row, checkpoint).

Pure of the stage's I/O: the train stage (:mod:`pipeline.train`) builds the model, optimizer and schedule,
restores them, and hands them over prepared; the trainer steps them and saves checkpoints into its run folder.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import astuple, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.batches import augment, rank_batches, steps_per_epoch, to_input
from pipeline.checkpoint import EpochSums, TrainState, save_checkpoint
from pipeline.dataset import CLASSES, Split
from pipeline.errors import TERMINAL_VAR, DataError
from pipeline.metrics import classification_report, confusion_matrix
from pipeline.params import TrainParams
from pipeline.runtime import predict, say
from pipeline.watchdog import Heartbeat


def make_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule ``cfg.schedule`` names."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.25)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def make_ema(model: nn.Module, cfg: TrainParams, device: torch.device) -> AveragedModel | None:
    """The moving average of ``model``'s weights and buffers that ``cfg.ema`` asks for (None when 0: off)."""
    if not cfg.ema:
        return None
    return AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


def make_optimizer(model: nn.Module, cfg: TrainParams) -> torch.optim.Optimizer:
    """AdamW with the kernels ``cfg.optimizer_impl`` asks for (auto: torch's own choice per device)."""
    impl = cfg.optimizer_impl
    foreach = {"for_loop": False, "foreach": True}.get(impl)  # None: torch decides
    fused = True if impl == "fused" else None
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach, fused=fused)


# Logged per epoch into the curves (DVCLive's TSVs) but kept out of metrics.json, so that `dvc metrics diff`
# shows held-out results alone: the training set's loss and accuracy are how the fit went, not a result; timings
# change on every run; lr only traces the schedule (it ends near 0).
TRACES = frozenset({"loss/train", "accuracy/train", "lr", "epoch_time_s", "samples_per_s", "peak_gpu_memory_mb"})
DIVERGENCE_CHECK = 25  # steps between looks at the loss (each waits for the device)
LOSS, CORRECT, SAMPLES = range(len(fields(EpochSums)))  # EpochSums' fields, as positions in Trainer.sums


def forget(summary: dict, name: str) -> None:
    """Drop metric ``name`` from a DVCLive summary, which nests ``loss/train`` as ``summary["loss"]["train"]``."""
    *parents, leaf = name.split("/")
    for key in parents:
        summary = summary[key]
    summary.pop(leaf)


class Trainer:
    """The training loop around one prepared model, with its checkpointable state."""

    heartbeat: Heartbeat | None = None  # told how far each step got, so that a stalled process can be named

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train: Split,
        val_loader: DataLoader,
        cfg: TrainParams,
        state: TrainState,
        best: dict[str, torch.Tensor] | None,
        run_dir: Path,
        live: bool,
        ema: AveragedModel | None = None,
    ) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.train, self.val_loader, self.cfg, self.state, self.run_dir = train, val_loader, cfg, state, run_dir
        self.best = best
        self.ema = ema  # with train.ema on: updated every step; validated, kept as best and exported
        self.trained = accelerator.unwrap_model(model, keep_torch_compile=False)  # its parameters, unwrapped
        self.live = live  # whether DVCLive records the rows (else they are only printed)
        self.steps = steps_per_epoch(len(train), cfg.batch_size)
        self.device = accelerator.device
        # the epoch's EpochSums on the device, in its field order (LOSS, CORRECT, SAMPLES); the main process
        # carries the folded totals of all processes up to the last checkpoint, the others their own since then
        own = state.sums if accelerator.is_main_process else EpochSums()
        self.sums = torch.tensor(astuple(own), dtype=torch.float64, device=self.device)

    def fold_sums(self) -> EpochSums:
        """Sum the epoch statistics over processes; keep the total on the main process only.

        Done at every checkpoint, in the uninterrupted run as in a resumed one, so both add
        the same numbers in the same order.
        """
        total = self.accelerator.reduce(self.sums.clone(), reduction="sum")
        self.sums.copy_(total if self.accelerator.is_main_process else torch.zeros_like(total))
        return EpochSums(*(float(x) for x in total.tolist()))

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """This process's (indices, flip, shift, cutout centre) for the rest of ``epoch``, on the device."""
        accelerator, cfg = self.accelerator, self.cfg
        return rank_batches(
            len(self.train),
            cfg.batch_size,
            cfg.seed,
            epoch,
            accelerator.process_index,
            accelerator.num_processes,
            self.state.step,
            max_shift=cfg.translate,
            cutout=cfg.cutout,
            device=self.device,
        )

    def progress_bar(self, epoch: int) -> tqdm:
        """A live bar on a terminal (also through pipeline.launch, which passes stderr on live); logs (CI,
        ``dvc repro > file``) get only the one line per epoch."""
        cfg = self.cfg
        return tqdm(
            total=self.steps * cfg.batch_size,
            initial=self.state.step * cfg.batch_size,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="sample",
            unit_scale=True,
            leave=False,
            disable=not (self.accelerator.is_main_process and (sys.stderr.isatty() or os.environ.get(TERMINAL_VAR))),
        )

    def step(self, idx: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this process's shard of a global batch; adds to the epoch's sums."""
        cfg = self.cfg
        self.mark_progress()
        images, labels = self.train.images[idx], self.train.labels[idx]
        inputs = to_input(augment(images, flip, shift, centers, cfg.hflip, cfg.translate, cfg.cutout))
        if cfg.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        chunks = cfg.grad_accum
        losses = [self.backward(x, y, last=i == chunks - 1)
                  for i, (x, y) in enumerate(zip(inputs.chunk(chunks), labels.chunk(chunks), strict=True))]  # fmt: skip
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.trained)
        self.state.step += 1
        self.state.global_step += 1
        return losses[0] if chunks == 1 else torch.stack(losses).mean()

    def backward(self, inputs: torch.Tensor, labels: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (``train.grad_accum`` of them make a step; gradients are
        all-reduced with the ``last`` one); adds to the epoch's sums; returns its training loss."""
        cfg, chunks = self.cfg, self.cfg.grad_accum
        with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
            logits = self.model(inputs)
            loss = nn.functional.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            self.mark_progress()  # past the forward pass: a process stuck before here is behind one in the all-reduce
            self.accelerator.backward(loss if chunks == 1 else loss / chunks)  # the mean over the whole batch
        with torch.no_grad():  # the logged loss is plain cross-entropy, as val/loss: no label smoothing
            plain = nn.functional.cross_entropy(logits, labels) if cfg.label_smoothing else loss
            self.sums[LOSS] += plain.double() * len(labels)
            self.sums[CORRECT] += (logits.argmax(1) == labels).sum()
            self.sums[SAMPLES] += len(labels)
        return loss.detach()

    def mark_progress(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.progress += 1

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """Finish ``epoch`` from ``state.step``; returns (mean loss, accuracy) over all processes."""
        self.model.train()
        every = self.cfg.checkpoint_every_steps
        with self.progress_bar(epoch) as bar:
            for batch in self.batches(epoch):
                loss = self.step(*batch)
                if not bar.disable:
                    bar.update(self.cfg.batch_size)
                    if self.state.step % 20 == 0:
                        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if self.state.step % DIVERGENCE_CHECK == 0 and not torch.isfinite(loss):
                    raise DataError(
                        f"training diverged at epoch {epoch + 1}, step {self.state.step} (loss {loss.item()}); "
                        "lower train.lr"
                    )
                if every and self.state.global_step % every == 0 and self.state.step < self.steps:
                    self.save()
        sums = self.fold_sums()
        self.sums.zero_()
        return sums.loss / sums.samples, sums.correct / sums.samples

    def run_epoch(self, epoch: int) -> None:
        """One whole epoch: train (from ``state.step``), validate, log its row, checkpoint."""
        accelerator, cfg = self.accelerator, self.cfg
        t0 = time.perf_counter()
        first_step = self.state.step
        loss, accuracy = self.train_epoch(epoch)
        train_time = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise DataError(f"training diverged at epoch {epoch + 1} (loss {loss}); lower train.lr")
        val = predict(accelerator, self.model if self.ema is None else self.ema.module, self.val_loader)
        report = classification_report(confusion_matrix(val.preds, val.labels, len(CLASSES)), CLASSES)
        val_loss = float(val.losses.double().mean())
        local = (self.steps - first_step) * cfg.batch_size  # samples this run trained in this epoch
        row = {
            "loss/train": round(loss, 6),  # TensorBoard's names: metrics.json's loss.train cannot pass for a param
            "accuracy/train": round(accuracy, 6),
            "loss/val": round(val_loss, 6),
            "accuracy/val": report["accuracy"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": round(time.perf_counter() - t0, 3),
            "samples_per_s": round(local / train_time, 1),
        }
        if accelerator.device.type == "cuda":
            row["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.log(row, step=epoch + 1)
        say(
            accelerator,
            f"epoch {epoch + 1}/{cfg.epochs}  train loss {loss:.4f} acc {accuracy:.4f}  "
            f"val loss {val_loss:.4f} acc {report['accuracy']:.4f}  {row['samples_per_s']:.0f} samples/s",
        )
        self.end_epoch(row, report["accuracy"])

    def log(self, row: dict[str, float], step: int) -> None:
        """One epoch's row to DVCLive (its step is the epoch, from 1): results to metrics.json and the curves,
        :data:`TRACES` to the curves only."""
        if self.live and self.accelerator.is_main_process:
            live = self.accelerator.get_tracker("dvclive", unwrap=True)
            live.step = step
            for name in sorted(TRACES & row.keys()):
                live.log_metric(name, row[name])
                forget(live.summary, name)
        self.accelerator.log({k: v for k, v in row.items() if k not in TRACES}, step=step)

    def end_epoch(self, row: dict[str, float], val_accuracy: float) -> None:
        """Record a finished epoch (and the best weights so far), then checkpoint it."""
        st = self.state
        if val_accuracy > st.best_val:
            st.best_val, st.best_epoch = val_accuracy, st.epoch
            if self.accelerator.is_main_process:
                self.best = {k: v.detach().cpu().clone() for k, v in self.result().items()}
        st.history.append(row)
        st.epoch, st.step = st.epoch + 1, 0
        self.save(fold=False)

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained weights (what a resumed run continues from)."""
        return self.trained.state_dict()

    def result(self) -> dict[str, torch.Tensor]:
        """The weights the run scores and exports: the moving average with train.ema on, else the trained ones."""
        return self.weights() if self.ema is None else self.ema.module.state_dict()

    def save(self, fold: bool = True) -> None:
        """Checkpoint on the main process; every process takes part and waits for it."""
        self.state.sums = self.fold_sums() if fold else EpochSums()
        if self.accelerator.is_main_process:
            assert self.best is not None or self.state.best_epoch < 0
            save_checkpoint(
                self.run_dir,
                self.state,
                model=self.weights(),
                best=self.best if self.best is not None else self.result(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                keep=self.cfg.keep_checkpoints,
                ema=None if self.ema is None else self.ema.state_dict(),
            )
        self.accelerator.wait_for_everyone()
