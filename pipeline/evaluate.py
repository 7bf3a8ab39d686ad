"""Evaluate stage: ``python -m pipeline.evaluate [--model-dir models] [--data data/raw] [--out metrics/test.json]``.

Also runs under ``accelerate launch``: every test sample is counted exactly once.
Reads only ``data.subset`` and ``evaluate`` from params.yaml; the model comes
from its artifact alone. Writes overall and per-class test accuracy and loss
(a DVC metrics file) and the confusion matrix counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python pipeline/evaluate.py`: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

from pipeline.data import CLASSES, load_split  # noqa: E402
from pipeline.errors import cli  # noqa: E402
from pipeline.metrics import classification_report, confusion_matrix  # noqa: E402
from pipeline.model import load_artifact  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.runtime import eval_loader, make_accelerator, predict, say  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate the trained model on the Fashion-MNIST test set.")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--data", default="data/raw", help="folder with the four IDX files (default: %(default)s)")
    p.add_argument("--model-dir", default="models", help="model artifact folder (default: %(default)s)")
    p.add_argument("--out", default="metrics/test.json", help="metrics JSON to write (default: %(default)s)")
    p.add_argument(
        "--confusion", default="eval/confusion.json", help="confusion matrix counts to write (default: %(default)s)"
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="threads per process when running on CPU; 0 = the host's cores split across its processes "
        "(default: %(default)s). Results on CPU are bitwise reproducible for a fixed thread count.",
    )
    return p.parse_args(argv)


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    accelerator = make_accelerator(args.cpu_threads)
    model, model_cfg = load_artifact(args.model_dir)
    test = load_split(args.data, "test", params.data.subset)
    model, loader = accelerator.prepare(model, eval_loader(test, params.evaluate.batch_size))
    preds, labels, losses = predict(accelerator, model, loader)
    assert len(preds) == len(test), f"counted {len(preds)} predictions for {len(test)} test samples"

    cm = confusion_matrix(preds, labels, model_cfg.num_classes)
    report = classification_report(cm, CLASSES)
    metrics = {
        "accuracy": report["accuracy"],
        "loss": round(float(losses.double().mean()), 6),
        "samples": report["samples"],
        "per_class_accuracy": report["per_class_accuracy"],
    }
    if accelerator.is_main_process:
        write_json(args.out, metrics)
        write_json(
            args.confusion,
            {"classes": list(CLASSES), "rows": "true class", "columns": "predicted class", "counts": cm.tolist()},
        )
        worst = sorted(report["per_class_accuracy"].items(), key=lambda kv: kv[1])[:3]
        say(
            accelerator,
            f"test accuracy {metrics['accuracy']:.4f} loss {metrics['loss']:.4f} on {metrics['samples']} samples; "
            "worst classes: " + ", ".join(f"{k} {v:.3f}" for k, v in worst),
        )
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
