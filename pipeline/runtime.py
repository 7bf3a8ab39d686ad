"""Accelerate adapters shared by train and evaluate: process setup and distributed inference."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.batches import to_input
from pipeline.dataset import Split
from pipeline.errors import PipelineError
from pipeline.metrics import Predictions
from pipeline.params import TestTimeAugmentation
from pipeline.watchdog import stall_timeout

# threads per process on CPU for runs DVC starts (a stage's command line cannot take them); unset, a run takes
# its share of the host's cores: split across its processes and, under `dvc queue start -j N`, the N workers
CPU_THREADS_VAR = "PIPELINE_CPU_THREADS"
QUEUE_WORKER = ["exp", "queue-worker"]  # how DVC runs each of a queue's workers: dvc exp queue-worker <node>
# set by a launcher that starts the processes of a group: torchrun's elastic agent (also under accelerate
# launch), SLURM's srun, Open MPI's and MPICH's mpirun
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def add_path_args(p: argparse.ArgumentParser, paths: dict[str, tuple[str, str]]) -> None:
    """One ``--flag PATH`` argument per entry of ``paths`` (flag -> (default, what it holds))."""
    for flag, (default, what) in paths.items():
        p.add_argument(flag, default=default, help=f"{what} (default: %(default)s)")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The arguments every stage that runs a model shares: params file, data folder, CPU threads."""
    add_path_args(
        p, {"--params": ("params.yaml", "params file"), "--data": ("data/raw", "folder with the four IDX files")}
    )
    p.add_argument(
        "--cpu-threads",
        type=_thread_count,
        default=env_count(CPU_THREADS_VAR, 0),
        help=f"threads per process when running on CPU; 0 = the host's cores split across its processes and, "
        f"under `dvc queue start -j N`, the N runs side by side (default: ${CPU_THREADS_VAR}, else 0). "
        "Results on CPU are bitwise reproducible for a fixed thread count.",
    )


def _thread_count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no count") from None


