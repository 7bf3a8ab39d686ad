"""Export stage: ``python -m pipeline.export [--model-dir models] [--out onnx] [--metrics metrics/onnx.json]``.

Writes the trained model as ONNX, ``onnx/model.onnx``, with its spec beside it (``onnx/model.json``: opset,
input and output, class names, exporter, the source weights' md5 and the parity below), once the ONNX model
has proved itself on every test image (the first ``data.subset``, if set): run by onnxruntime and by torch,
both in fp32 on the CPU, it must give each image the same class, with no logit more than
``export.max_logit_diff`` apart. A model that fails writes nothing: the last good export stays. The largest
logit difference goes to ``metrics/onnx.json``. Reads only ``data.subset`` and ``export`` from params.yaml;
the model comes from its artifact alone (models/).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.dataset import load_split, to_input
from pipeline.errors import PipelineError, cli
from pipeline.files import check_outputs, write_json
from pipeline.model import WEIGHTS_FILE, ModelConfig, artifact_info, load_artifact
from pipeline.onnx_model import (
    BATCH,
    INPUT,
    ONNX_FILE,
    OUTPUT,
    Logits,
    io_spec,
    open_session,
    session_logits,
    write_onnx,
)
from pipeline.params import load_params
from pipeline.report import summary_table

# the opset torch's exporter writes its ops in (onnxscript's torchlib), so no op is converted to another
# version on the way; onnxruntime runs it since 1.14
OPSET = 18
# torch.export captures the graph, onnxscript translates it: torch's default exporter since 2.9, where the
# TorchScript one (dynamo=False) is deprecated; 2.6 is the first torch whose dynamo=True path is this one
EXPORTER = "torch.onnx.export(dynamo=True)"
EXPORTER_TORCH = (2, 6)
PARITY_BATCH = 1000  # test images per forward pass in the parity check: bounds memory, changes no result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export the trained model to ONNX, checked on every test image.")
    paths = {"--params": ("params.yaml", "params file"), "--data": ("data/raw", "folder with the four IDX files"),
             "--model-dir": ("models", "model artifact folder"),
             "--out": ("onnx", f"folder to write {ONNX_FILE} and its spec model.json into"),
             "--metrics": ("metrics/onnx.json", "parity metrics JSON to write")}  # fmt: skip
    for flag, (default, what) in paths.items():
        p.add_argument(flag, type=Path, default=Path(default), help=f"{what} (default: %(default)s)")
    return p.parse_args(argv)


def command(params: Path, data: Path, model_dir: Path, out: Path, metrics: Path, *extra: str) -> list[str]:
    """This stage's command line, as dvc.yaml runs it."""
    return [sys.executable, "-m", "pipeline.export", "--params", str(params), "--data", str(data),
            "--model-dir", str(model_dir), "--out", str(out), "--metrics", str(metrics), *extra]  # fmt: skip


@dataclass(frozen=True)
class Exported:
    """An exported model, as bytes, and the opset they declare."""

    onnx: bytes  # the serialised ModelProto
    opset: int  # of the default (ai.onnx) domain, as the file declares it


def export_onnx(model: nn.Module, cfg: ModelConfig) -> Exported:
    """``model`` as ONNX: input :data:`INPUT` float32 (N, C, H, W), N free; output :data:`OUTPUT` (N, classes)."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < EXPORTER_TORCH:
        needs = ".".join(map(str, EXPORTER_TORCH))
        raise PipelineError(f"the ONNX export needs torch >= {needs} ({EXPORTER}); this is torch {torch.__version__}")
    example = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)  # 2: torch.export fixes a batch of 1
    try:
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim(BATCH)},), verbose=False,
        )  # fmt: skip
    except ImportError as e:  # onnxscript missing, or too old for this torch (a submodule it lacks)
        package = (e.name or "onnxscript").split(".")[0]
        raise PipelineError(
            f"torch {torch.__version__}'s ONNX exporter cannot import {e.name}; pip install -U {package} "
            "(or pip install -e .)"
        ) from None
    assert program is not None, "torch.onnx.export(dynamo=True) returns its ONNXProgram"
    proto = program.model_proto
    without_source_paths(proto)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return Exported(proto.SerializeToString(), opset)


STACK_TRACE = "pkg.torch.onnx.stack_trace"  # per node: the Python source lines, with the checkout's absolute path


def without_source_paths(proto: Any) -> None:
    """Drop each node's stack trace, so that the file's bytes do not depend on where the repository is checked
    out (an export in another clone would otherwise be another file)."""
    graphs = [proto.graph, *(function for function in proto.functions)]
    for graph in graphs:
        for node in graph.node:
            kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def logits_on(logits: Logits, images: torch.Tensor) -> torch.Tensor:
    """float32 ``logits`` (N, classes) of uint8 ``images`` (N, H, W), a batch of :data:`PARITY_BATCH` at a time."""
    with torch.no_grad():
        return torch.cat([logits(to_input(images[i : i + PARITY_BATCH])).float()
                          for i in range(0, len(images), PARITY_BATCH)])  # fmt: skip


@dataclass(frozen=True)
class Parity:
    """How closely one model's logits follow another's on the same images."""

    images: int
    same_class: int  # images whose top class is the same in both
    max_abs_logit_diff: float  # over every image and class; NaN if either gave a NaN


def parity(reference: torch.Tensor, candidate: torch.Tensor) -> Parity:
    """Compare ``candidate`` logits (N, classes) with ``reference``'s."""
    same = int((reference.argmax(dim=1) == candidate.argmax(dim=1)).sum())
    diff = (reference.double() - candidate.double()).abs().max()  # NaN in, NaN out: max propagates it
    return Parity(len(reference), same, float(diff))


