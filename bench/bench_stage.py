"""The benchmark's jobs that drive this project's train stage: speed options and whole recipes.

Each runs the real stage (``pipeline.train``, in a fresh process) on params made through the typed
loader, then reads the per-epoch rows and weights from the checkpoints it kept (``--keep-state``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

import torch

from bench.seed_loop import accuracy_on, sync
from pipeline.checkpoint import list_checkpoints, read_checkpoint
from pipeline.dataset import load_split, to_input
from pipeline.model import ModelConfig, build_model
from pipeline.params import ModelName, Params, TrainParams, load_params, read_yaml, save_params, with_changes
from pipeline.recipe.optim import ONECYCLE_MIN_STEPS
from pipeline.recipe.sampling import rank_batches
from pipeline.recipe.step import step_inputs
from pipeline.runs import list_runs
from pipeline.train import Paths, command

ROOT = Path(__file__).resolve().parents[1]
# --quick (a smoke run of every job, for tests): its sizes, in one place
QUICK = {"train": 1_200, "val": 200, "test": 500, "epochs": 2, "throughput": 1_000}


def recipe_params(recipe: str) -> Params:
    """params.yaml with ``recipes/<recipe>.yaml`` laid over it (``default``: params.yaml as is)."""
    layers = [] if recipe == "default" else [read_yaml(ROOT / "recipes" / f"{recipe}.yaml")]
    return load_params(ROOT / "params.yaml", *layers)


def launcher(processes: int) -> list[str]:
    """The stage's launcher for ``processes`` processes on this host (none for one), on a free port. Each takes
    the stage's default thread count: the host's cores split across them."""
    if processes == 1:
        return []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "pipeline.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(port)]  # fmt: skip


def train_stage(params: Params, data: Path, out: Path, processes: int = 1) -> list[Path]:
    """Run the train stage on ``params`` in fresh processes; returns the checkpoints it kept, oldest first."""
    save_params(params, out / "params.yaml")
    cmd = command(out / "params.yaml", Paths.under(out, data), launcher(processes), "--keep-state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}  # params decide, not the shell
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train stage failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")
    (run,) = list_runs(out / "checkpoints")
    return list_checkpoints(run)


def gpu_peak(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {"peak_gpu_mb": max(r["peak_gpu_memory_mb"] for r in rows)} if "peak_gpu_memory_mb" in rows[0] else {}


def run_option(
    data: Path, samples: int, option: dict[str, dict[str, Any]], seed: int, processes: int = 1
) -> dict[str, Any]:
    """Two epochs of ``samples`` training images under one speed option (``{section: {key: value}}`` laid over
    params.yaml), on ``processes`` processes; the second epoch is timed."""
    val = 500
    changes = {"data": {"subset": samples + val, "val_size": val}, "train": {"epochs": 2, "seed": seed}}
    params = with_changes(with_changes(recipe_params("default"), option), changes)
    if 2 * (samples // params.train.batch_size) < ONECYCLE_MIN_STEPS:  # a smoke run too short for one-cycle:
        params = with_changes(params, {"train": {"schedule": "constant"}})  # the schedule costs nothing to time
    with tempfile.TemporaryDirectory() as tmp:
        rows = read_checkpoint(train_stage(params, data, Path(tmp), processes)[-1]).state.history
        info = json.loads((Path(tmp) / "models" / "model.json").read_text())
    batch, made = params.train.batch_size, info["provenance"]
    return {
        "samples": (samples // batch) * batch,
        "samples_per_s": rows[-1]["samples_per_s"],
        "first_epoch_samples_per_s": rows[0]["samples_per_s"],
        **gpu_peak(rows),
        # how the stage says it ran
        "model": info["model"]["name"],
        "batch_size": made["params"]["train.batch_size"],
        "lr": made["params"]["train.lr"],
        "processes": made["processes"],
        "threads": made.get("cpu_threads"),
    }


def at_batch(cfg: TrainParams, batch: int) -> dict[str, Any]:
    """``cfg``'s train changes for global batch ``batch``: its learning rate scaled by the square root of the
    batch's growth (as Adam's noise scale suggests)."""
    return {"batch_size": batch, "lr": round(cfg.lr * math.sqrt(batch / cfg.batch_size), 6)}


SCALING_BATCHES = (64, 128, 256, 512, 1024)
# the scaling rows: the default recipe on 1 and on 2 processes (each with its share of the cores), then
# each model at each global batch
SCALING = ["1proc", "2proc"] + [f"{m}/b{b}" for m in get_args(ModelName) for b in SCALING_BATCHES]


def run_scaling(data: Path, samples: int, variant: str, seed: int) -> dict[str, Any]:
    """One scaling row (:data:`SCALING`): throughput as :func:`run_option` measures it."""
    if variant.endswith("proc"):
        return run_option(data, samples, {}, seed, processes=int(variant.removesuffix("proc")))
    model, batch = variant.split("/b")
    option = {"model": {"name": model}, "train": at_batch(recipe_params("default").train, int(batch))}
    return run_option(data, samples, option, seed)


def run_recipe(
    data: Path, recipe: str, seed: int, quick: bool, batch: int = 0, changes: dict | None = None, score_last: int = 0
) -> dict[str, Any]:
    """A whole recipe on the train stage (at global ``batch``, if given, with :func:`at_batch`'s learning rate;
    with ``changes`` ({section: {key: value}}) laid over it); the test accuracy of every epoch's checkpoint
    afterwards (not timed), or of the last ``score_last`` epochs' only (0: all), since scoring a long run with
    test-time augmentation takes longer than training it."""
    params = with_changes(recipe_params(recipe), changes or {})
    params = with_changes(params, {"train": at_batch(params.train, batch)}) if batch else params
    smoke = {"data": {"subset": QUICK["train"] + QUICK["val"], "val_size": QUICK["val"]},
             "train": {"epochs": min(QUICK["epochs"], params.train.epochs)}}  # fmt: skip
    params = with_changes(params, smoke) if quick else params
    epochs, tta = params.train.epochs, params.evaluate.tta
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
        for epoch, (path, row) in enumerate(zip(found, rows, strict=True), start=1):
            train_s += steps / row["samples_per_s"]
            if score_last and epoch <= epochs - score_last:
                continue
            model.load_state_dict(read_checkpoint(path).scored())
            accuracy = accuracy_on(model, test_x, test_y, tta)
            curve.append({"epoch": epoch, "train_s": round(train_s, 2), "test_accuracy": accuracy})
    return {
        "recipe": {"model": params.model.name, **dict(sorted(vars(params.train).items())), "tta": tta},
        "samples_per_s": round(epochs * steps / train_s, 1),
        "train_s": round(train_s, 2),
        "epochs": epochs,
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
        len(train),
        batch_size=cfg.batch_size,
        seed=0,
        epoch=0,
        max_shift=cfg.translate,
        cutout=cfg.cutout,
        device=device,
    )
    times = []
    for k, batch in enumerate(batches):
        if k == steps:
            break
        sync()
        t0 = time.perf_counter()
        step_inputs(train, batch, cfg)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"batch_size": cfg.batch_size, "data_ms_per_step": round(1000 * times[len(times) // 2], 3)}
