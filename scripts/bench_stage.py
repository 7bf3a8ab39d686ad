"""The benchmark's jobs that drive this project's train stage: speed options and whole recipes.

Each runs the real stage (``pipeline.train``, in a fresh process) on params made through the typed
loader, then reads the per-epoch rows and weights from the checkpoints it kept (``--keep-state``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.batches import augment, rank_batches, to_input
from pipeline.checkpoint import list_checkpoints, list_runs, read_checkpoint
from pipeline.dataset import load_split
from pipeline.model import ModelConfig, build_model
from pipeline.params import Params, load_params, read_yaml, save_params, with_changes
from pipeline.train import Paths, command
from scripts.seed_loop import accuracy_on, sync

ROOT = Path(__file__).resolve().parents[1]
# --quick (a smoke run of every job, for tests): its sizes, in one place
QUICK = {"train": 1_200, "val": 200, "test": 500, "epochs": 2, "throughput": 1_000}


def recipe_params(recipe: str) -> Params:
    """params.yaml with ``recipes/<recipe>.yaml`` laid over it (``default``: params.yaml as is)."""
    layers = [] if recipe == "default" else [read_yaml(ROOT / "recipes" / f"{recipe}.yaml")]
    return load_params(ROOT / "params.yaml", *layers)


def train_stage(params: Params, data: Path, out: Path) -> list[Path]:
    """Run the train stage on ``params`` in a fresh process; returns the checkpoints it kept, oldest first."""
    save_params(params, out / "params.yaml")
    cmd = command(out / "params.yaml", Paths.under(out, data), [], "--keep-state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}  # params decide, not the shell
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train stage failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")
    (run,) = list_runs(out / "checkpoints")
    return list_checkpoints(run)


def gpu_peak(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {"peak_gpu_mb": max(r["peak_gpu_memory_mb"] for r in rows)} if "peak_gpu_memory_mb" in rows[0] else {}


def run_option(data: Path, samples: int, train_changes: dict[str, Any], seed: int) -> dict[str, Any]:
    """Two epochs of ``samples`` training images under one speed option; the second epoch is timed."""
    val = 500
    params = with_changes(
        recipe_params("default"),
        {"data": {"subset": samples + val, "val_size": val}, "train": {"epochs": 2, "seed": seed, **train_changes}},
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = read_checkpoint(train_stage(params, data, Path(tmp))[-1]).state.history
    batch = params.train.batch_size
    return {
        "samples": (samples // batch) * batch,
        "samples_per_s": rows[-1]["samples_per_s"],
        "first_epoch_samples_per_s": rows[0]["samples_per_s"],
        **gpu_peak(rows),
    }


def run_recipe(data: Path, recipe: str, seed: int, quick: bool) -> dict[str, Any]:
    """A whole recipe on the train stage; the test accuracy of every epoch's checkpoint afterwards (not timed)."""
    params = recipe_params(recipe)
    smoke = {"data": {"subset": QUICK["train"] + QUICK["val"], "val_size": QUICK["val"]},
             "train": {"epochs": min(QUICK["epochs"], params.train.epochs)}}  # fmt: skip
    params = with_changes(params, smoke) if quick else params
    epochs = params.train.epochs
    params = with_changes(params, {"train": {"seed": seed, "keep_checkpoints": epochs, "checkpoint_every_steps": 0}})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = load_split(data, "test", QUICK["test"] if quick else 0)
    test_x, test_y = to_input(test.images).to(device), test.labels.to(device)
    train_n = len(load_split(data, "train", params.data.subset)) - params.data.val_size
    steps = (train_n // params.train.batch_size) * params.train.batch_size  # samples per epoch
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        found = train_stage(params, data, Path(tmp))
        wall = time.perf_counter() - t0
        rows = read_checkpoint(found[-1]).state.history
        model = build_model(ModelConfig(name=params.model.name)).to(device)
        curve, train_s = [], 0.0
        for path, row in zip(found, rows, strict=True):
            train_s += steps / row["samples_per_s"]
            model.load_state_dict(read_checkpoint(path).model)
            curve.append({"train_s": round(train_s, 2), "test_accuracy": accuracy_on(model, test_x, test_y)})
    return {
        "recipe": {"model": params.model.name, **dict(sorted(vars(params.train).items()))},
        "samples_per_s": round(epochs * steps / train_s, 1),
        "train_s": round(train_s, 2),
        "process_wall_s": round(wall, 1),
        "curve": curve,
        **gpu_peak(rows),
    }


def profile_data_path(data: Path, recipe: str, steps: int = 50) -> dict[str, Any]:
    """Milliseconds per global batch of the device data path alone (what the train loop does before forward)."""
    cfg = recipe_params(recipe).train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = load_split(data, "train").to(device)
    batches = rank_batches(
        len(train), cfg.batch_size, 0, 0, 0, 1, max_shift=cfg.translate, cutout=cfg.cutout, device=device
    )
    times = []
    for k, (idx, flip, shift, centers) in enumerate(batches):
        if k == steps:
            break
        sync()
        t0 = time.perf_counter()
        x = to_input(augment(train.images[idx], flip, shift, centers, cfg.hflip, cfg.translate, cfg.cutout))
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"batch_size": cfg.batch_size, "data_ms_per_step": round(1000 * times[len(times) // 2], 3)}
