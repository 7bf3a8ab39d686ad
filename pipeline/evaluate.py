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
from pathlib import Path

from pipeline.dataset import load_split
from pipeline.errors import cli
from pipeline.files import atomic_path, write_json
from pipeline.metrics import classification_report, confusion_matrix
from pipeline.model import artifact_info, load_artifact
from pipeline.params import load_params
from pipeline.plots import label_grid, misclassified, write_per_class_csv, write_predictions_csv
from pipeline.runtime import add_common_args, eval_loader, make_accelerator, predict, say, summary_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate the trained model on the Fashion-MNIST test set.")
    add_common_args(p)
    p.add_argument("--model-dir", default="models", help="model artifact folder (default: %(default)s)")
    p.add_argument("--out", default="metrics/test.json", help="metrics JSON to write (default: %(default)s)")
    p.add_argument(
        "--eval-dir",
        default="eval",
        help="confusion.json, predictions.csv, per_class.csv and misclassified.png go here (default: %(default)s)",
    )
    return p.parse_args(argv)


def command(
    params: Path, data: Path, model_dir: Path, out: Path, eval_dir: Path, launcher: Sequence[str] = (), *extra: str
) -> list[str]:
    """This stage's command line, as dvc.yaml runs it: ``launcher -m pipeline.evaluate`` (no launcher: this Python)."""
    return [*(launcher or [sys.executable]), "-m", "pipeline.evaluate", "--params", str(params), "--data", str(data),
            "--model-dir", str(model_dir), "--out", str(out), "--eval-dir", str(eval_dir), *extra]  # fmt: skip


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    start = time.perf_counter()
    accelerator = make_accelerator(args.cpu_threads)
    model, model_cfg = load_artifact(args.model_dir)
    test = load_split(args.data, "test", params.data.subset)
    model, loader = accelerator.prepare(model, eval_loader(test, params.evaluate.batch_size))
    preds, labels, losses = predict(accelerator, model, loader)
    assert len(preds) == len(test), f"counted {len(preds)} predictions for {len(test)} test samples"

    info = artifact_info(args.model_dir)
    classes = tuple(info["classes"])  # the artifact names its own classes
    cm = confusion_matrix(preds, labels, model_cfg.num_classes)
    report = classification_report(cm, classes)
    metrics = {
        "accuracy": report["accuracy"],
        "loss": round(float(losses.double().mean()), 6),
        "samples": report["samples"],
        "per_class_accuracy": report["per_class_accuracy"],
    }
    if accelerator.is_main_process:
        eval_dir = Path(args.eval_dir)
        write_json(args.out, metrics)
        write_json(
            eval_dir / "confusion.json",
            {"classes": list(classes), "rows": "true class", "columns": "predicted class", "counts": cm.tolist()},
        )
        with atomic_path(eval_dir / "predictions.csv") as tmp:
            write_predictions_csv(tmp, labels, preds, classes)
        with atomic_path(eval_dir / "per_class.csv") as tmp:
            write_per_class_csv(tmp, report["per_class_accuracy"])
        with atomic_path(eval_dir / "misclassified.png") as tmp:
            label_grid(*misclassified(test.images, labels, preds, classes)).save(tmp, format="PNG")
        worst = sorted(report["per_class_accuracy"].items(), key=lambda kv: kv[1])[:3]
        say(
            accelerator,
            summary_table(
                [
                    ("model", f"{args.model_dir}/ ({model_cfg.name}, {info.get('final_model', '?')} weights of "
                              f"epoch {info.get('epoch', '?')}, "
                              f"val accuracy {info.get('val_accuracy', float('nan')):.4f})"),
                    ("test accuracy", f"{metrics['accuracy']:.4f} (loss {metrics['loss']:.4f}, "
                                      f"{metrics['samples']} samples)"),
                    ("worst classes", ", ".join(f"{k} {v:.3f}" for k, v in worst)),
                    ("time", f"{time.perf_counter() - start:.1f}s"),
                    ("artifacts", f"{args.out}; {eval_dir}/ (confusion, per-class, misclassified.png)"),
                ]
            ),
        )  # fmt: skip
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
