import hashlib
import json
import math
import re
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from pipeline import export
from pipeline.dataset import load_split
from pipeline.errors import PipelineError
from pipeline.model import WEIGHTS_FILE, ModelConfig, build_model, load_artifact, save_artifact
from pipeline.onnx_model import open_session, session_logits
from tests.conftest import REPO, sh


def trained_like(name: str, folder: Path) -> Path:
    """An artifact of model ``name`` whose BatchNorm statistics are far from a fresh model's (mean 0, var 1), so
    that an export that used batch statistics (train mode) instead of them would not match."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    save_artifact(model, ModelConfig(name=name), folder)
    return folder


def run_export(tmp_path: Path, raw: Path, model_dir: Path, params: Path) -> int:
    out, metrics = tmp_path / "onnx", tmp_path / "metrics" / "onnx.json"
    return export.main(export.command(params, raw, model_dir, out, metrics)[3:])


@pytest.mark.parametrize("name", ["tutorial_cnn", "bn_cnn", "resnet9", "quick_cnn", "quick_resnet9"])
def test_every_model_exports_and_matches_torch_on_every_test_image(tmp_path, tiny_raw, write_params, capsys, name):
    model_dir = trained_like(name, tmp_path / "models")
    assert run_export(tmp_path, tiny_raw, model_dir, write_params()) == 0
    spec = json.loads((tmp_path / "onnx" / "model.json").read_text())
    n = len(load_split(tiny_raw, "test"))
    assert spec["parity"]["images"] == spec["parity"]["same_class"] == n
    assert spec["parity"]["max_abs_logit_diff"] <= 1e-4
    assert spec["opset"] == 18 and spec["model"]["name"] == name
    assert spec["input"] | {"layout": ""} == {"name": "images", "shape": ["batch", 1, 28, 28], "dtype": "float32",
                                              "range": [0.0, 1.0], "layout": ""}  # fmt: skip
    assert spec["output"]["shape"] == ["batch", 10] and len(spec["output"]["classes"]) == 10
    assert spec["exporter"]["name"] == "torch.onnx.export(dynamo=True)"
    assert spec["source"]["md5"] == hashlib.md5((model_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    metrics = json.loads((tmp_path / "metrics" / "onnx.json").read_text())
    assert metrics == {"onnx": {"diff": pytest.approx(spec["parity"]["max_abs_logit_diff"], rel=1e-2)}}
    assert f"{n} of {n} test images same class" in capsys.readouterr().out


@pytest.mark.parametrize("batch", [1, 7, 300], ids=["one", "odd", "more-than-exported"])
def test_the_onnx_model_takes_any_batch_size(tmp_path, batch):
    model, cfg = load_artifact(trained_like("bn_cnn", tmp_path / "models"))
    model.eval()
    onnx_logits = session_logits(open_session(export.export_onnx(model, cfg).onnx))
    inputs = torch.rand(batch, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(onnx_logits(inputs), model(inputs), atol=1e-5)


def test_parity_counts_same_classes_and_the_largest_logit_gap():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    candidate = torch.tensor([[1.0, 0.5], [0.0, 1.25], [1.0, 2.0]])
    assert export.parity(reference, candidate) == export.Parity(images=3, same_class=2, max_abs_logit_diff=1.0)


@pytest.mark.parametrize(
    ("candidate", "said"),
    [([[1.0, 0.0], [0.0, 1.0 + 2e-4]], "2 of 2 test images get the same class, and logits differ by up to 0.0002"),
     ([[0.0, 1.0], [0.0, 1.0]], "1 of 2 test images get the same class, and logits differ by up to 1"),
     ([[1.0, 0.0], [0.0, math.nan]], "logits differ by up to nan")],
    ids=["gap", "class", "nan"],
)  # fmt: skip
def test_a_mismatch_is_one_line_naming_the_numbers_and_the_bound(candidate, said):
    got = export.parity(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor(candidate))
    with pytest.raises(PipelineError, match=re.escape(said) + r".*export\.max_logit_diff is 0\.0001\)") as info:
        export.refuse_mismatch(got, 1e-4, Path("models"))
    assert "\n" not in str(info.value)


def test_a_gap_within_the_bound_passes():
    got = export.parity(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 5e-5]]))
    export.refuse_mismatch(got, 1e-4, Path("models"))


def shifted_bias(exported: export.Exported) -> export.Exported:
    """``exported`` with the last layer's bias of class 0 raised by 100: the ONNX model predicts class 0 always."""
    proto = onnx.load_from_string(exported.onnx)
    (bias,) = [t for t in proto.graph.initializer if t.name.endswith("bias") and t.dims == [10]]
    values = numpy_helper.to_array(bias).copy()
    values[0] += 100
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    return export.Exported(proto.SerializeToString(), exported.opset)


