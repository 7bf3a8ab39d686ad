"""Running out of memory is one line that names the param to lower.

Before the first step, :func:`check_batch_fits` measures one sample's activations (a forward pass of one image)
and refuses a batch whose step would not fit in the memory the device has free. A step that still runs out
(other programs took the memory meanwhile, or the measure was short) is told by :func:`out_of_memory`.
"""

from __future__ import annotations

import traceback

import psutil
import torch
from torch import nn

from pipeline.errors import PipelineError

# The failures of an allocation: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError.
CPU_OOM = ("can't allocate memory", "not enough memory", "DefaultCPUAllocator")
# A step keeps each activation for the backward pass and makes its gradient there, and the allocator and the
# optimizer want room beside them: three times the forward pass's outputs is the estimate (a lower bound is 2)
STEP_FACTOR = 3


def available_memory(device: torch.device) -> int:
    """Bytes free for this process's tensors on ``device``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def activation_bytes(model: nn.Module, image_shape: tuple[int, ...], device: torch.device) -> int:
    """The bytes of every module's output in a forward pass of one image of ``image_shape`` (C, H, W)."""
    total = 0

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


def check_batch_fits(per_sample: int, micro_batch: int, world: int, accum: int, free: int, where: str) -> None:
    """Refuse, before any step, a batch whose backward pass needs more than the ``free`` bytes on this process's
    device: ``micro_batch`` images at once, the global batch being ``micro_batch * accum * world``."""
    need = STEP_FACTOR * per_sample * micro_batch
    if need > free:
        raise PipelineError(
            f"a training step of {micro_batch} images per process (train.batch_size {micro_batch * accum * world} "
            f"over {world} process(es), train.grad_accum {accum}) needs about {_gib(need)} of activations, more "
            f"than the {_gib(free)} free on {where}; lower train.batch_size or raise train.grad_accum"
        )


def out_of_memory(error: BaseException, step: tuple[str, int], inference: tuple[str, int]) -> PipelineError | None:
    """The one-line error for an allocation that failed (None for any other error).

    ``step`` and ``inference`` name the params (and their values) whose batches a training step and a pass of
    :func:`pipeline.inference.predict` use; the failure's traceback tells which of the two ran out.
    """
    oom = isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
    oom = oom or (isinstance(error, RuntimeError) and any(s in str(error) for s in CPU_OOM))
    if not oom:
        return None
    in_predict = any(frame.name == "predict" for frame in traceback.extract_tb(error.__traceback__))
    knob, value = inference if in_predict else step
    return PipelineError(f"out of memory with {knob} {value}; lower {knob} (other programs may hold memory too)")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
