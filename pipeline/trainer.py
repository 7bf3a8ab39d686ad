"""The training loop: one :class:`Trainer` owns an epoch (train, validate, track its row, checkpoint).

Pure of the stage's I/O: the train stage (:mod:`pipeline.train`) builds the learner, restores it and hands it
over prepared; the trainer runs :func:`~pipeline.recipe.step.train_step` and saves checkpoints into its run folder.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.checkpoint import EpochSums, TrainState, capture, save_checkpoint
from pipeline.dataset import CLASSES, Split
from pipeline.errors import TERMINAL_VAR, DataError
from pipeline.guard import held_stops
from pipeline.inference import predict
from pipeline.metrics import classification_report, confusion_matrix
from pipeline.params import TrainParams
from pipeline.recipe.optim import Learner
from pipeline.recipe.sampling import Batch, rank_batches, steps_per_epoch
from pipeline.recipe.step import train_step
from pipeline.report import print_once
from pipeline.tracking import Tracker
from pipeline.watchdog import Heartbeat

DIVERGENCE_CHECK = 25  # steps between looks at the loss (each waits for the device)


@dataclass(frozen=True)
class TrainData:
    """What the trainer trains and validates on."""

    train: Split  # on the device: batches are index slices of it
    val: DataLoader  # prepared: each process gets its shard


@dataclass
class Standing:
    """Where training stands: the position, sums and history, and the best weights so far (main process)."""

    state: TrainState
    best: dict[str, torch.Tensor] | None = None


class Trainer:
    """The training loop around one prepared :class:`~pipeline.recipe.optim.Learner`, and its checkpoints."""

    def __init__(
        self,
        accelerator: Accelerator,
        learner: Learner,
        data: TrainData,
        cfg: TrainParams,
        standing: Standing,
        run_dir: Path,
        tracker: Tracker,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.accelerator, self.learner, self.data, self.cfg = accelerator, learner, data, cfg
        self.state, self.best = standing.state, standing.best
        self.run_dir, self.tracker = run_dir, tracker
        self.heartbeat = heartbeat  # told how far each step got, so that a stalled process can be named
        self.steps = steps_per_epoch(len(data.train), cfg.batch_size)
        # the epoch's running sums on the device; the main process carries the folded totals of all processes up
        # to the last checkpoint, the others their own since then
        own = self.state.sums if accelerator.is_main_process else EpochSums()
        self.sums = own.as_tensor(accelerator.device)

    def fold_sums(self) -> EpochSums:
        """Sum the epoch statistics over processes; keep the total on the main process only.

        Done at every checkpoint, in the uninterrupted run as in a resumed one, so both add
        the same numbers in the same order.
        """
        total = self.accelerator.reduce(self.sums.clone(), reduction="sum")
        self.sums.copy_(total if self.accelerator.is_main_process else torch.zeros_like(total))
        return EpochSums.of(total)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """This process's batches for the rest of ``epoch``, on the device."""
        accelerator, cfg = self.accelerator, self.cfg
        return rank_batches(
            len(self.data.train),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            start=self.state.step,
            max_shift=cfg.translate,
            cutout=cfg.cutout,
            alternate_flip=cfg.alternate_flip,
            device=accelerator.device,
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

    def mark_progress(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.progress += 1

    def step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on this process's shard of a global batch; returns its loss."""
        loss = train_step(
            self.learner, self.data.train, batch, self.cfg, self.sums, self.accelerator, self.mark_progress
        )
        self.state.step += 1
        self.state.global_step += 1
        return loss

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """Finish ``epoch`` from ``state.step``; returns (mean loss, accuracy) over all processes."""
        self.learner.model.train()
        every = self.cfg.checkpoint_every_steps
        with self.progress_bar(epoch) as bar:
            for batch in self.batches(epoch):
                loss = self.step(batch)
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
        """One whole epoch: train (from ``state.step``), validate, track its row, checkpoint."""
        accelerator, cfg = self.accelerator, self.cfg
        t0 = time.perf_counter()
        first_step = self.state.step
        loss, accuracy = self.train_epoch(epoch)
        train_time = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise DataError(f"training diverged at epoch {epoch + 1} (loss {loss}); lower train.lr")
        scored = self.learner.model if self.learner.ema is None else self.learner.ema.module
        val = predict(accelerator, scored, self.data.val)
        report = classification_report(confusion_matrix(val.preds, val.labels, len(CLASSES)), CLASSES)
        val_loss = float(val.losses.double().mean())
        local = (self.steps - first_step) * cfg.batch_size  # samples this run trained in this epoch
        row = {
            "loss/train": round(loss, 6),  # TensorBoard's names: metrics.json's loss.train cannot pass for a param
            "accuracy/train": round(accuracy, 6),
            "loss/val": round(val_loss, 6),
            "accuracy/val": report["accuracy"],
            "lr": self.learner.optimizer.param_groups[0]["lr"],
            "epoch_time_s": round(time.perf_counter() - t0, 3),
            "samples_per_s": round(local / train_time, 1),
        }
        if accelerator.device.type == "cuda":
            row["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.tracker.log_epoch(row, epoch + 1)
        print_once(
            accelerator,
            f"epoch {epoch + 1}/{cfg.epochs}  train loss {loss:.4f} acc {accuracy:.4f}  "
            f"val loss {val_loss:.4f} acc {report['accuracy']:.4f}  {row['samples_per_s']:.0f} samples/s",
        )
        self.end_epoch(row, report["accuracy"])

    def end_epoch(self, row: dict[str, float], val_accuracy: float) -> None:
        """Record a finished epoch (and the best weights so far), then checkpoint it."""
        st = self.state
        if val_accuracy > st.best_val:
            st.best_val, st.best_epoch = val_accuracy, st.epoch
            if self.accelerator.is_main_process:
                self.best = {k: v.detach().cpu().clone() for k, v in self.learner.scored.state_dict().items()}
        st.history.append(row)
        st.epoch, st.step = st.epoch + 1, 0
        self.save(fold=False)

    def save(self, fold: bool = True) -> None:
        """Checkpoint on the main process; every process takes part and waits for it."""
        self.state.sums = self.fold_sums() if fold else EpochSums()
        if self.accelerator.is_main_process:
            assert self.best is not None or self.state.best_epoch < 0
            with held_stops():  # a stop while it is written waits for it: what was trained is kept
                ckpt = capture(self.learner, self.state, self.best)
                save_checkpoint(self.run_dir, ckpt, self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