def refuse_mismatch(got: Parity, bound: float, model_dir: Path) -> None:
    """Stop, in one line, unless every image got the same class and no logit is more than ``bound`` apart."""
    if got.same_class == got.images and got.max_abs_logit_diff <= bound:  # a NaN difference fails the second test
        return
    raise PipelineError(
        f"the ONNX export of {model_dir}/ does not match its torch model: {got.same_class} of {got.images} test "
        f"images get the same class, and logits differ by up to {got.max_abs_logit_diff:.3g} (export.max_logit_diff "
        f"is {bound:g}); nothing written. If every class agrees and the gap is rounding, raise export.max_logit_diff "
        "in params.yaml; else try other torch, onnxscript or onnxruntime versions"
    )


def exporter() -> dict[str, str]:
    """The exporter, why, and the versions that wrote and checked the file."""
    import onnxruntime
    import onnxscript

    why = "torch's default since 2.9 (a torch.export graph, translated by onnxscript); TorchScript's is deprecated"
    return {"name": EXPORTER, "why": why, "torch": torch.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__}  # fmt: skip


def spec(cfg: ModelConfig, model_dir: Path, exported: Exported, got: Parity, bound: float) -> dict[str, Any]:
    """The ONNX file's spec (onnx_model.SPEC_FILE): what it takes and gives, whence it came, how it was checked."""
    weights = model_dir / WEIGHTS_FILE
    return {
        "opset": exported.opset,
        **io_spec(cfg, artifact_info(model_dir)["classes"]),
        "model": dataclasses.asdict(cfg),
        "exporter": exporter(),
        "source": {"weights": str(weights), "md5": hashlib.md5(weights.read_bytes()).hexdigest()},
        "parity": {**dataclasses.asdict(got), "max_logit_diff": bound, "on": "test images, fp32, CPU"},
    }


def summary(cfg: ModelConfig, paths: tuple[Path, Path, Path], exported: Exported, got: Parity, seconds: float) -> str:
    model_dir, out, metrics = paths
    return summary_table(
        [
            ("model", f"{model_dir}/ ({cfg.name}) -> {out / ONNX_FILE} (opset {exported.opset}, "
                      f"{len(exported.onnx) / 2**20:.1f} MiB)"),
            ("parity", f"{got.same_class} of {got.images} test images same class, logits at most "
                       f"{got.max_abs_logit_diff:.2g} apart (onnxruntime against torch, fp32 on the CPU)"),
            ("time", f"{seconds:.1f}s"),
            ("artifacts", f"{out}/ ({ONNX_FILE}, model.json); {metrics}"),
        ]
    )  # fmt: skip


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    check_outputs({"--out": args.out, "--metrics": args.metrics}, folders=("--out",))
    start = time.perf_counter()
    model, cfg = load_artifact(args.model_dir)
    model.eval()  # BatchNorm with its running statistics, as exported
    test = load_split(args.data, "test", params.data.subset)
    exported = export_onnx(model, cfg)
    onnx = session_logits(open_session(exported.onnx))
    got = parity(logits_on(model, test.images), logits_on(onnx, test.images))
    bound = params.export.max_logit_diff
    refuse_mismatch(got, bound, args.model_dir)
    write_onnx(args.out, exported.onnx, spec(cfg, args.model_dir, exported, got, bound))
    write_json(args.metrics, {"onnx": {"diff": float(f"{got.max_abs_logit_diff:.3g}")}})  # 3 digits are enough
    print(summary(cfg, (args.model_dir, args.out, args.metrics), exported, got, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
