"""Evaluate stage: ``python -m pipeline.evaluate [--model-dir models] [--data data/raw] [--out metrics/test.json]``.

Also runs under ``accelerate launch -m pipeline.evaluate``: every test sample is counted exactly once.
Reads only ``data.subset`` and ``evaluate`` from params.yaml; the model comes
from its artifact alone. Writes overall and per-class test accuracy and loss
(a DVC metrics file) and, in ``--eval-dir``, what `dvc plots` shows: the confusion
matrix (counts, and one row per sample), per-class accuracy, and a grid of
misclassified test images.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pipeline.accelerator import make_accelerator
from pipeline.args import add_common_args, add_path_args
from pipeline.dataset import Split, load_split
from pipeline.errors import ModelArtifactError, cli
from pipeline.files import atomic_path, check_outputs, write_json
from pipeline.inference import eval_loader, predict
from pipeline.memory import out_of_memory
from pipeline.metrics import Predictions, classification_report, confusion_matrix
from pipeline.model import artifact_info, load_artifact
from pipeline.params import Params, load_params
from pipeline.plots import label_grid, misclassified, write_per_class_csv, write_predictions_csv
from pipeline.report import print_once, summary_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate the trained model on the Fashion-MNIST test set.")
    add_common_args(p)
    where = "confusion.json, predictions.csv, per_class.csv and misclassified.png go here"
    add_path_args(
        p,
        {"--model-dir": ("models", "model artifact folder"), "--out": ("metrics/test.json", "metrics JSON to write"),
         "--eval-dir": ("eval", where)},
    )  # fmt: skip
    return p.parse_args(argv)


def command(
    params: Path, data: Path, model_dir: Path, out: Path, eval_dir: Path, launcher: Sequence[str] = (), *extra: str
) -> list[str]:
    """This stage's command line, as dvc.yaml runs it: ``launcher -m pipeline.evaluate`` (no launcher: this Python)."""
    return [*(launcher or [sys.executable]), "-m", "pipeline.evaluate", "--params", str(params), "--data", str(data),
            "--model-dir", str(model_dir), "--out", str(out), "--eval-dir", str(eval_dir), *extra]  # fmt: skip


@dataclass(frozen=True)
class Scored:
    """Every test sample's prediction, gathered from all processes, and what follows from them."""

    test: Split
    got: Predictions
    info: dict[str, Any]  # the artifact's JSON
    classes: tuple[str, ...]  # as the artifact names them
    counts: torch.Tensor  # confusion matrix: rows are true classes
    metrics: dict[str, Any]  # metrics/test.json's "test" section: accuracy, loss, samples
    per_class: dict[str, float]  # accuracy by class name: eval/per_class.csv, a plot rather than a metric
    tta: str  # the test-time augmentation the predictions used (evaluate.tta)


def refuse_non_finite(got: Predictions, model_dir: Path) -> None:
    """No finite number, no metrics: NaN or infinite logits are the model's failure, never an accuracy."""
    bad = int((~(got.losses.isfinite() & got.confidence.isfinite())).sum())
    if bad:
        raise ModelArtifactError(
            f"model {model_dir} gives NaN or infinite logits on {bad} of {len(got.losses)} test samples; "
            "no metrics written; retrain: dvc repro --force train"
        )


def score(accelerator: Accelerator, model_dir: Path, data: Path, params: Params) -> Scored:
    """Predict every test sample once, on however many processes, and score the predictions."""
    model, model_cfg = load_artifact(model_dir)
    test = load_split(data, "test", params.data.subset)
    model, loader = accelerator.prepare(model, eval_loader(test, params.evaluate.batch_size))
    got = predict(accelerator, model, loader, params.evaluate.tta)
    assert len(got.preds) == len(test), f"counted {len(got.preds)} predictions for {len(test)} test samples"
    refuse_non_finite(got, model_dir)
    info = artifact_info(model_dir)
    classes = tuple(info["classes"])
    counts = confusion_matrix(got.preds, got.labels, model_cfg.num_classes)
    report = classification_report(counts, classes)
    metrics = {
        "accuracy": report["accuracy"],
        "loss": round(float(got.losses.double().mean()), 6),
        "samples": report["samples"],
    }
    return Scored(test, got, info, classes, counts, metrics, report["per_class_accuracy"], params.evaluate.tta)


def write_outputs(scored: Scored, out: Path, eval_dir: Path) -> None:
    """The metrics file and what `dvc plots` draws: confusion counts, per-sample and per-class tables, a grid."""
    s = scored
    write_json(out, {"test": s.metrics})  # namespaced: `dvc exp show` columns read test.accuracy, test.loss
    confusion = {"classes": list(s.classes), "rows": "true class", "columns": "predicted class"}
    write_json(eval_dir / "confusion.json", {**confusion, "counts": s.counts.tolist()})
    with atomic_path(eval_dir / "predictions.csv") as tmp:
        write_predictions_csv(tmp, s.got, s.classes)
    with atomic_path(eval_dir / "per_class.csv") as tmp:
        write_per_class_csv(tmp, s.per_class)
    with atomic_path(eval_dir / "misclassified.png") as tmp:
        label_grid(*misclassified(s.test.images, s.got.labels, s.got.preds, s.classes)).save(tmp, format="PNG")


def summary(scored: Scored, model_dir: Path, out: Path, eval_dir: Path, seconds: float) -> str:
    info, metrics = scored.info, scored.metrics
    val = info.get("val_accuracy", "?")  # what training recorded: shown as it is when it is no number
    val = f"{val:.4f}" if isinstance(val, int | float) else val
    tta = "" if scored.tta == "none" else f", {scored.tta} test-time augmentation"
    counted = f"loss {metrics['loss']:.4f}, {metrics['samples']} samples{tta}"
    worst = sorted(scored.per_class.items(), key=lambda kv: kv[1])[:3]
    return summary_table(
        [
            ("model", f"{model_dir}/ ({info['model']['name']}, {info.get('final_model', '?')} weights of "
                      f"epoch {info.get('epoch', '?')}, val accuracy {val})"),
            ("test accuracy", f"{metrics['accuracy']:.4f} ({counted})"),
            ("worst classes", ", ".join(f"{k} {v:.3f}" for k, v in worst)),
            ("time", f"{seconds:.1f}s"),
            ("artifacts", f"{out}; {eval_dir}/ (confusion, per-class, misclassified.png)"),
        ]
    )  # fmt: skip


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    check_outputs({"--out": Path(args.out), "--eval-dir": Path(args.eval_dir)}, folders=("--eval-dir",))
    start = time.perf_counter()
    accelerator = make_accelerator(args.cpu_threads)
    paths = Path(args.model_dir), Path(args.out), Path(args.eval_dir)
    try:
        scored = score(accelerator, paths[0], Path(args.data), params)
    except (RuntimeError, MemoryError) as e:
        batch = ("evaluate.batch_size", params.evaluate.batch_size)
        told = out_of_memory(e, batch, batch)
        if told is None:
            raise
        raise told from None
    if accelerator.is_main_process:
        write_outputs(scored, paths[1], paths[2])
        print_once(accelerator, summary(scored, *paths, time.perf_counter() - start))
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
