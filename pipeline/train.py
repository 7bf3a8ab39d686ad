"""Train stage: ``python -m pipeline.launch -m pipeline.train [--params params.yaml] [--data data/raw] [...]``.

``pipeline.launch`` is ``accelerate launch`` with failures in one line; ``accelerate launch -m pipeline.train`` and
``torchrun -m pipeline.train`` work too, and ``python -m pipeline.train`` runs one process without a launcher. Reads the
``data``, ``model`` and ``train`` sections of params.yaml; writes the model artifact
(safetensors + JSON) and per-epoch DVCLive metrics.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    TorchDynamoPlugin,
    broadcast_object_list,
    set_seed,
)
from torch import nn

from pipeline.accelerator import env_count, make_accelerator
from pipeline.args import add_common_args, add_path_args
from pipeline.checkpoint import Checkpoint, Expected, TrainState, expected_of, restore
from pipeline.dataset import Split, load_split, train_val_split
from pipeline.errors import DVC_STAGE_VAR, DataError, PipelineError, cli
from pipeline.files import check_outputs
from pipeline.guard import Stopper, starters
from pipeline.inference import eval_loader
from pipeline.memory import activation_bytes, available_memory, check_batch_fits, out_of_memory
from pipeline.model import ModelConfig, build_model, save_artifact
from pipeline.params import MIXED_PRECISIONS, Params, TrainParams, load_params
from pipeline.provenance import RunKey, environment, run_key
from pipeline.recipe.init import dirac_init, whiten_init
from pipeline.recipe.optim import ONECYCLE_MIN_STEPS, Learner, make_learner
from pipeline.recipe.sampling import local_batch, steps_per_epoch
from pipeline.report import print_once, summary_table
from pipeline.runs import checkpoint_store, hold_run, open_run, remove_run
from pipeline.tracking import Tracker, log_with
from pipeline.trainer import Standing, TrainData, Trainer
from pipeline.watchdog import Heartbeat, stall_timeout


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the Fashion-MNIST CNN with Hugging Face Accelerate.")
    add_common_args(p)
    add_path_args(
        p,
        {"--model-dir": ("models", "where the model artifact goes"), "--live-dir": ("dvclive/train", "DVCLive metrics "
         "and plots"), "--checkpoint-dir": ("checkpoints", "training state, resumed after a kill")},
    )  # fmt: skip
    p.add_argument(
        "--fresh", action="store_true", help="remove this run's checkpoints and start from scratch (others are kept)"
    )
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the run's checkpoints after it finishes (default: removed once the model is written); a rerun of "
        "the same run then exports that state again without training",
    )
    return p.parse_args(argv)


def check_compiler(cfg: TrainParams) -> None:
    """torch.compile on CPU builds C++ kernels: stop up front, in one line, when there is no compiler."""
    if cfg.compile and not torch.cuda.is_available():
        if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c):
            raise PipelineError(
                "train.compile on CPU needs a C++ compiler and none was found (g++, clang++ or $CXX); "
                "install one (e.g. apt-get install g++) or set train.compile to false"
            )


def accelerator_options(cfg: TrainParams) -> dict:
    """Accelerator keyword arguments from the train params; params.yaml, not the launcher, sets the precision."""
    options: dict = {"mixed_precision": MIXED_PRECISIONS[cfg.mixed_precision]}
    if cfg.compile:
        options["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor")
    return options


def check_sizes(params: Params, train: Split, world: int) -> None:
    """Stop before training when the batch cannot be split or is larger than the data."""
    b, accum = params.train.batch_size, params.train.grad_accum
    local = local_batch(b, world)
    if local % accum:
        raise DataError(
            f"train.batch_size ({b}) over {world} process(es) is {local} per process, which must divide by "
            f"train.grad_accum ({accum}); change one of them"
        )
    if steps_per_epoch(len(train), b) == 0:
        raise DataError(
            f"train.batch_size ({b}) is larger than the {len(train)} training samples left after validation; "
            "lower it, or raise data.subset"
        )
    total = params.train.epochs * steps_per_epoch(len(train), b)
    if params.train.schedule == "onecycle" and total < ONECYCLE_MIN_STEPS:
        raise DataError(
            f"train.schedule onecycle needs at least {ONECYCLE_MIN_STEPS} optimizer steps and this run has {total} "
            "(train.epochs x steps per epoch); raise train.epochs, lower train.batch_size, or set train.schedule "
            "to triangular or constant"
        )


def check_step_fits(model: nn.Module, cfg: ModelConfig, train: TrainParams, accelerator: Accelerator) -> None:
    """Refuse a batch whose training step would not fit in the device's free memory, before the first step."""
    world, device = accelerator.num_processes, accelerator.device
    per_sample = activation_bytes(model, (cfg.in_channels, cfg.image_size, cfg.image_size), torch.device("cpu"))
    free = available_memory(device)
    if device.type == "cpu":  # the host's memory, shared by the processes it runs
        free //= env_count("LOCAL_WORLD_SIZE", world)
    micro = local_batch(train.batch_size, world) // train.grad_accum  # the samples one backward pass holds
    check_batch_fits(per_sample, micro, world, train.grad_accum, free, str(device))


