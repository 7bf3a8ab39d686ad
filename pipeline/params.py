"""The one typed loader for params.yaml.

Usage: ``params = load_params("params.yaml")``; then ``params.train.lr`` etc.

Every section becomes a frozen dataclass. An unknown key, a wrong type or an
out-of-range value raises :class:`ParamsError` naming the key and what is
allowed. Nothing else in the project reads params.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ParamsError

MODEL_NAMES = ("tutorial_cnn", "bn_cnn")
SCHEDULES = ("onecycle", "constant")
MIXED_PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.mixed_precision -> Accelerate's name
OPTIMIZER_IMPLS = ("auto", "for_loop", "foreach", "fused")
FINAL_MODELS = ("last", "best")
DEFAULT_SOURCES = (
    "/usr/share/datasets/fashion-mnist",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)


# Field metadata of a knob that changes speed or disk use but never the trained weights: it is left
# out of the run key (pipeline/provenance.py), so changing it does not discard resume state.
BOOKKEEPING = {"shapes_training": False}


@dataclass(frozen=True)
class DataParams:
    subset: int = 0  # 0 = all; N = first N samples of each split (smoke runs)
    val_size: int = 6000  # samples carved from the training set for validation
    split_seed: int = 0  # seeds which training samples go to validation


@dataclass(frozen=True)
class DownloadParams:
    sources: tuple[str, ...] = DEFAULT_SOURCES  # tried in order, per file
    timeout: float = 30.0  # seconds without network progress before a source fails


@dataclass(frozen=True)
class ModelParams:
    name: str = "tutorial_cnn"


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 10
    batch_size: int = 128  # global batch, split evenly across processes
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    schedule: str = "onecycle"
    hflip: bool = True  # random horizontal flip of training images
    translate: int = 0  # random shift of each training image by up to N pixels in x and y (0 = off)
    cutout: int = 0  # zero a random N x N square of each training image (0 = off)
    label_smoothing: float = 0.0  # cross-entropy label smoothing, in [0, 1)
    mixed_precision: str = "fp32"  # fp32 | bf16 | fp16; the launcher may not contradict it
    compile: bool = False  # torch.compile the model (inductor)
    optimizer_impl: str = "auto"  # AdamW kernels: auto (torch's pick) | for_loop | foreach | fused
    cudnn_benchmark: bool = False  # let cuDNN time and pick conv algorithms (GPU only; not bitwise reproducible)
    channels_last: bool = True  # NHWC memory layout for the convolutions (speed only; rounding differs)
    seed: int = 42  # weights init, data order and augmentation
    eval_batch_size: int = field(default=1000, metadata=BOOKKEEPING)  # validation batch per process
    checkpoint_every_steps: int = field(default=0, metadata=BOOKKEEPING)  # also every N steps; 0 = epoch ends only
    keep_checkpoints: int = field(default=2, metadata=BOOKKEEPING)  # newest checkpoints kept per run
    keep_runs: int = field(default=3, metadata=BOOKKEEPING)  # interrupted runs whose resume state is kept
    final_model: str = "last"  # which weights become models/: last | best (by validation accuracy)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 1000  # per process; no effect on results


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    download: DownloadParams = field(default_factory=DownloadParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-3`` as a float, as YAML 1.2 (and DVC's ``-S``) do."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` or raise a ParamsError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{key} must be a non-empty list, got {value!r}")
        return tuple(_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {annotation!r} for {key}")  # pragma: no cover


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"unknown key {where}{unknown[0]}; allowed keys{' in ' + prefix if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    values = {}
    for name in fields:
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(typing.cast(type, hint), raw[name], key)
        else:
            values[name] = _check_type(key, raw[name], hint)
    return cls(**values)


def _check_ranges(p: Params) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ParamsError(msg)

    need(p.data.subset >= 0, f"data.subset must be 0 (all) or a positive count, got {p.data.subset}")
    need(p.data.val_size >= 1, f"data.val_size must be >= 1, got {p.data.val_size}")
    need(p.download.timeout > 0, f"download.timeout must be > 0 seconds, got {p.download.timeout}")
    need(
        p.model.name in MODEL_NAMES,
        f"model.name {p.model.name!r} is unknown; allowed: {', '.join(MODEL_NAMES)}",
    )
    need(p.train.epochs >= 1, f"train.epochs must be >= 1, got {p.train.epochs}")
    need(p.train.batch_size >= 1, f"train.batch_size must be >= 1, got {p.train.batch_size}")
    need(p.train.lr > 0, f"train.lr must be > 0, got {p.train.lr}")
    need(p.train.weight_decay >= 0, f"train.weight_decay must be >= 0, got {p.train.weight_decay}")
    need(
        p.train.schedule in SCHEDULES,
        f"train.schedule {p.train.schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}",
    )
    need(
        0 <= p.train.translate <= 8,
        f"train.translate must be 0 (off) to 8 pixels, got {p.train.translate}",
    )
    need(0 <= p.train.cutout <= 28, f"train.cutout must be 0 (off) to 28 pixels, got {p.train.cutout}")
    need(
        0 <= p.train.label_smoothing < 1,
        f"train.label_smoothing must be in [0, 1), got {p.train.label_smoothing}",
    )
    need(
        p.train.mixed_precision in MIXED_PRECISIONS,
        f"train.mixed_precision {p.train.mixed_precision!r} is unknown; allowed: {', '.join(MIXED_PRECISIONS)}",
    )
    need(
        p.train.optimizer_impl in OPTIMIZER_IMPLS,
        f"train.optimizer_impl {p.train.optimizer_impl!r} is unknown; allowed: {', '.join(OPTIMIZER_IMPLS)}",
    )
    need(p.train.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {p.train.eval_batch_size}")
    need(
        p.train.checkpoint_every_steps >= 0,
        f"train.checkpoint_every_steps must be >= 0 (0 = epoch ends only), got {p.train.checkpoint_every_steps}",
    )
    need(p.train.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {p.train.keep_checkpoints}")
    need(p.train.keep_runs >= 1, f"train.keep_runs must be >= 1, got {p.train.keep_runs}")
    need(
        p.train.final_model in FINAL_MODELS,
        f"train.final_model {p.train.final_model!r} is unknown; allowed: {', '.join(FINAL_MODELS)}",
    )
    need(p.evaluate.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {p.evaluate.batch_size}")


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``raw`` params with ``overrides`` ({section: {key: value}}, a recipe file's shape) laid over it.

    Returns a new mapping; unknown keys are left for :func:`parse_params` to name.
    """
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for section, values in (overrides or {}).items():
        if not isinstance(merged.get(section), dict) or not isinstance(values, dict):
            raise ParamsError(f"override section {section!r} is not a params section; allowed: {', '.join(raw)}")
        merged[section].update(values)
    return merged


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping and return typed :class:`Params`."""
    params: Params = _build(Params, raw, "")
    _check_ranges(params)
    return params


def missing_keys(raw: Any, cls: type = Params, prefix: str = "") -> list[str]:
    """The dotted keys of the schema that ``raw`` does not set (sections included, as their keys)."""
    raw = raw if isinstance(raw, dict) else {}
    hints = typing.get_type_hints(cls)
    missing: list[str] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            missing += missing_keys(raw.get(f.name), typing.cast(type, hints[f.name]), key + ".")
        elif f.name not in raw:
            missing.append(key)
    return missing


def exp_run_line(raw: dict[str, Any], name: str) -> str:
    """The ``dvc exp run -n NAME -S section.key=value ...`` line that lays ``raw``'s values over params.yaml."""
    sets = [
        "-S " + shlex.quote(f"{section}.{key}={value if isinstance(value, str) else json.dumps(value)}")
        for section, values in raw.items()
        if isinstance(values, dict)
        for key, value in values.items()
    ]
    return " ".join(["dvc exp run -n", name, *sets])


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``path``, which must set every key: nothing is filled in from code defaults.

    Raises:
        ParamsError: the file is missing, is not YAML, lacks a key, or holds a bad key or value.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"params file {path} not found; run from the project root or pass --params") from None
    try:
        raw = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    params = parse_params(raw)
    missing = missing_keys(raw)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        hint = (
            f"; to train with just its values changed, lay them over params.yaml: {exp_run_line(raw, path.stem)}"
            if isinstance(raw, dict) and any(isinstance(v, dict) and v for v in raw.values())
            else ""
        )
        raise ParamsError(
            f"{path} lacks {shown}: a params file must set every key, so that it alone records the run{hint}"
        )
    return params


def training_params(params: Params) -> dict[str, Any]:
    """The params that shape the trained weights, flat (``"train.lr": 0.002``).

    The data, model and train sections, less the bookkeeping knobs (metadata ``BOOKKEEPING``).
    """
    out: dict[str, Any] = {}
    for section in ("data", "model", "train"):
        values = getattr(params, section)
        for f in dataclasses.fields(values):
            if f.metadata.get("shapes_training", True):
                out[f"{section}.{f.name}"] = getattr(values, f.name)
    return out


def as_dict(params: Any) -> dict[str, Any]:
    """Plain nested dict of a params dataclass (tuples as lists), for logging and fingerprints."""
    out = dataclasses.asdict(params)

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [fix(x) for x in v]
        return v

    return typing.cast(dict[str, Any], fix(out))


__all__ = [
    "DataParams",
    "DownloadParams",
    "EvaluateParams",
    "ModelParams",
    "Params",
    "ParamsError",
    "TrainParams",
    "as_dict",
    "load_params",
    "missing_keys",
    "parse_params",
    "training_params",
]
