"""The training step: one function that every caller runs, and what it does to a learner."""

import dataclasses
import re

import torch

from pipeline.dataset import Split
from pipeline.model import ModelConfig, build_model
from pipeline.recipe.optim import make_learner
from pipeline.recipe.sampling import rank_batches
from pipeline.recipe.step import SUM_CORRECT, SUM_LOSS, SUM_SAMPLES, new_sums, step_inputs, train_step
from tests.conftest import REPO, default_params

# the one step, and the seed tutorial's loop (the baseline, its own step on purpose)
STEPPERS = {"pipeline/recipe/step.py", "bench/seed_loop.py"}
OPTIMIZER_STEP = re.compile(r"\b\w*opt\w*\.step\(")  # optimizer.step(, self.optimizer.step(, opt.step(


def tiny_data(n: int = 64) -> Split:
    gen = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen), torch.arange(n) % 10)


def test_only_the_step_module_and_the_seed_loop_step_an_optimizer():
    callers = {
        str(path.relative_to(REPO))
        for folder in ("pipeline", "bench", "scripts")
        for path in (REPO / folder).rglob("*.py")
        if OPTIMIZER_STEP.search(path.read_text())
    }
    assert callers == STEPPERS


def test_a_step_moves_the_weights_the_schedule_and_adds_the_batch_to_the_sums():
    cfg = default_params().train
    data = tiny_data()
    learner = make_learner(build_model(ModelConfig()), cfg, total_steps=10)
    before = [p.detach().clone() for p in learner.network.parameters()]
    sums = new_sums()
    batch = next(rank_batches(len(data), batch_size=16, seed=0, epoch=0))
    loss = train_step(learner, data, batch, cfg, sums)
    assert torch.isfinite(loss) and learner.scheduler.last_epoch == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, learner.network.parameters(), strict=True))
    assert sums[SUM_SAMPLES] == 16 and 0 <= sums[SUM_CORRECT] <= 16
    assert torch.isclose(sums[SUM_LOSS] / 16, loss.double(), rtol=1e-6)  # no label smoothing: the same loss
    assert all(p.grad is None for p in learner.network.parameters())  # the gradients are cleared for the next


def test_the_data_path_applies_the_batchs_draws_in_the_layout_the_recipe_asks_for():
    cfg = dataclasses.replace(default_params().train, hflip=True, channels_last=True)
    data = tiny_data()
    batch = next(rank_batches(len(data), batch_size=8, seed=0, epoch=0))
    inputs, labels = step_inputs(data, batch, cfg)
    assert inputs.shape == (8, 1, 28, 28) and inputs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(labels, data.labels[batch.indices])
    flipped = batch.flip.nonzero().flatten()
    assert len(flipped) and torch.equal(inputs[flipped[0], 0], data.images[batch.indices[flipped[0]]].flip(-1) / 255)


def test_a_moving_average_follows_every_step():
    cfg = dataclasses.replace(default_params().train, ema=0.5)
    data = tiny_data()
    learner = make_learner(build_model(ModelConfig()), cfg, total_steps=10)
    assert learner.ema is not None and learner.scored is learner.ema.module
    for batch in rank_batches(len(data), batch_size=16, seed=0, epoch=0):
        train_step(learner, data, batch, cfg)
    assert int(learner.ema.n_averaged) == 4