def check_launcher_precision(cfg: TrainParams, env: Mapping[str, str] | None = None) -> None:
    """Refuse a launcher precision that params.yaml does not record (the launcher's ``no`` means: not set)."""
    launcher = (os.environ if env is None else env).get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", MIXED_PRECISIONS[cfg.mixed_precision]):
        ours = {v: k for k, v in MIXED_PRECISIONS.items()}.get(launcher, launcher)
        raise PipelineError(
            f"the launcher asks for mixed precision {launcher} (accelerate config or --mixed_precision) but "
            f"train.mixed_precision is {cfg.mixed_precision}; params.yaml records the precision, so set it there "
            f"(dvc exp run -S train.mixed_precision={ours}) and launch without it"
        )


def check_optimizer(cfg: TrainParams) -> None:
    """Refuse kernels the optimizer does not have: Muon has one implementation."""
    if cfg.optimizer == "muon" and cfg.optimizer_impl != "auto":
        raise PipelineError(
            f"train.optimizer muon has one implementation, so train.optimizer_impl {cfg.optimizer_impl} cannot "
            "apply; set train.optimizer_impl to auto"
        )


@dataclass(frozen=True)
class Paths:
    """Where the stage reads and writes (the command line's paths)."""

    data: Path
    model_dir: Path
    live_dir: Path
    checkpoint_dir: Path

    @classmethod
    def under(cls, out: Path, data: Path) -> Paths:
        """All of a run's outputs in one folder: ``out/models``, ``out/live``, ``out/checkpoints``."""
        return cls(Path(data), out / "models", out / "live", out / "checkpoints")


def command(params: Path, paths: Paths, launcher: Sequence[str] = (), *extra: str) -> list[str]:
    """This stage's command line, as dvc.yaml runs it: ``launcher -m pipeline.train`` (no launcher: this Python).

    ``launcher`` is e.g. ``["python", "-m", "pipeline.launch", "--num_processes", "2"]`` or ``["torchrun", ...]``;
    ``extra`` are more of this stage's flags (``--keep-state``, ``--cpu-threads 1``).
    """
    return [*(launcher or [sys.executable]), "-m", "pipeline.train", "--params", str(params),
            "--data", str(paths.data), "--model-dir", str(paths.model_dir), "--live-dir", str(paths.live_dir),
            "--checkpoint-dir", str(paths.checkpoint_dir), *extra]  # fmt: skip


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    paths = Paths(Path(args.data), Path(args.model_dir), Path(args.live_dir), Path(args.checkpoint_dir))
    check_outputs({"--model-dir": paths.model_dir, "--live-dir": paths.live_dir}, folders=("--model-dir", "--live-dir"))
    with Stopper(starters()):
        run(params, paths, args.cpu_threads, fresh=args.fresh, keep_state=args.keep_state)
    return 0


def run(params: Params, paths: Paths, cpu_threads: int, fresh: bool, keep_state: bool) -> None:
    """The whole stage: build, restore (or start), fit, export."""
    cfg = params.train
    check_compiler(cfg)
    check_optimizer(cfg)
    check_launcher_precision(cfg)
    accelerator = make_accelerator(cpu_threads, log_with=log_with(), **accelerator_options(cfg))
    store, why = checkpoint_store(paths.checkpoint_dir, Path.cwd(), os.environ)
    if why:
        print_once(accelerator, why)
    paths = replace(paths, checkpoint_dir=store)
    with ExitStack() as stack:
        heartbeat = stack.enter_context(Heartbeat.of_group(accelerator.process_index, accelerator.num_processes))
        try:
            train_and_export(accelerator, params, paths, fresh, keep_state, stack, heartbeat)
        except (RuntimeError, MemoryError) as e:
            reason = heartbeat.stalled(e, stall_timeout()) or out_of_memory(
                e, ("train.batch_size", cfg.batch_size), ("train.eval_batch_size", cfg.eval_batch_size)
            )
            if reason is None:
                raise
            raise reason from None


