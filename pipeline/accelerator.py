"""Processes and devices: the Accelerator, CPU threads per process, a restarted group, the DVC queue's runs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from pipeline.errors import PipelineError
from pipeline.guard import LAUNCHER_VARS
from pipeline.watchdog import stall_timeout

# threads per process on CPU for runs DVC starts (a stage's command line cannot take them); unset, a run takes
# its share of the host's cores: split across its processes and, under `dvc queue start -j N`, the N workers
CPU_THREADS_VAR = "PIPELINE_CPU_THREADS"
QUEUE_WORKER = ["exp", "queue-worker"]  # how DVC runs each of a queue's workers: dvc exp queue-worker <node>


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