def drifted(session):
    """onnxruntime's logits, each moved by 1e-3: every class the same, but ten times the bound apart."""
    logits = session_logits(session)
    return lambda inputs: logits(inputs) + 1e-3


def keeps_nothing_new(tmp_path: Path, capsys, said: str) -> None:
    """The export stopped with one line holding ``said``; the previous export and metrics are as they were."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err and "nothing written" in err, err
    assert (tmp_path / "onnx" / "model.onnx").read_bytes() == b"previous good export"
    assert (tmp_path / "metrics" / "onnx.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "metrics", "models", "onnx", "params.yaml"]


@pytest.mark.parametrize(
    ("tamper", "said"),
    [("export_onnx", "of 137 test images get the same class, and logits differ by up to 100"),
     ("session_logits", "137 of 137 test images get the same class, and logits differ by up to 0.001")],
    ids=["tampered-graph", "drifting-runtime"],
)  # fmt: skip
def test_an_onnx_model_that_does_not_match_torch_is_refused_and_the_last_export_kept(
    tmp_path, tiny_raw, write_params, capsys, monkeypatch, tamper, said
):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"previous good export")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "onnx.json").write_text("{}")
    real = getattr(export, tamper)
    wrong = {"export_onnx": lambda model, cfg: shifted_bias(real(model, cfg)), "session_logits": drifted}[tamper]
    monkeypatch.setattr(export, tamper, wrong)
    with pytest.raises(SystemExit) as info:
        run_export(tmp_path, tiny_raw, trained_like("tutorial_cnn", tmp_path / "models"), write_params())
    assert info.value.code == 2
    keeps_nothing_new(tmp_path, capsys, said)


def test_the_bound_comes_from_params(tmp_path, tiny_raw, write_params, capsys, monkeypatch):
    monkeypatch.setattr(export, "session_logits", drifted)
    model_dir = trained_like("tutorial_cnn", tmp_path / "models")
    assert run_export(tmp_path, tiny_raw, model_dir, write_params({"export": {"max_logit_diff": 2e-3}})) == 0
    assert json.loads((tmp_path / "metrics" / "onnx.json").read_text())["onnx"]["diff"] == pytest.approx(1e-3, 1e-2)


def test_a_subset_checks_that_many_test_images(tmp_path, tiny_raw, write_params):
    model_dir = trained_like("tutorial_cnn", tmp_path / "models")
    assert run_export(tmp_path, tiny_raw, model_dir, write_params({"data": {"subset": 50}})) == 0
    assert json.loads((tmp_path / "onnx" / "model.json").read_text())["parity"]["images"] == 50


def test_a_missing_model_folder_is_one_line_and_exit_2(tmp_path, tiny_raw, write_params):
    cmd = export.command(write_params(), tiny_raw, tmp_path / "models", tmp_path / "onnx", tmp_path / "onnx.json")
    proc = sh(REPO, *cmd, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: model config {tmp_path / 'models' / 'model.json'} is missing; run `dvc repro train`"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]


def test_an_export_without_onnxruntime_is_one_line(tmp_path, tiny_raw, write_params, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(SystemExit) as info:
        run_export(tmp_path, tiny_raw, trained_like("tutorial_cnn", tmp_path / "models"), write_params())
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: onnxruntime is not installed; pip install onnxruntime")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize(
    ("fault", "said"),
    [("old-torch", "the ONNX export needs torch >= 2.6 (torch.onnx.export(dynamo=True)); this is torch 2.5.1"),
     ("old-onnxscript", "cannot import onnxscript._framework_apis.torch_2_11; pip install -U onnxscript")],
)  # fmt: skip
def test_an_exporter_this_environment_lacks_is_one_line(monkeypatch, fault, said):
    if fault == "old-torch":
        monkeypatch.setattr(torch, "__version__", "2.5.1")
    else:
        missing = ModuleNotFoundError("No module named 'onnxscript._framework_apis.torch_2_11'")
        missing.name = "onnxscript._framework_apis.torch_2_11"
        monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: (_ for _ in ()).throw(missing))
    with pytest.raises(PipelineError, match=re.escape(said)):
        export.export_onnx(build_model(ModelConfig()), ModelConfig())


def test_the_exported_bytes_do_not_depend_on_where_the_repository_is_checked_out():
    from pipeline.model import ModelConfig, build_model

    exported = export.export_onnx(build_model(ModelConfig()), ModelConfig())
    assert export.STACK_TRACE.encode() not in exported.onnx and b'File "' not in exported.onnx
