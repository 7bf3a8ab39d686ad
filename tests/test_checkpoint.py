import dataclasses
import json

import pytest
import torch
from torch import nn

from pipeline.checkpoint import (
    TrainState,
    clean_partial,
    fingerprint,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from pipeline.params import Params, TrainParams


def state(step: int, fp: str = "abc") -> TrainState:
    return TrainState(fingerprint=fp, epoch=step // 10, step=step % 10, global_step=step, sums=[1.5, 2.0, 3.0])


def save(root, step, fp="abc", keep=5):
    torch.manual_seed(step)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    return save_checkpoint(root, state(step, fp), model.state_dict(), model.state_dict(), opt.state_dict(),
                           sched.state_dict(), keep)  # fmt: skip


def with_train(**changes) -> Params:
    return dataclasses.replace(Params(), train=dataclasses.replace(TrainParams(), **changes))


def test_fingerprint_follows_training_params_only():
    base = fingerprint(Params())
    assert fingerprint(with_train(lr=0.005)) != base
    assert fingerprint(with_train(seed=1)) != base
    assert fingerprint(with_train(eval_batch_size=7, keep_checkpoints=9, checkpoint_every_steps=3)) == base


def test_round_trip_restores_every_part(tmp_path):
    path = save(tmp_path, 12)
    ckpt = read_checkpoint(path)
    assert path.name == "step-00000012"
    assert ckpt.state == state(12)
    assert set(ckpt.model) == {"weight", "bias"}
    assert ckpt.optimizer["state"][0]["step"] == 1
    assert ckpt.scheduler["total_steps"] == 10
    assert ckpt.rng.dtype == torch.uint8


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
    clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


@pytest.mark.parametrize("damage", ["truncate-weights", "drop-state", "garbage-state"])
def test_corrupt_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, damage):
    save(tmp_path, 4)
    newest = save(tmp_path, 8)
    if damage == "truncate-weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "drop-state":
        (newest / "state.json").unlink()
    else:
        (newest / "state.json").write_text("{not json")
    ckpt, notes = latest_checkpoint(tmp_path, "abc")
    assert ckpt is not None and ckpt.path.name == "step-00000004"
    assert len(notes) == 1 and "step-00000008 is unreadable" in notes[0] and "trying the previous one" in notes[0]


def test_pickled_objects_are_not_loaded(tmp_path):
    path = save(tmp_path, 2)
    torch.save({"state": {}, "param_groups": [], "evil": nn.Linear(1, 1)}, path / "optimizer.pt")
    ckpt, notes = latest_checkpoint(tmp_path, "abc")
    assert ckpt is None and "unreadable" in notes[0]  # weights_only=True refuses a pickled module


def test_other_params_mean_no_resume(tmp_path):
    save(tmp_path, 6, fp="old")
    ckpt, notes = latest_checkpoint(tmp_path, "new")
    assert ckpt is None
    assert notes == [
        f"checkpoint {tmp_path / 'step-00000006'} was made with other training params "
        "(fingerprint old != new); starting fresh"
    ]


def test_no_checkpoints_means_a_fresh_start_without_notes(tmp_path):
    assert latest_checkpoint(tmp_path / "absent", "abc") == (None, [])


def test_state_json_is_plain_json(tmp_path):
    path = save(tmp_path, 1)
    assert json.loads((path / "state.json").read_text())["global_step"] == 1