def env_count(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    """The count (0 or more) the variable ``name`` holds, ``default`` when it is unset or empty; one line if not."""
    text = (os.environ if env is None else env).get(name, "")
    if text and not text.isdigit():
        raise PipelineError(f"{name}={text!r} is no count; set it to a whole number (0 or more), or unset it")
    return int(text) if text else default


def cpu_threads_for(requested: int, cpu_count: int | None, local_processes: int, runs: int = 1) -> int:
    """Threads per process: ``requested`` if > 0, else this host's cores split evenly across its processes
    and the ``runs`` side by side."""
    if requested > 0:
        return requested
    return max(1, (cpu_count or 1) // max(1, local_processes * runs))


def _queue_node(proc: psutil.Process) -> str | None:
    """The queue a DVC queue worker serves (``dvc-exp-<repo hash>``, from its node ``…-<n>@localhost``), else None."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return None
    at = next((i for i in range(len(cmd) - 2) if cmd[i : i + 2] == QUEUE_WORKER), None)
    return None if at is None else cmd[at + 2].split("@")[0].rsplit("-", 1)[0]


def queue_runs() -> int:
    """How many runs the DVC queue that started this process runs side by side (its live workers, the N of
    ``dvc queue start -j N``); 1 outside a queue."""
    queue = next((q for q in map(_queue_node, psutil.Process().parents()) if q), None)
    if queue is None:
        return 1
    return max(1, sum(1 for p in psutil.process_iter() if _queue_node(p) == queue))


def make_accelerator(cpu_threads: int = 0, **kwargs: Any) -> Accelerator:
    """An Accelerator on the GPU when there is one, else on CPU processes over gloo.

    On CPU, sets the intra-op thread count (``accelerate launch`` exports
    OMP_NUM_THREADS=1 unless told otherwise, which halves speed on a 2-core host).
    Stops with a clear message when a launcher started several processes that
    Accelerate cannot join (each would train alone on all the data).
    """
    if cpu_threads < 0:
        raise PipelineError(f"--cpu-threads must be 0 (auto) or a positive count, got {cpu_threads}")
    world = env_count("WORLD_SIZE", 1)
    if world > 1 and not any(os.environ.get(v) for v in LAUNCHER_VARS):
        raise PipelineError(
            f"WORLD_SIZE={world} is set but no launcher (torchrun, accelerate launch, srun, mpirun) started this "
            "process, so it would wait for peers that never come; start N processes with "
            "`accelerate launch --multi_gpu --num_processes N -m pipeline.train`, or unset WORLD_SIZE for one process"
        )
    timeout = stall_timeout()  # every collective waits at most this long for the rest of the group
    join_restarted_group(os.environ, timeout)
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=handlers, **kwargs)
    if accelerator.device.type == "cpu":
        if accelerator.mixed_precision == "fp16":
            raise PipelineError(
                "fp16 mixed precision needs a GPU (on CPU it would silently run in fp32); "
                "set train.mixed_precision (or accelerate's --mixed_precision) to bf16 or fp32"
            )
        local = env_count("LOCAL_WORLD_SIZE", accelerator.num_processes)
        runs = queue_runs() if cpu_threads == 0 else 1
        torch.set_num_threads(cpu_threads_for(cpu_threads, os.cpu_count(), local, runs))
    if world > 1 and accelerator.num_processes == 1:
        raise PipelineError(
            f"WORLD_SIZE={world} but Accelerate joined only 1 process, so each would train alone on all data; "
            "on a CPU-only host launch with `accelerate launch --multi_gpu --num_processes N` "
            "or `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N`"
        )
    return accelerator


def join_restarted_group(env: Mapping[str, str], timeout: timedelta) -> None:
    """After a restart by torchrun's elastic agent, join the process group under a store prefix of this attempt.

    The agent keeps one store across restarts, so a restarted group would find the dead attempt's peer
    addresses there and fail to connect ("Connection refused", pytorch/pytorch#167288). Accelerate then
    uses the group as it is. The first attempt, and any run not restarted, joins as Accelerate does.
    """
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or int(env.get("WORLD_SIZE", "1")) == 1 or torch.distributed.is_initialized():
        return
    store, rank, world = next(torch.distributed.rendezvous("env://"))
    torch.distributed.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        store=torch.distributed.PrefixStore(f"restart-{attempt}", store),
        rank=rank,
        world_size=world,
        timeout=timeout,
    )


def say(accelerator: Accelerator, message: str) -> None:
    """Print on the global main process only (``accelerator.print`` prints once per machine)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def summary_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns under a title, for the end of a stage."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(["summary"] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def eval_loader(split: Split, batch_size: int) -> DataLoader:
    """A loader over ``split`` (with sample indices) in its stored order; prepare it so each process gets a shard."""
    dataset = TensorDataset(torch.arange(len(split)), split.images, split.labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def logits_of(model: nn.Module, inputs: torch.Tensor, tta: TestTimeAugmentation = "none") -> torch.Tensor:
    """``model``'s float32 logits for ``inputs`` (N, C, H, W) under test-time augmentation ``tta``.

    ``flip`` averages them with the mirror image's; ``flip_shift`` (as airbench does) averages that half and half
    with the mean of the same for the image moved 1 px up-left and 1 px down-right (zero fill, as in training).
    """
    if tta == "none":
        return model(inputs).float()
    logits = (model(inputs).float() + model(inputs.flip(-1)).float()) / 2
    if tta == "flip_shift":
        moved = [logits_of(model, shifted(inputs, d), "flip") for d in (-1, 1)]
        logits = (logits + (moved[0] + moved[1]) / 2) / 2
    return logits


def shifted(inputs: torch.Tensor, d: int) -> torch.Tensor:
    """``inputs`` (N, C, H, W) moved by ``d`` pixels down and right (negative: up and left), filled with zeros."""
    padded = torch.nn.functional.pad(inputs, (abs(d),) * 4)
    h, w = inputs.shape[-2:]
    top = abs(d) - d
    return padded[..., top : top + h, top : top + w]


@torch.no_grad()
def predict(
    accelerator: Accelerator, model: nn.Module, loader: DataLoader, tta: TestTimeAugmentation = "none"
) -> Predictions:
    """Predictions for every sample exactly once, whatever the number of processes.

    ``loader`` must be prepared; ``gather_for_metrics`` drops the duplicates that pad
    the last batch across processes.
    """
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    for i, images, y in loader:
        logits = logits_of(model, to_input(images), tta)
        loss = nn.functional.cross_entropy(logits, y, reduction="none")
        confidence, p = logits.softmax(dim=1).max(dim=1)
        parts.append(tuple(t.cpu() for t in accelerator.gather_for_metrics((i, p, y, loss, confidence))))
    index, preds, labels, losses, confidence = (torch.cat(column) for column in zip(*parts, strict=True))
    order = index.argsort()
    return Predictions(preds[order], labels[order], losses[order], confidence[order])