@dataclass
class Built:
    """What :func:`build` makes: the data, the run's key, and the unprepared model with its learner."""

    full: Split  # the training split before validation is carved out (for the sample grid)
    train: Split
    val: Split
    key: RunKey
    model_cfg: ModelConfig
    learner: Learner
    steps: int  # optimizer steps per epoch


def build(accelerator: Accelerator, params: Params, data: Path) -> Built:
    """Seed, read and split the data, and make the model, AdamW and the schedule (in that order: the RNG)."""
    cfg = params.train
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    set_seed(cfg.seed)
    full = load_split(data, "train", params.data.subset)
    train, val = train_val_split(full, params.data.val_size, params.data.split_seed)
    check_sizes(params, train, accelerator.num_processes)
    model_cfg = ModelConfig(name=params.model.name)
    model = build_model(model_cfg)
    if cfg.dirac_init:
        dirac_init(model)
    if cfg.whiten_init:
        whiten_init(model, train.images)
    check_step_fits(model, model_cfg, cfg, accelerator)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
    if cfg.channels_last:  # NHWC convolutions: faster on CPU (oneDNN) and on GPU tensor cores
        model = model.to(memory_format=torch.channels_last)
    steps = steps_per_epoch(len(train), cfg.batch_size)
    learner = make_learner(model, cfg, cfg.epochs * steps, accelerator.device)
    key = run_key(params, data, accelerator.num_processes)
    return Built(full, train, val, key, model_cfg, learner, steps)


def resume_or_start(
    accelerator: Accelerator,
    root: Path,
    key: RunKey,
    expected: Expected,
    fresh: bool,
    keep_runs: int,
    stack: ExitStack,
) -> tuple[Path, Checkpoint | None, list[str]]:
    """Pick the checkpoint to resume on the main process, holding the run's folder for the ``stack``'s life, and
    send it to all (no shared disk needed)."""
    found: list[object] = [root / key.fingerprint(), None, []]
    if accelerator.is_main_process:  # only the main process writes checkpoints; it holds the run's folder
        stack.enter_context(hold_run(root / key.fingerprint()))
        found = list(open_run(root, key, expected, fresh, keep_runs))
    if accelerator.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    return found[0], found[1], found[2]  # type: ignore[return-value]


def start_trainer(
    accelerator: Accelerator,
    built: Built,
    params: Params,
    paths: Paths,
    fresh: bool,
    stack: ExitStack,
    heartbeat: Heartbeat | None,
) -> Trainer:
    """Resume this run's newest fitting checkpoint, or start fresh; prepare; start tracking; return the trainer."""
    cfg, learner = params.train, built.learner
    expected = expected_of(learner, cfg.epochs, built.steps, built.key.fingerprint())
    run_dir, ckpt, notes = resume_or_start(
        accelerator, paths.checkpoint_dir, built.key, expected, fresh, cfg.keep_runs, stack
    )
    for note in notes:
        print_once(accelerator, note)
    standing = Standing(TrainState(fingerprint=built.key.fingerprint()))
    if ckpt is not None:
        standing = Standing(*restore(ckpt, learner))
        print_once(accelerator, resume_line(ckpt.path, standing.state, built.steps, cfg.epochs))
    # Not prepared: Accelerate would step the schedule once per process per step.
    val_loader = eval_loader(built.val, cfg.eval_batch_size)
    model, optimizer, val = accelerator.prepare(learner.model, learner.optimizer, val_loader)
    learner = replace(learner, model=model, optimizer=optimizer)
    data = TrainData(built.train.to(accelerator.device), val)  # the whole uint8 set on the device
    tracker = Tracker(accelerator, paths.live_dir, params)
    tracker.replay(standing.state.history)
    tracker.log_samples(built.full)
    print_once(accelerator, start_line(accelerator, built, cfg, run_dir))
    return Trainer(accelerator, learner, data, cfg, standing, run_dir, tracker, heartbeat)


