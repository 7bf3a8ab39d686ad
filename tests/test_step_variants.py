"""The step variants the benchmark scripts time: what each changes, and that the timing script runs."""

import json
import subprocess
import sys

import torch
from torch import nn

from bench.step_variants import variant_model
from tests.conftest import REPO


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_relu_after_the_pool_is_the_same_function_with_the_same_gradients_bitwise():
    base, moved = variant_model("base"), variant_model("pool_first")
    kinds = [type(m).__name__ for m in moved.features]
    assert kinds[3:5] == ["MaxPool2d", "ReLU"] and kinds[-2:] == ["MaxPool2d", "ReLU"]  # both pairs swapped
    assert [type(m).__name__ for m in base.features][3:5] == ["ReLU", "MaxPool2d"]
    x = torch.rand(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    (out_a, grads_a), (out_b, grads_b) = outputs_and_grads(base, x), outputs_and_grads(moved, x)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_the_inplace_variant_puts_every_relu_in_place_and_computes_the_same():
    base, inplace = variant_model("base"), variant_model("inplace")
    relus = [m for m in inplace.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 6 and all(m.inplace for m in relus)
    assert not any(m.inplace for m in base.modules() if isinstance(m, nn.ReLU))
    x = torch.rand(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    assert torch.equal(base(x), inplace(x))


def test_the_timing_script_reports_each_variant_against_base(tmp_path):
    out = tmp_path / "variants.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.step_variants", "--variants", "base", "inplace", "pool_first",
         "--precisions", "fp32", "bf16", "--batch", "16", "--rounds", "2", "--steps", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    for precision in ("fp32", "bf16"):
        rows = report[precision]
        assert set(rows) == {"base", "inplace", "pool_first"}
        for row in rows.values():
            assert len(row["rounds"]) == 2 and row["samples_per_s"] > 0 and row["vs_base"] > 0
        assert rows["base"]["vs_base"] == 1.0
    assert report["machine"]["processor"] and "pool_first" in proc.stdout
