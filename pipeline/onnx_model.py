"""The ONNX model: ``model.onnx``, the JSON spec beside it, and running it with onnxruntime on the CPU.

The spec (``model.json`` beside ``model.onnx``) says what the file takes and gives: the opset, the input
(``images``: float32 (N, 1, 28, 28) in [0, 1], N free), the output (``logits``: float32 (N, 10)), the class
names, the architecture it was exported from, the exporter, the md5 of the source weights and the parity
measured when it was written. The export stage (pipeline/export.py) writes both; ``fashion-predict --onnx``
reads them and builds no torch model. onnxruntime is imported only here, and only when a model is run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import ModelArtifactError, ParamsError, PipelineError, path_problem
from pipeline.files import atomic_path
from pipeline.model import ModelConfig
from pipeline.params import typed

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

SPEC_FORMAT = 1
ONNX_FILE = "model.onnx"
SPEC_FILE = "model.json"
INPUT, OUTPUT = "images", "logits"  # the graph's input and output names
BATCH = "batch"  # the name of the free batch axis in both
REEXPORT = "re-export: dvc repro export"
UNLOADABLE_EXPORT = "the exporter wrote a model this onnxruntime cannot run: try other torch, onnxscript or onnxruntime"
Logits = Callable[[torch.Tensor], torch.Tensor]  # a model: float inputs (N, C, H, W) in [0, 1] -> logits (N, classes)


def io_spec(cfg: ModelConfig, classes: list[str]) -> dict[str, Any]:
    """The input and output of a model of architecture ``cfg``, as the spec records them."""
    size = cfg.image_size
    images = {"name": INPUT, "shape": [BATCH, cfg.in_channels, size, size], "dtype": "float32", "range": [0.0, 1.0],
              "layout": "NCHW, grey level / 255, light garment on black; the model standardises it itself"}  # fmt: skip
    logits = {"name": OUTPUT, "shape": [BATCH, cfg.num_classes], "dtype": "float32", "classes": classes}
    return {"input": images, "output": logits}


def write_onnx(out_dir: str | Path, onnx: bytes, spec: dict[str, Any]) -> None:
    """Write ``model.onnx`` and its spec into ``out_dir``, replacing the folder atomically."""
    with atomic_path(out_dir, folder=True, needs=len(onnx)) as tmp:
        (tmp / ONNX_FILE).write_bytes(onnx)
        (tmp / SPEC_FILE).write_text(json.dumps({"format": SPEC_FORMAT, **spec}, indent=2) + "\n")


def spec_path(onnx_path: str | Path) -> Path:
    """Where the spec of ``onnx_path`` lies: beside it, under the same name with ``.json``."""
    return Path(onnx_path).with_suffix(".json")


def read_spec(onnx_path: str | Path) -> tuple[ModelConfig, list[str]]:
    """The architecture an ONNX file was exported from (its input size) and its class names, from its spec."""
    path = spec_path(onnx_path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelArtifactError(f"{path}, the spec of {onnx_path}, is missing; {REEXPORT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelArtifactError(f"{path} is not valid JSON ({e}); {REEXPORT}") from None
    except OSError as e:
        raise ModelArtifactError(f"ONNX spec: {path_problem(e, 'pass another --onnx')}") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT or not isinstance(spec.get("model"), dict):
        raise ModelArtifactError(f"{path} is not a format-{SPEC_FORMAT} ONNX spec; {REEXPORT}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = typed(ModelConfig, {k: v for k, v in spec["model"].items() if k in known}, "model")
    except ParamsError as e:
        raise ModelArtifactError(f"{path}: {e}; {REEXPORT}") from None
    classes = spec.get("output", {}).get("classes") if isinstance(spec.get("output"), dict) else None
    if not isinstance(classes, list) or len(classes) != cfg.num_classes or not all(isinstance(c, str) for c in classes):
        raise ModelArtifactError(f"{path} does not name its {cfg.num_classes} classes; {REEXPORT}")
    return cfg, classes


def onnxruntime_error(e: Exception) -> str | None:
    """The first line of ``e`` if it is one of onnxruntime's own errors, else None. Its status codes
    (INVALID_PROTOBUF, FAIL, ...) are plain Exception subclasses of its extension module, so they can only be
    told by where they come from."""
    if not type(e).__module__.startswith("onnxruntime"):
        return None
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_session(onnx: bytes | Path) -> InferenceSession:
    """An onnxruntime session on the CPU for an ONNX model (a file, or the bytes an export just made), refused in
    one line if onnxruntime is missing or cannot load it, or if the model does not map :data:`INPUT` to
    :data:`OUTPUT`."""
    try:
        import onnxruntime
    except ImportError:
        raise PipelineError("onnxruntime is not installed; pip install onnxruntime (or pip install -e .)") from None
    fresh = isinstance(onnx, bytes)  # a file that does not load is re-exported; an export that does not, is not
    where, remedy = ("the exported model", UNLOADABLE_EXPORT) if fresh else (str(onnx), REEXPORT)
    if isinstance(onnx, Path) and not onnx.is_file():
        raise ModelArtifactError(f"ONNX model {onnx} {'is not a file' if onnx.exists() else 'is missing'}; {REEXPORT}")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would break the one-line output
    try:
        session = onnxruntime.InferenceSession(
            onnx if isinstance(onnx, bytes) else str(onnx), options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        said = onnxruntime_error(e)
        if said is None:
            raise
        raise ModelArtifactError(f"onnxruntime cannot load {where} ({said}); {remedy}") from None
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if names != ([INPUT], [OUTPUT]):
        raise ModelArtifactError(f"{where} maps {names[0]} to {names[1]}, not [{INPUT!r}] to [{OUTPUT!r}]; {remedy}")
    return session


def session_logits(session: InferenceSession) -> Logits:
    """``session`` as a function from float32 inputs (N, C, H, W) in [0, 1] to float32 logits (N, classes); an
    input the model does not take (a spec whose image size is not the file's) is one line."""

    def logits(inputs: torch.Tensor) -> torch.Tensor:
        try:
            (out,) = session.run([OUTPUT], {INPUT: inputs.detach().cpu().float().contiguous().numpy()})
        except Exception as e:
            said = onnxruntime_error(e)
            if said is None:
                raise
            raise ModelArtifactError(f"onnxruntime cannot run the ONNX model on {tuple(inputs.shape)} ({said}); "
                                     f"{REEXPORT}") from None  # fmt: skip
        return torch.from_numpy(out)

    return logits