def start_line(accelerator: Accelerator, built: Built, cfg: TrainParams, run_dir: Path) -> str:
    """What the run trains on, where, and how."""
    where = str(accelerator.device)
    if accelerator.device.type == "cpu":  # cpu, also where a multi-machine launch says cpu:0
        where = f"cpu ({torch.get_num_threads()} threads)"
    return (
        f"train: {len(built.train)} samples, val: {len(built.val)}, {accelerator.num_processes} process(es) on "
        f"{where}, {built.steps} steps/epoch of {cfg.batch_size}, mixed precision: {cfg.mixed_precision}, "
        f"run {run_dir}"
    )


def resume_line(path: Path | None, state: TrainState, steps: int, epochs: int) -> str:
    """What a resumed run says: where it goes on from, or that its training is done and only the export is left."""
    if state.epoch == epochs:
        return f"{path} is the end of this run's training, whose model was not written: exporting it, no training left"
    return f"resuming from {path} (epoch {state.epoch + 1}, step {state.step} of {steps})"


def export(trainer: Trainer, built: Built, model_dir: Path, keep_state: bool) -> tuple[int, float]:
    """Write the model artifact with its provenance (main process); returns (its epoch, its val accuracy)."""
    accelerator, cfg, state = trainer.accelerator, trainer.cfg, trainer.state
    accelerator.wait_for_everyone()
    use_best = cfg.final_model == "best"
    final_epoch = state.best_epoch if use_best else cfg.epochs - 1
    final_val = state.best_val if use_best else state.history[-1]["accuracy/val"]
    if accelerator.is_main_process:
        scored = trainer.learner.scored.state_dict()
        final = trainer.best if use_best and trainer.best is not None else scored
        out = build_model(built.model_cfg)
        out.load_state_dict(final)
        provenance = {"fingerprint": built.key.fingerprint(), **built.key.to_json()}
        provenance.update(environment(accelerator.device, accelerator.mixed_precision))
        extra = {"final_model": cfg.final_model, "epoch": final_epoch + 1, "val_accuracy": final_val,
                 "best_val_accuracy": state.best_val, "best_epoch": state.best_epoch + 1}  # fmt: skip
        save_artifact(out, built.model_cfg, model_dir, extra={**extra, "provenance": provenance})
        if not keep_state:  # the model is written, so the run's state is no longer needed
            remove_run(trainer.run_dir)
    trainer.tracker.end()
    return final_epoch, final_val


def next_step(model_dir: Path) -> str:
    """What to run next: under DVC the evaluate stage follows by itself; by hand, evaluate is the user's to run."""
    if os.environ.get(DVC_STAGE_VAR):
        return "the evaluate stage scores the test set; then dvc metrics show, dvc plots show"
    return f"python -m pipeline.evaluate --model-dir {model_dir} (test accuracy)"


def train_and_export(
    accelerator: Accelerator,
    params: Params,
    paths: Paths,
    fresh: bool,
    keep_state: bool,
    stack: ExitStack,
    heartbeat: Heartbeat | None = None,
) -> None:
    """Build, restore (or start), fit, export; then the summary."""
    cfg = params.train
    built = build(accelerator, params, paths.data)
    trainer = start_trainer(accelerator, built, params, paths, fresh, stack, heartbeat)
    start = time.perf_counter()
    for epoch in range(trainer.state.epoch, cfg.epochs):
        trainer.run_epoch(epoch)
    final_epoch, final_val = export(trainer, built, paths.model_dir, keep_state)
    state = trainer.state
    print_once(
        accelerator,
        summary_table(
            [
                ("best val accuracy", f"{state.best_val:.4f} (epoch {state.best_epoch + 1})"),
                ("model", f"{paths.model_dir}/ ({cfg.final_model} weights: epoch {final_epoch + 1}, "
                          f"val accuracy {final_val:.4f}; {accelerator.num_processes} process(es), "
                          f"{cfg.mixed_precision})"),
                ("time", f"{time.perf_counter() - start:.1f}s in this run"),
                ("artifacts", f"{paths.model_dir}/, {paths.live_dir}/ (metrics, curves, train_samples.png); "
                              f"{trainer.run_dir} {'kept' if keep_state else 'removed (finished)'}"),
                ("next", next_step(paths.model_dir)),
            ]
        ),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
