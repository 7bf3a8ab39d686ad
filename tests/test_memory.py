"""pipeline.memory: a batch that does not fit is refused before the first step; running out is one line."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.memory import STEP_FACTOR, activation_bytes, check_batch_fits, out_of_memory
from pipeline.model import ModelConfig, build_model
from pipeline.train import main
from tests.conftest import reset_accelerate_state


def test_activation_bytes_count_every_layers_output_for_one_image():
    model = build_model(ModelConfig(name="tutorial_cnn"))
    # conv, relu, conv, relu, pool, conv, relu, conv, relu, pool; linear, relu, linear, relu, linear (fp32)
    outputs = [16 * 26 * 26] * 2 + [16 * 24 * 24] * 2 + [16 * 12 * 12] + [32 * 8 * 8] * 2 + [32 * 4 * 4] * 2
    outputs += [32 * 2 * 2, 256, 256, 128, 128, 10]
    assert activation_bytes(model, (1, 28, 28), torch.device("cpu")) == 4 * sum(outputs)
    assert model.training  # left as it was


def test_a_batch_whose_step_needs_more_than_the_free_memory_is_refused_naming_the_param():
    check_batch_fits(per_sample=1000, micro_batch=64, world=2, accum=1, free=STEP_FACTOR * 1000 * 64, where="cpu")
    with pytest.raises(PipelineError, match=r"^a training step of 64 images per process \(train.batch_size 256 over "
                       r"2 process\(es\), train.grad_accum 2\) needs about 0.5 GiB of activations, more than the 0.1 "
                       r"GiB free on cuda:0; lower train.batch_size or raise train.grad_accum"):  # fmt: skip
        check_batch_fits(per_sample=2**30 // 384, micro_batch=64, world=2, accum=2, free=2**30 // 10, where="cuda:0")


def allocate_too_much() -> None:
    torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator's own failure


def predict() -> None:  # named as pipeline.inference.predict: the failure comes from inference
    allocate_too_much()


@pytest.mark.parametrize(
    ("where", "knob"), [(allocate_too_much, "train.batch_size 128"), (predict, "train.eval_batch_size 1000")],
    ids=["training-step", "validation"],
)  # fmt: skip
def test_an_allocation_that_fails_is_one_line_naming_the_batch_param_in_use(where, knob):
    with pytest.raises(RuntimeError) as caught:
        where()
    told = out_of_memory(caught.value, ("train.batch_size", 128), ("train.eval_batch_size", 1000))
    name = knob.split()[0]
    assert str(told) == f"out of memory with {knob}; lower {name} (other programs may hold memory too)"
    assert out_of_memory(RuntimeError("a bug"), ("a", 1), ("b", 2)) is None


def test_train_refuses_a_batch_that_does_not_fit_before_writing_anything(
    tmp_path, tiny_raw, write_params, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("pipeline.train.available_memory", lambda device: 2**20)  # a device with 1 MiB free
    with pytest.raises(SystemExit) as failed:
        main(["--params", str(write_params()), "--data", str(tiny_raw), "--model-dir", str(tmp_path / "models"),
              "--live-dir", str(tmp_path / "live"), "--checkpoint-dir", str(tmp_path / "checkpoints")])  # fmt: skip
    reset_accelerate_state()
    assert failed.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a training step of 20 images per process (train.batch_size 20 over 1 process(es), ")
    assert err.count("\n") == 1 and not (tmp_path / "models").exists() and not (tmp_path / "live").exists()
