"""The optimizer, schedule, moving average and lookahead that the recipe's params ask for."""

import dataclasses

import pytest
import torch
from torch import nn

from pipeline.model import ModelConfig, build_model
from pipeline.recipe.optim import Lookahead, Muon, make_learner, make_optimizer, make_schedule, orthogonalise, triangle
from tests.conftest import default_params


def train_cfg(**changes):
    return dataclasses.replace(default_params().train, **changes)


def test_sgd_nesterov_is_sgd_with_nesterov_momentum_at_the_params_momentum():
    opt = make_optimizer(build_model(ModelConfig(name="bn_cnn")), train_cfg(optimizer="sgd_nesterov", momentum=0.85))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.85
    assert isinstance(make_optimizer(build_model(ModelConfig()), train_cfg()), torch.optim.AdamW)


def test_orthogonalise_pulls_the_singular_values_of_a_wide_or_tall_matrix_towards_one():
    torch.manual_seed(0)
    for shape in [(16, 144), (64, 32)]:
        matrix = torch.randn(shape) * torch.logspace(-1, 1, shape[1])  # columns over two decades
        values = torch.linalg.svdvals(orthogonalise(matrix))
        assert values.min() > 0.5 and values.max() < 1.3, values


def test_muon_orthogonalises_the_filters_after_the_first_and_steps_the_rest_with_nesterov_momentum():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="bn_cnn"))
    opt = make_optimizer(model, train_cfg(optimizer="muon", lr=0.1, momentum=0.5, bn_bias_lr_scale=4.0))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert isinstance(opt, Muon)
    orthogonal = {id(p) for g in opt.param_groups if g["orthogonal"] for p in g["params"]}
    assert orthogonal == {id(c.weight) for c in convs[1:]}  # the first convolution sees pixels: plain SGD
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.1, 0.1, 0.4])  # BN biases at 4x
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    opt.step()
    conv = convs[1].weight
    step = (before[id(conv)] - conv.detach()) / 0.1
    values = torch.linalg.svdvals(step.reshape(len(step), -1))
    assert values.min() > 0.5 and values.max() < 1.3  # an orthogonalised update, whatever the gradient's scale
    first = convs[0].weight  # Nesterov with an empty buffer: the step is lr * (1 + momentum) * gradient
    assert torch.allclose(before[id(first)] - first.detach(), 0.1 * 1.5 * grads[id(first)], atol=1e-6)
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["sgd_nesterov", "muon"])
def test_one_cycle_keeps_the_params_momentum_for_sgd_and_muon(optimizer):
    model = build_model(ModelConfig(name="bn_cnn"))
    cfg = train_cfg(optimizer=optimizer, momentum=0.7)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg, total_steps=20)
    for _ in range(10):
        opt.step()
        sched.step()
    assert {g["momentum"] for g in opt.param_groups} == {0.7}  # one-cycle cycles AdamW's beta1 only


def test_the_batchnorm_biases_get_their_own_learning_rate_and_no_weight_decay():
    model = build_model(ModelConfig(name="bn_cnn"))
    assert len(make_optimizer(model, train_cfg(weight_decay=0.1)).param_groups) == 1  # scale 1: one group
    opt = make_optimizer(model, train_cfg(bn_bias_lr_scale=64.0, weight_decay=0.1, lr=0.01))
    rest, biases = opt.param_groups
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    assert {id(p) for p in biases["params"]} == {id(m.bias) for m in norms} and norms
    assert biases["lr"] == pytest.approx(0.64) and biases["weight_decay"] == 0.0
    assert rest["lr"] == 0.01 and rest["weight_decay"] == 0.1
    sched = make_schedule(opt, train_cfg(bn_bias_lr_scale=64.0, lr=0.01), total_steps=100)
    for _ in range(25):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.64], rel=1e-3)  # each at its own peak


def test_the_triangular_schedule_rises_to_the_peak_at_a_quarter_then_falls_to_zero():
    factors = [triangle(step, total=100) for step in range(101)]
    assert factors[0] == pytest.approx(1 / 25) and factors[24] == 1.0 and factors[100] == 0.0
    assert all(a < b for a, b in zip(factors[:25], factors[1:25], strict=False))
    assert all(a > b for a, b in zip(factors[24:100], factors[25:101], strict=True))
    opt = make_optimizer(build_model(ModelConfig()), train_cfg(lr=0.1))
    sched = make_schedule(opt, train_cfg(lr=0.1, schedule="triangular"), total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 24


def test_lookahead_pulls_the_weights_to_the_slow_copy_every_k_steps():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    start = net.weight.detach().clone()
    ahead = Lookahead(net, decay=0.75, every=2)
    with torch.no_grad():
        net.weight.add_(1.0)
    ahead.update(net)  # step 1 of 2: nothing yet
    assert torch.equal(net.weight, start + 1)
    ahead.update(net)  # step 2: slow = start + 0.25 * (moved - start); the network goes there
    assert torch.allclose(net.weight, start + 0.25) and torch.equal(ahead.slow["weight"], net.weight.detach())
    again = Lookahead(nn.Linear(3, 2), decay=0.75, every=2)
    again.load_state_dict(ahead.state_dict())
    assert torch.equal(again.slow["weight"], ahead.slow["weight"]) and int(again.steps) == 2


def test_the_learner_holds_lookahead_only_when_asked():
    assert make_learner(build_model(ModelConfig()), train_cfg(), total_steps=10).lookahead is None
    learner = make_learner(build_model(ModelConfig()), train_cfg(lookahead=0.5, lookahead_every=4), total_steps=10)
    assert learner.lookahead is not None and (learner.lookahead.decay, learner.lookahead.every) == (0.5, 4)
