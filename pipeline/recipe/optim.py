"""The optimizer, the learning-rate schedule and the moving average of the weights, and the :class:`Learner`
that holds them with the model: everything a training step changes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.params import TrainParams


def make_optimizer(model: nn.Module, cfg: TrainParams) -> torch.optim.Optimizer:
    """AdamW with the kernels ``cfg.optimizer_impl`` asks for (auto: torch's own choice per device)."""
    impl = cfg.optimizer_impl
    foreach = {"for_loop": False, "foreach": True}.get(impl)  # None: torch decides
    fused = True if impl == "fused" else None
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach, fused=fused)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainParams, total_steps: int) -> LRScheduler:
    """The per-step learning-rate schedule ``cfg.schedule`` names, over ``total_steps`` optimizer steps."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.25)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def make_ema(model: nn.Module, cfg: TrainParams, device: torch.device | None = None) -> AveragedModel | None:
    """The moving average of ``model``'s weights and buffers that ``cfg.ema`` asks for (None when 0: off)."""
    if not cfg.ema:
        return None
    return AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


@dataclass
class Learner:
    """What a training step changes: the model, its optimizer and schedule, and the moving average."""

    model: nn.Module  # the module the step runs: as Accelerate prepared it (DDP, autocast), or plain
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    ema: AveragedModel | None = None  # with train.ema: updated every step; validated, kept as best and exported

    @cached_property
    def network(self) -> nn.Module:
        """The model without Accelerate's wrappers: the parameters the optimizer changes."""
        return extract_model_from_parallel(self.model, keep_torch_compile=False)

    @property
    def scored(self) -> nn.Module:
        """The model that is validated and exported: the moving average with train.ema on, else the network."""
        return self.network if self.ema is None else self.ema.module


def make_learner(model: nn.Module, cfg: TrainParams, total_steps: int, device: torch.device | None = None) -> Learner:
    """``model`` with AdamW, the schedule over ``total_steps`` and the moving average ``cfg`` asks for."""
    optimizer = make_optimizer(model, cfg)
    return Learner(model, optimizer, make_schedule(optimizer, cfg, total_steps), make_ema(model, cfg, device))
