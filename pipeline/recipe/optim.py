"""The optimizer, the learning-rate schedule, the moving average and lookahead of the weights, and the :class:`Learner`
that holds them with the model: everything a training step changes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import overload

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.params import TrainParams


def param_groups(model: nn.Module, cfg: TrainParams) -> list[dict]:
    """One group of every parameter; with ``cfg.bn_bias_lr_scale`` != 1, the BatchNorm biases in a group of their
    own at that multiple of the learning rate and with no weight decay (as airbench does)."""
    if cfg.bn_bias_lr_scale == 1:
        return [{"params": list(model.parameters())}]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    biases = {id(m.bias) for m in norms if m.bias is not None}
    scaled = [p for p in model.parameters() if id(p) in biases]
    rest = [p for p in model.parameters() if id(p) not in biases]
    return [{"params": rest}, {"params": scaled, "lr": cfg.lr * cfg.bn_bias_lr_scale, "weight_decay": 0.0}]


# Muon's Newton-Schulz iteration: its steps, and the quintic's coefficients (Keller Jordan's, as torch.optim.Muon's)
NEWTON_SCHULZ_STEPS = 5
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalise(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """About the nearest semi-orthogonal matrix to ``matrix``: Muon's Newton-Schulz iteration, in fp32. Singular
    values above about a hundredth of the largest end between 0.7 and 1.2; far smaller ones stay smaller."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.float() / (matrix.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum, whose update of each parameter in a group with ``orthogonal`` set is first
    reshaped to a matrix (out x in * kh * kw), orthogonalised and scaled by sqrt(max(1, rows / cols)): Muon.
    torch.optim.Muon takes 2-D parameters only, and the convolution filters are what Muon pays for here.
    Weight decay is decoupled: each step multiplies the weights by 1 - lr * weight_decay."""

    def __init__(self, groups: list[dict], lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "orthogonal": False})

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buffer = state["momentum_buffer"].mul_(momentum).add_(grad)
        update = grad.add(buffer, alpha=momentum)  # Nesterov
        if group["orthogonal"]:
            matrix = update.reshape(len(update), -1)
            scale = max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5
            update = (orthogonalise(matrix) * scale).reshape(p.shape).to(p.dtype)
        p.mul_(1 - lr * group["weight_decay"]).add_(update, alpha=-lr)


def muon_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """``groups`` with the filters of every convolution but the first (which sees raw pixels, as Muon's authors
    leave the first layer to a plain optimizer) moved to groups of their own that Muon orthogonalises."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    filters = {id(m.weight) for m in convs[1:]}
    out = []
    for group in groups:
        plain = [p for p in group["params"] if id(p) not in filters]
        mine = [p for p in group["params"] if id(p) in filters]
        out += [{**group, "params": plain}] + ([{**group, "params": mine, "orthogonal": True}] if mine else [])
    return out


def make_optimizer(model: nn.Module, cfg: TrainParams) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (AdamW, SGD with Nesterov momentum, or :class:`Muon`) with the kernels
    ``cfg.optimizer_impl`` asks for (auto: torch's own choice per device; Muon has one implementation)."""
    if cfg.optimizer == "muon":
        return Muon(muon_groups(model, param_groups(model, cfg)), cfg.lr, cfg.momentum, cfg.weight_decay)
    impl = cfg.optimizer_impl
    foreach = {"for_loop": False, "foreach": True}.get(impl)  # None: torch decides
    fused = True if impl == "fused" else None
    groups = param_groups(model, cfg)
    params = groups[0]["params"] if len(groups) == 1 else groups  # one group: the plain call, as before groups
    if cfg.optimizer == "sgd_nesterov":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=True,
            weight_decay=cfg.weight_decay,
            foreach=foreach,
            fused=fused,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach, fused=fused)


# torch's one-cycle warms up over 25 % of the steps less one, and divides by that: it needs 5 steps at least
ONECYCLE_MIN_STEPS = 5


def triangle(step: int, total: int, peak: float = 0.25) -> float:
    """The triangular schedule's factor at ``step`` of ``total``: linear up to 1 at ``peak`` of the steps, then
    linear down to 0 at the end."""
    top = max(1, round(peak * total))
    return (step + 1) / top if step < top else max(0.0, (total - step) / (total - top + 1))


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainParams, total_steps: int) -> LRScheduler:
    """The per-step learning-rate schedule ``cfg.schedule`` names, over ``total_steps`` optimizer steps."""
    if cfg.schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        max_lr = peaks[0] if len(peaks) == 1 else peaks
        return torch.optim.lr_scheduler.OneCycleLR(  # AdamW's beta1 cycles; SGD's and Muon's momentum is the param's
            optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=0.25, cycle_momentum=cfg.optimizer == "adamw"
        )
    if cfg.schedule == "triangular":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(triangle, total=total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def make_ema(model: nn.Module, cfg: TrainParams, device: torch.device | None = None) -> AveragedModel | None:
    """The moving average of ``model``'s weights and buffers that ``cfg.ema`` asks for (None when 0: off)."""
    if not cfg.ema:
        return None
    return AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


class Lookahead:
    """Slow weights: every ``every`` steps they move towards the network's by ``1 - decay``, and the network's
    floating-point weights and buffers are set to them (airbench's lookahead)."""

    def __init__(self, network: nn.Module, decay: float, every: int) -> None:
        self.decay, self.every = decay, every
        self.slow = {k: v.detach().clone() for k, v in network.state_dict().items() if v.is_floating_point()}
        self.steps = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """After an optimizer step: count it, and every ``every`` steps pull the network to the slow weights."""
        self.steps += 1
        if int(self.steps) % self.every:
            return
        for name, value in network.state_dict().items():
            if name in self.slow:
                self.slow[name].lerp_(value, 1 - self.decay)
                value.copy_(self.slow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"slow.{k}": v for k, v in self.slow.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.slow.items():
            v.copy_(state[f"slow.{k}"])
        self.steps.copy_(state["steps"])


@dataclass
class Learner:
    """What a training step changes: the model, its optimizer and schedule, and the moving average."""

    model: nn.Module  # the module the step runs: as Accelerate prepared it (DDP, autocast), or plain
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    ema: AveragedModel | None = None  # with train.ema: updated every step; validated, kept as best and exported
    lookahead: Lookahead | None = None  # with train.lookahead: the slow weights the network is pulled to

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
    lookahead = Lookahead(model, cfg.lookahead, cfg.lookahead_every) if cfg.lookahead else None
    schedule = make_schedule(optimizer, cfg, total_steps)
    return Learner(model, optimizer, schedule, make_ema(model, cfg, device), lookahead)
