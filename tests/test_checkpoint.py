import json
import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.checkpoint import (
    EpochSums,
    Expected,
    TrainState,
    capture,
    expected_of,
    latest_checkpoint,
    list_checkpoints,
    misfit,
    read_checkpoint,
    restore,
    resumable,
    save_checkpoint,
)
from pipeline.files import remove_partial
from pipeline.recipe.optim import Learner, Lookahead

EPOCHS, STEPS = 3, 10  # the run these checkpoints belong to: 3 epochs of 10 steps


def learner(seed: int = 0, width: int = 2, ema: float = 0.0) -> Learner:
    torch.manual_seed(seed)
    model = nn.Linear(3, width)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=EPOCHS * STEPS)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True) if ema else None
    return Learner(model, opt, sched, average)


def expected(width: int = 2, ema: float = 0.0) -> Expected:
    return expected_of(learner(width=width, ema=ema), EPOCHS, STEPS, "abc")


def trained(step: int, width: int = 2, ema: float = 0.0) -> Learner:
    """A learner after ``step`` optimizer and schedule steps."""
    learned = learner(step, width, ema)
    for _ in range(step):
        learned.model(torch.ones(1, 3)).sum().backward()
        learned.optimizer.step()
        learned.scheduler.step()
        learned.optimizer.zero_grad()
        if learned.ema is not None:
            learned.ema.update_parameters(learned.model)
    return learned


def state(step: int, fp: str = "abc") -> TrainState:
    epoch = step // STEPS
    history = [{"accuracy/val": 0.5}] * epoch
    return TrainState(fingerprint=fp, epoch=epoch, step=step % STEPS, global_step=step, sums=EpochSums(1.5, 2.0, 3.0),
                      history=history)  # fmt: skip


def save(run, step, keep=5, width=2):
    """A real checkpoint after ``step`` optimizer and schedule steps."""
    return save_checkpoint(run, capture(trained(step, width), state(step), best=None), keep)


