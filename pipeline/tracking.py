"""Experiment tracking: DVCLive through Accelerate's tracker, a row per epoch, the summary and the sample grid.

Results (held-out loss and accuracy) go to ``metrics.json`` and the curves; :data:`TRACES` (how the fit went,
timings, the schedule) to the curves only, so that ``dvc metrics diff`` shows results alone. Without DVCLive
(a bare GPU image, say) training still runs and the rows are only printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import is_dvclive_available

from pipeline.dataset import CLASSES, Split
from pipeline.params import TRAIN_SECTIONS, Params, as_dict
from pipeline.plots import first_of_each_class, label_grid
from pipeline.report import print_once

# Logged per epoch into the curves (DVCLive's TSVs) but kept out of metrics.json: the training set's loss and
# accuracy are how the fit went, not a result; timings change on every run; lr only traces the schedule.
TRACES = frozenset({"loss/train", "accuracy/train", "lr", "epoch_time_s", "samples_per_s", "peak_gpu_memory_mb"})
PROJECT = "fashion-mnist"


def log_with() -> str | None:
    """The tracker to build the Accelerator with: DVCLive when it is installed."""
    return "dvclive" if is_dvclive_available() else None


def stage_params(params: Params) -> dict[str, Any]:
    """The params the train stage reads, flat (``"train.lr": 0.002``), as DVCLive records them beside the metrics."""
    return {f"{s}.{k}": v for s in TRAIN_SECTIONS for k, v in as_dict(getattr(params, s)).items()}


def forget(summary: dict, name: str) -> None:
    """Drop metric ``name`` from a DVCLive summary, which nests ``loss/train`` as ``summary["loss"]["train"]``."""
    *parents, leaf = name.split("/")
    for key in parents:
        summary = summary[key]
    summary.pop(leaf)


class Tracker:
    """One run's tracking: its params, one row per epoch (the epoch is the step, from 1), a grid of samples."""

    def __init__(self, accelerator: Accelerator, live_dir: Path, params: Params) -> None:
        self.accelerator = accelerator
        self.live = is_dvclive_available()  # else rows are only printed
        accelerator.init_trackers(
            PROJECT,
            config=stage_params(params),
            init_kwargs={"dvclive": {"dir": str(live_dir), "save_dvc_exp": False, "dvcyaml": None}},
        )
        if not self.live:
            print_once(accelerator, "dvclive is not installed: per-epoch metrics are printed, not written")

    def replay(self, history: list[dict[str, float]]) -> None:
        """Log again the rows of the epochs a resumed run did not see, so the curves start at epoch 1."""
        for epoch, row in enumerate(history, start=1):
            self.log_epoch(row, epoch)

    def log_samples(self, split: Split, per_class: int = 4) -> None:
        """A labelled grid of the first ``per_class`` training images of each class (``train_samples.png``)."""
        if self.live and self.accelerator.is_main_process:
            picks = first_of_each_class(split.images, split.labels, per_class=per_class)
            grid = label_grid(split.images[picks], [CLASSES[int(k)] for k in split.labels[picks]], cols=8)
            self.accelerator.get_tracker("dvclive", unwrap=True).log_image("train_samples.png", grid)

    def log_epoch(self, row: dict[str, float], epoch: int) -> None:
        """One epoch's row: results to metrics.json and the curves, :data:`TRACES` to the curves only."""
        if self.live and self.accelerator.is_main_process:
            live = self.accelerator.get_tracker("dvclive", unwrap=True)
            live.step = epoch
            for name in sorted(TRACES & row.keys()):
                live.log_metric(name, row[name])
                forget(live.summary, name)
        self.accelerator.log({k: v for k, v in row.items() if k not in TRACES}, step=epoch)

    def end(self) -> None:
        """Write the summary (metrics.json) and close the trackers."""
        self.accelerator.end_training()
