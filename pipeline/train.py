"""Train stage: ``accelerate launch pipeline/train.py [--params params.yaml] [--data data/raw] [--model-dir models]``.

``python pipeline/train.py`` and ``python -m pipeline.train`` work too. Reads the
``data``, ``model`` and ``train`` sections of params.yaml; writes the model artifact
(safetensors + JSON) and per-epoch DVCLive metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python pipeline/train.py`: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import is_dvclive_available, set_seed  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.data import (  # noqa: E402
    CLASSES,
    Split,
    batch_flip_lr,
    load_split,
    rank_batches,
    steps_per_epoch,
    to_input,
    train_val_split,
)
from pipeline.errors import DataError, cli  # noqa: E402
from pipeline.metrics import classification_report, confusion_matrix  # noqa: E402
from pipeline.model import ModelConfig, build_model, save_artifact  # noqa: E402
from pipeline.params import Params, TrainParams, as_dict, load_params  # noqa: E402
from pipeline.runtime import eval_loader, make_accelerator, predict, say  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the Fashion-MNIST CNN with Hugging Face Accelerate.")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--data", default="data/raw", help="folder with the four IDX files (default: %(default)s)")
    p.add_argument("--model-dir", default="models", help="where the model artifact goes (default: %(default)s)")
    p.add_argument("--live-dir", default="dvclive/train", help="DVCLive metrics and plots (default: %(default)s)")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="threads per process when running on CPU; 0 = the host's cores split across its processes "
        "(default: %(default)s). Results on CPU are bitwise reproducible for a fixed thread count.",
    )
    return p.parse_args(argv)


def make_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule ``cfg.schedule`` names."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.25)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int


def train_epoch(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: Split,
    cfg: TrainParams,
    epoch: int,
) -> EpochStats:
    """One pass over this process's shard of every global batch; stats are summed over processes."""
    model.train()
    device = accelerator.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, samples
    batches = rank_batches(
        len(train), cfg.batch_size, cfg.seed, epoch, accelerator.process_index, accelerator.num_processes
    )
    for idx, flip in batches:
        idx = idx.to(device, non_blocking=True)
        images, labels = train.images[idx], train.labels[idx]
        if cfg.hflip:
            images = batch_flip_lr(images, flip.to(device, non_blocking=True))
        logits = model(to_input(images))
        loss = nn.functional.cross_entropy(logits, labels)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            sums += torch.stack(
                [
                    loss.double() * len(idx),
                    (logits.argmax(1) == labels).sum().double(),
                    torch.tensor(len(idx), device=device, dtype=torch.float64),
                ]
            )
    loss_sum, correct, samples = accelerator.reduce(sums, reduction="sum").tolist()
    return EpochStats(loss=loss_sum / samples, accuracy=correct / samples, samples=int(samples))


def check_sizes(params: Params, train: Split, world: int) -> None:
    """Stop before training when the batch cannot be split or is larger than the data."""
    b = params.train.batch_size
    if b % world:
        raise DataError(f"train.batch_size ({b}) must be divisible by the number of processes ({world})")
    if steps_per_epoch(len(train), b) == 0:
        raise DataError(
            f"train.batch_size ({b}) is larger than the {len(train)} training samples left after validation; "
            "lower it, or raise data.subset"
        )


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    cfg = params.train
    # Without dvclive (a bare GPU image, say) training still runs; metrics are only printed.
    live_available = is_dvclive_available()
    accelerator = make_accelerator(args.cpu_threads, log_with="dvclive" if live_available else None)
    set_seed(cfg.seed)

    full = load_split(args.data, "train", params.data.subset)
    train, val = train_val_split(full, params.data.val_size, params.data.split_seed)
    check_sizes(params, train, accelerator.num_processes)

    model_cfg = ModelConfig(name=params.model.name)
    model = build_model(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = steps_per_epoch(len(train), cfg.batch_size)
    # Not prepared: Accelerate would step it once per process per step.
    scheduler = make_schedule(optimizer, cfg, cfg.epochs * steps)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, eval_loader(val, cfg.eval_batch_size))
    train = train.to(accelerator.device)  # the whole uint8 set lives on the device; batches are index slices

    accelerator.init_trackers(
        "fashion-mnist",
        config={k: v for k, v in _flat(as_dict(params)).items() if not k.startswith("download.")},
        init_kwargs={"dvclive": {"dir": args.live_dir, "save_dvc_exp": False, "dvcyaml": None}},
    )
    if not live_available:
        say(accelerator, "dvclive is not installed: per-epoch metrics are printed, not written")
    where = str(accelerator.device)
    if accelerator.device.type == "cpu":
        where += f" ({torch.get_num_threads()} threads)"
    say(
        accelerator,
        f"train: {len(train)} samples, val: {len(val)}, {accelerator.num_processes} process(es) on {where}, "
        f"{steps} steps/epoch of {cfg.batch_size}, mixed precision: {accelerator.mixed_precision}",
    )
    best_val, start = -1.0, time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        stats = train_epoch(accelerator, model, optimizer, scheduler, train, cfg, epoch)
        train_time = time.perf_counter() - t0
        preds, labels, losses = predict(accelerator, model, val_loader)
        report = classification_report(confusion_matrix(preds, labels, len(CLASSES)), CLASSES)
        val_loss = float(losses.double().mean())
        best_val = max(best_val, report["accuracy"])
        row = {
            "train/loss": round(stats.loss, 6),
            "train/accuracy": round(stats.accuracy, 6),
            "val/loss": round(val_loss, 6),
            "val/accuracy": report["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": round(time.perf_counter() - t0, 3),
            "samples_per_s": round(stats.samples / train_time, 1),
        }
        accelerator.log(row, step=epoch)
        say(
            accelerator,
            f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats.loss:.4f} acc {stats.accuracy:.4f}  "
            f"val loss {val_loss:.4f} acc {report['accuracy']:.4f}  {row['samples_per_s']:.0f} samples/s",
        )
        if not math.isfinite(stats.loss):
            raise DataError(f"training diverged at epoch {epoch + 1} (loss {stats.loss}); lower train.lr")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if live_available:
            live = accelerator.get_tracker("dvclive", unwrap=True)
            live.summary.update({"best_val_accuracy": best_val, "train_time_s": round(time.perf_counter() - start, 2)})
        save_artifact(
            accelerator.unwrap_model(model, keep_torch_compile=False),
            model_cfg,
            args.model_dir,
            extra={"epochs": cfg.epochs, "val_accuracy": report["accuracy"]},
        )
    accelerator.end_training()
    say(accelerator, f"model written to {args.model_dir}/; best val accuracy {best_val:.4f}")
    return 0


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