def test_restore_puts_back_every_part_that_capture_took(tmp_path):
    source = trained(7, ema=0.9)
    before = torch.get_rng_state()
    path = save_checkpoint(tmp_path, capture(source, state(7), best=None), keep=2)
    torch.manual_seed(123)  # the RNG moves on; restore brings it back to the moment of the capture
    target = learner(seed=99, ema=0.9)
    got_state, best = restore(read_checkpoint(path), target)
    assert got_state == state(7) and torch.equal(torch.get_rng_state(), before)
    for a, b in ((source.model, target.model), (source.ema, target.ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert target.optimizer.state_dict()["state"][0]["step"] == 7 and target.scheduler.last_epoch == 7
    assert all(torch.equal(best[k], v) for k, v in source.ema.module.state_dict().items())  # the scored weights


def test_round_trip_restores_every_part(tmp_path):
    path = save(tmp_path, 12)
    ckpt = read_checkpoint(path)
    assert path.name == "step-00000012"
    assert ckpt.state == state(12)
    assert set(ckpt.model) == {"weight", "bias"}
    assert ckpt.optimizer["state"][0]["step"] == 12
    assert ckpt.scheduler["total_steps"] == EPOCHS * STEPS
    assert ckpt.rng.dtype == torch.uint8
    assert misfit(ckpt, expected()) is None


def test_a_moving_average_round_trips_and_must_be_there_exactly_when_the_run_keeps_one(tmp_path):
    learned = trained(3, ema=0.9)
    path = save_checkpoint(tmp_path, capture(learned, state(3), best=None), 5)
    ckpt = read_checkpoint(path)
    averaged = learned.ema.state_dict()
    assert ckpt.ema is not None and ckpt.ema.keys() == averaged.keys()
    assert all(torch.equal(ckpt.ema[k], v) for k, v in averaged.items())
    assert int(ckpt.ema["n_averaged"]) == 3
    scored = ckpt.scored()  # what the run scores and exports: the average, under the model's own names
    assert scored.keys() == learned.model.state_dict().keys()
    assert not torch.equal(scored["weight"], learned.model.weight.detach())
    with_ema = expected(ema=0.9)
    assert misfit(ckpt, with_ema) is None
    assert misfit(ckpt, expected()) == "it holds a moving average of the weights, which this run does not keep"
    plain = read_checkpoint(save(tmp_path / "plain", 3))
    assert plain.ema is None and plain.scored() is plain.model
    assert misfit(plain, with_ema) == "it holds no moving average of the weights (train.ema)"


def test_keep_last_k_counts_by_global_step_across_restarts(tmp_path):
    for step in (5, 10, 15):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000015"]
    save(tmp_path, 20, keep=2)  # a restarted run continues the numbering, so the newest is never the one dropped
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000015", "step-00000020"]


def test_interrupted_save_leaves_only_a_temp_folder_that_is_ignored_then_removed(tmp_path):
    save(tmp_path, 3)
    (tmp_path / ".tmp-killed").mkdir()
    (tmp_path / ".tmp-killed" / "model.safetensors").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]
    remove_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def fits(ckpt):
    return misfit(ckpt, expected())


@pytest.mark.parametrize("damage", ["truncate-weights", "drop-state", "garbage-state"])
def test_unreadable_newest_checkpoint_is_reported_removed_and_the_previous_used(tmp_path, damage):
    save(tmp_path, 4)
    newest = save(tmp_path, 8)
    if damage == "truncate-weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "drop-state":
        (newest / "state.json").unlink()
    else:
        (newest / "state.json").write_text("{not json")
    ckpt, notes = latest_checkpoint(tmp_path, fits)
    assert ckpt is not None and ckpt.path.name == "step-00000004"
    assert len(notes) == 1 and "step-00000008 cannot resume this run: it is unreadable" in notes[0]
    assert "\n" not in notes[0] and not newest.exists()  # said once: a rerun does not meet it again
    again, notes = latest_checkpoint(tmp_path, fits)
    assert again is not None and again.path == ckpt.path and notes == []


def _swap_weight(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    weights["weight"] = torch.zeros(5, 3)
    save_file(weights, str(path / "model.safetensors"))


def _optimizer_of_another_shape(path):
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    opt["state"][0]["exp_avg"] = torch.zeros(4, 4)
    torch.save(opt, path / "optimizer.pt")


def _position(**changes):
    def damage(path):
        raw = json.loads((path / "state.json").read_text())
        raw.update(changes)
        (path / "state.json").write_text(json.dumps(raw))

    return damage


def _rng(path):
    from safetensors.torch import save_file

    save_file({"cpu": torch.zeros(7, dtype=torch.uint8)}, str(path / "rng.safetensors"))


def _schedule_position(path):
    sched = torch.load(path / "scheduler.pt", weights_only=True)
    sched["last_epoch"] = 999
    torch.save(sched, path / "scheduler.pt")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_swap_weight, "its model tensor weight is (5, 3)"),
        (_optimizer_of_another_shape, "its optimizer exp_avg of parameter 0 is (4, 4), not (2, 3)"),
        (_position(step=STEPS), "its position (epoch 0, step 10, global step 8) is out of range"),
        (_position(epoch=-1), "its position (epoch -1, step 8, global step 8) is out of range"),
        (_position(epoch=EPOCHS, global_step=EPOCHS * STEPS + 8), "its position (epoch 3, step 8, global step 38) is"),
        (_position(global_step=3), "its position (epoch 0, step 8, global step 3) is out of range"),
        (_position(sums={"loss": 1.0, "correct": math.nan, "samples": 2.0}), "its history or running sums do not"),
        (_rng, "its RNG state is not a torch CPU generator state"),
        (_position(fingerprint="0123abcd"), "it was made by another run (0123abcd)"),
        (_schedule_position, "its schedule state is of another schedule or position"),
    ],
    ids=[
        "tensor-shape",
        "optimizer-shape",
        "step-range",
        "epoch-range",
        "past-the-end",
        "global-step",
        "sums",
        "rng",
        "other-run",
        "schedule",
    ],
)
def test_a_readable_checkpoint_that_does_not_fit_falls_back_to_the_previous_one(tmp_path, damage, reason):
    save(tmp_path, 4)
    newest = save(tmp_path, 8)
    damage(newest)
    ckpt, notes = latest_checkpoint(tmp_path, fits)
    assert ckpt is not None and ckpt.path.name == "step-00000004"
    assert len(notes) == 1 and reason in notes[0] and "trying the previous one" in notes[0]
    assert not newest.exists()


