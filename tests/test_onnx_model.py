import json
import sys

import pytest
import torch
from onnx import TensorProto, helper

from pipeline.errors import ModelArtifactError, PipelineError
from pipeline.model import ModelConfig
from pipeline.onnx_model import io_spec, open_session, read_spec, session_logits, spec_path, write_onnx


def identity_onnx(input_name: str = "images", output_name: str = "logits") -> bytes:
    """A one-node ONNX model that hands its float (N, 10) input back."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 10])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", 10])
    graph = helper.make_graph([helper.make_node("Identity", [input_name], [output_name])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model.SerializeToString()


def written(tmp_path, onnx_bytes: bytes):
    classes = [f"c{i}" for i in range(10)]
    write_onnx(tmp_path / "onnx", onnx_bytes, {"model": {"name": "tutorial_cnn"}, **io_spec(ModelConfig(), classes)})
    return tmp_path / "onnx" / "model.onnx"


def test_a_written_model_runs_and_its_spec_reads_back(tmp_path):
    path = written(tmp_path, identity_onnx())
    assert spec_path(path) == tmp_path / "onnx" / "model.json"
    cfg, classes = read_spec(path)
    assert cfg == ModelConfig() and classes == [f"c{i}" for i in range(10)]
    inputs = torch.rand(3, 10)
    assert torch.equal(session_logits(open_session(path))(inputs), inputs)


@pytest.mark.parametrize(
    ("content", "said"),
    [(b"not a model", "onnxruntime cannot load {path} ("),
     (identity_onnx()[:40], "onnxruntime cannot load {path} ("),
     (identity_onnx("x"), "{path} maps ['x'] to ['logits'], not ['images'] to ['logits']")],
    ids=["garbage", "truncated", "other-input"],
)  # fmt: skip
def test_a_corrupt_or_foreign_onnx_file_is_one_line(tmp_path, content, said):
    path = written(tmp_path, content)
    with pytest.raises(ModelArtifactError, match=r"; re-export: dvc repro export$") as info:
        open_session(path)
    assert said.format(path=path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["missing", "folder"])
def test_a_missing_onnx_file_is_one_line(tmp_path, where):
    path = tmp_path / "model.onnx"
    if where == "folder":
        path.mkdir()
    said = "is not a file" if where == "folder" else "is missing"
    with pytest.raises(ModelArtifactError, match=rf"^ONNX model {path} {said}; re-export: dvc repro export$"):
        open_session(path)


@pytest.mark.parametrize(
    ("spec", "said"),
    [(None, "the spec of {onnx}, is missing"), ("{", "is not valid JSON"),
     ({"format": 2}, "is not a format-1 ONNX spec"),
     ({"format": 1, "model": {"image_size": 0}, "output": {"classes": []}}, "model.image_size must be 8 to 256"),
     ({"format": 1, "model": {}, "output": {"classes": ["a"]}}, "does not name its 10 classes")],
    ids=["missing", "not-json", "other-format", "bad-model", "no-classes"],
)  # fmt: skip
def test_a_bad_spec_is_one_line(tmp_path, spec, said):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(identity_onnx())
    if spec is not None:
        spec_path(onnx_path).write_text(spec if isinstance(spec, str) else json.dumps(spec))
    with pytest.raises(ModelArtifactError, match=r"; re-export: dvc repro export$") as info:
        read_spec(onnx_path)
    assert said.format(onnx=onnx_path) in str(info.value)


def test_without_onnxruntime_a_session_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(PipelineError, match=r"^onnxruntime is not installed; pip install onnxruntime"):
        open_session(written(tmp_path, identity_onnx()))


def test_the_io_spec_names_a_free_batch_axis_and_the_input_range():
    spec = io_spec(ModelConfig(image_size=32), ["x"] * 10)
    assert spec["input"]["shape"] == ["batch", 1, 32, 32] and spec["input"]["range"] == [0.0, 1.0]
    assert spec["output"]["shape"] == ["batch", 10]


def test_an_export_onnxruntime_cannot_load_blames_the_versions_not_the_file():
    with pytest.raises(ModelArtifactError, match=r"^onnxruntime cannot load the exported model \(.*try other torch"):
        open_session(b"not a model")


def test_an_input_the_model_does_not_take_is_one_line(tmp_path):
    logits = session_logits(open_session(written(tmp_path, identity_onnx())))
    with pytest.raises(ModelArtifactError, match=r"^onnxruntime cannot run the ONNX model on \(3, 5\) \(.*; re-export"):
        logits(torch.rand(3, 5))