def test_checkpoints_of_another_model_width_all_fall_back_to_a_fresh_start(tmp_path):
    save(tmp_path, 4, width=5)
    save(tmp_path, 8, width=5)
    ckpt, notes = latest_checkpoint(tmp_path, fits)
    assert ckpt is None and len(notes) == 2 and list_checkpoints(tmp_path) == []


def test_pickled_objects_are_not_loaded(tmp_path):
    path = save(tmp_path, 2)
    torch.save({"state": {}, "param_groups": [], "evil": nn.Linear(1, 1)}, path / "optimizer.pt")
    ckpt, notes = latest_checkpoint(tmp_path, fits)
    assert ckpt is None and "unreadable" in notes[0]  # weights_only=True refuses a pickled module


def test_the_end_of_a_finished_run_resumes_so_that_its_model_is_exported_without_training(tmp_path):
    save(tmp_path, 20)
    save(tmp_path, EPOCHS * STEPS)  # the end of the last epoch
    ckpt, notes = resumable(tmp_path, expected())
    assert ckpt is not None and notes == []
    assert (ckpt.state.epoch, ckpt.state.step, ckpt.path.name) == (EPOCHS, 0, "step-00000030")


def test_no_checkpoints_means_a_fresh_start_without_notes(tmp_path):
    assert latest_checkpoint(tmp_path / "absent", fits) == (None, [])


def test_state_json_is_plain_json(tmp_path):
    path = save(tmp_path, 1)
    assert json.loads((path / "state.json").read_text())["global_step"] == 1


def test_lookahead_state_round_trips_and_must_be_there_exactly_when_the_run_keeps_one(tmp_path):
    learned = trained(2)
    learned.lookahead = Lookahead(learned.model, decay=0.5, every=2)
    for _ in range(2):
        learned.lookahead.update(learned.model)
    ckpt = read_checkpoint(save_checkpoint(tmp_path, capture(learned, state(2), best=None), 5))
    assert ckpt.lookahead is not None and int(ckpt.lookahead["steps"]) == 2
    assert torch.equal(ckpt.lookahead["slow.weight"], learned.lookahead.slow["weight"])
    fresh = learner()
    fresh.lookahead = Lookahead(fresh.model, decay=0.5, every=2)
    assert misfit(ckpt, expected_of(fresh, EPOCHS, STEPS, "abc")) is None
    assert misfit(ckpt, expected()) == "it holds lookahead's slow weights, which this run does not keep"


@pytest.mark.parametrize(
    "changes", [{"bn_bias_lr_scale": 8.0}, {"optimizer": "muon"}], ids=["bn-bias-group", "muon-groups"]
)
def test_a_checkpoint_of_an_optimizer_with_regrouped_parameters_fits_its_run(tmp_path, changes):
    # the optimizer's state dict numbers parameters group by group, not in the model's order: a BatchNorm-bias
    # group or Muon's filter groups put them out of that order, and the check must follow the optimizer's
    import dataclasses

    from pipeline.model import ModelConfig, build_model
    from pipeline.recipe.optim import make_learner
    from tests.conftest import default_params

    cfg = dataclasses.replace(default_params().train, schedule="triangular", **changes)

    def fresh() -> Learner:
        torch.manual_seed(0)
        return make_learner(build_model(ModelConfig(name="bn_cnn")), cfg, total_steps=EPOCHS * STEPS)

    learned = fresh()
    learned.model(torch.rand(4, 1, 28, 28)).sum().backward()
    learned.optimizer.step()
    learned.scheduler.step()
    ckpt = read_checkpoint(save_checkpoint(tmp_path, capture(learned, state(1), best=None), 5))
    assert misfit(ckpt, expected_of(fresh(), EPOCHS, STEPS, "abc")) is None
