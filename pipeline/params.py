"""The one typed loader for params.yaml.

Usage: ``params = load_params("params.yaml")``; then ``params.train.lr`` etc.

Every section becomes a frozen dataclass. An unknown key, a wrong type or an
out-of-range value raises :class:`ParamsError` naming the key and what is
allowed. Nothing else in the project reads params.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

from pipeline.errors import DVC_STAGE_VAR, ParamsError
from pipeline.files import write_text

# the models pipeline/model.py builds: its MODELS registry, which checks that the two agree (written out here, so that
# the stages that build no model do not depend on the models' code)
ModelName = Literal["tutorial_cnn", "bn_cnn", "resnet9", "quick_cnn", "quick_resnet9"]
Precision = Literal["fp32", "bf16", "fp16"]
TestTimeAugmentation = Literal["none", "flip", "flip_shift"]
MIXED_PRECISIONS: dict[str, str] = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # -> Accelerate's name
assert tuple(MIXED_PRECISIONS) == typing.get_args(Precision)
SEED_MAX = 2**32 - 1  # numpy's seeds, which Accelerate's set_seed also sets, are 32-bit
SEED_RANGE = f"0 to {SEED_MAX}"
T = TypeVar("T")
TRAIN_SECTIONS = ("data", "model", "train")  # the sections the train stage reads (its params in dvc.yaml)


@dataclass(frozen=True)
class Bounds:
    """A knob's allowed range, and how an error words it (``says``; for one bound, by default ``>= 1``, ``> 0``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    says: str = ""

    def hold(self, v: float) -> bool:
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )

    def words(self) -> str:
        if self.says:
            return self.says
        ((op, limit),) = [
            (op, v) for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if v is not None
        ]  # fmt: skip  (one bound; a knob with two words them in `says`)
        return f"{op} {limit:g}"


# in a field's Annotated[...]: a knob that changes only speed or disk use, left out of the run key
# (pipeline/provenance.py), so that changing it does not discard resume state
SPEED_ONLY = "speed or disk use only"


def extras(cls: type, name: str) -> tuple[Any, ...]:
    """The ``Annotated`` extras of field ``name`` of ``cls``: its :class:`Bounds`, :data:`SPEED_ONLY`."""
    return getattr(typing.get_type_hints(cls, include_extras=True)[name], "__metadata__", ())


@dataclass(frozen=True)
class DataParams:
    subset: Annotated[int, Bounds(ge=0, says="0 (all) or a positive count")]  # 0 = all; N = first N of each split
    val_size: Annotated[int, Bounds(ge=1)]  # samples carved from the training set for validation
    split_seed: Annotated[
        int, Bounds(ge=0, le=SEED_MAX, says=SEED_RANGE)
    ]  # seeds which training samples go to validation


@dataclass(frozen=True)
class DownloadParams:
    sources: tuple[str, ...]  # tried in order, per file
    timeout: Annotated[
        float, Bounds(gt=0, says="> 0 seconds")
    ]  # seconds without network progress before a source fails


@dataclass(frozen=True)
class ModelParams:
    name: ModelName


@dataclass(frozen=True)
class TrainParams:
    """The train section: params.yaml explains each key beside its value."""

    epochs: Annotated[int, Bounds(ge=1)]
    batch_size: Annotated[int, Bounds(ge=1)]  # global batch, split evenly across processes
    grad_accum: Annotated[int, Bounds(ge=1)]  # micro-batches per process and step
    lr: Annotated[float, Bounds(gt=0)]  # peak learning rate
    weight_decay: Annotated[float, Bounds(ge=0)]  # decoupled weight decay
    schedule: Literal["onecycle", "triangular", "constant"]
    optimizer: Literal["adamw", "sgd_nesterov", "muon"]
    momentum: Annotated[float, Bounds(ge=0, lt=1, says="in [0, 1)")]  # sgd_nesterov's and muon's; adamw ignores it
    bn_bias_lr_scale: Annotated[float, Bounds(gt=0)]  # learning-rate multiplier of the BatchNorm biases
    hflip: bool  # random horizontal flip of training images
    alternate_flip: bool  # with hflip: each image flipped every other epoch, not at random
    translate: Annotated[int, Bounds(ge=0, le=8, says="0 (off) to 8 pixels")]  # random shift in x and y
    cutout: Annotated[int, Bounds(ge=0, le=28, says="0 (off) to 28 pixels")]  # a zeroed N x N square
    label_smoothing: Annotated[float, Bounds(ge=0, lt=1, says="in [0, 1)")]
    ema: Annotated[float, Bounds(ge=0, lt=1, says="0 (off) or a decay in (0, 1)")]  # per-step moving average
    lookahead: Annotated[float, Bounds(ge=0, lt=1, says="0 (off) or a decay in (0, 1)")]  # the slow weights'
    lookahead_every: Annotated[int, Bounds(ge=1)]  # steps between lookahead updates
    dirac_init: bool  # each convolution starts as the identity on the channels it keeps
    whiten_init: bool  # the first convolution starts as a whitening of the training images' patches
    mixed_precision: Precision  # the launcher may not contradict it
    compile: bool  # torch.compile the model (inductor)
    optimizer_impl: Literal["auto", "for_loop", "foreach", "fused"]  # the optimizer's kernels; auto: torch's pick
    cudnn_benchmark: bool  # let cuDNN time and pick conv algorithms (GPU only; not bitwise reproducible)
    channels_last: bool  # NHWC memory layout for the convolutions (speed only; rounding differs)
    seed: Annotated[int, Bounds(ge=0, le=SEED_MAX, says=SEED_RANGE)]  # weights init, data order and augmentation
    eval_batch_size: Annotated[int, Bounds(ge=1), SPEED_ONLY]  # validation batch per process
    checkpoint_every_steps: Annotated[int, Bounds(ge=0, says=">= 0 (0 = epoch ends only)"), SPEED_ONLY]
    keep_checkpoints: Annotated[int, Bounds(ge=1), SPEED_ONLY]  # newest checkpoints kept per run
    keep_runs: Annotated[int, Bounds(ge=1), SPEED_ONLY]  # interrupted runs whose resume state is kept
    final_model: Literal["last", "best"]  # which weights become models/ (best: by validation accuracy)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: Annotated[int, Bounds(ge=1)]  # per process; no effect on results
    tta: TestTimeAugmentation  # flip: average with the mirror image's logits; flip_shift: also 1 px shifts


@dataclass(frozen=True)
class ExportParams:
    # fp32 on the CPU, torch's kernels and onnxruntime's round differently (under 1e-5 on these logits); a gap
    # far above that is a mistranslated model, not rounding
    max_logit_diff: Annotated[float, Bounds(gt=0, le=1, says="in (0, 1]")]  # largest |logit| gap on any test image


@dataclass(frozen=True)
class Params:
    data: DataParams
    download: DownloadParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams


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


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParamsError(f"{key} must be true or false, got {value!r}")
    return value


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamsError(f"{key} must be an integer, got {value!r}")
    return value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamsError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ParamsError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ParamsError(f"{key} must be a string, got {value!r}")
    return value


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` or raise a ParamsError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ParamsError(f"{key} {value!r} is unknown; allowed: {', '.join(choices)}")
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{key} must be a non-empty list, got {value!r}")
        return tuple(_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    return _SCALARS[annotation](key, value)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'a params file'} must be a mapping of keys to values, got {raw!r}"[:200])
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
    for f in dataclasses.fields(cls):
        name, key = f.name, f"{prefix}.{f.name}" if prefix else f.name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{key} is missing; params.yaml must set every key (see the project's params.yaml)")
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(typing.cast(type, hint), raw[name], key)
        else:
            values[name] = _check_type(key, raw[name], hint)
    return cls(**values)


def _check_ranges(values: Any, prefix: str) -> None:
    """Check every field of ``values`` (a section, or all of :class:`Params`) against its bounds."""
    for f in dataclasses.fields(values):
        value, key = getattr(values, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key + ".")
            continue
        for extra in extras(type(values), f.name):
            if isinstance(extra, Bounds) and not extra.hold(value):
                raise ParamsError(f"{key} must be {extra.words()}, got {value}")


def typed(cls: type[T], raw: Any, prefix: str) -> T:
    """``raw`` (a mapping) as the frozen dataclass ``cls``, checked like params: wrong types and values raise.

    ``prefix`` names ``raw`` in the messages (``model`` gives ``model.image_size must be ...``).
    """
    value: T = _build(cls, raw, prefix)
    _check_ranges(value, f"{prefix}." if prefix else "")
    return value


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
    _check_ranges(params, "")
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


def read_yaml(path: str | Path) -> Any:
    """Parse the YAML file ``path`` (params or a recipe) as YAML 1.2 does, as DVC's ``-S`` writes it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"params file {path} not found; run from the project root or pass --params") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path} is not UTF-8 text; a params file is YAML") from None
    except OSError as e:  # a folder, no permission
        raise ParamsError(f"params file {path} cannot be read ({e.strerror or e})") from None
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError(f"{where} is not valid YAML: {problem}") from None


def load_params(path: str | Path = "params.yaml", *layers: dict[str, Any]) -> Params:
    """Read and validate ``path``, which must set every key: nothing is filled in from code defaults.

    Each of ``layers`` ({section: {key: value}}, a recipe's shape) is laid over it in turn, and the
    result is checked as a whole. Under DVC, an error also names the values the last good run had.

    Raises:
        ParamsError: the file is missing, is not YAML, lacks a key, or holds a bad key or value.
    """
    path = Path(path)
    raw = read_yaml(path)
    try:
        params = _complete(raw, path)
        for layer in layers:
            params = with_changes(params, layer)
    except ParamsError as e:
        raise ParamsError(f"{e}{last_good_hint(raw, bool(os.environ.get(DVC_STAGE_VAR)), str(e))}") from None
    return params


def _complete(raw: Any, path: Path) -> Params:
    missing = missing_keys(raw) if isinstance(raw, dict) else []
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
    return parse_params(raw)


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``); lists as tuples."""
    if not isinstance(tree, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def last_good_hint(raw: Any, under_dvc: bool, error: str = "", lock: Path = Path("dvc.lock")) -> str:
    """Under DVC, what params.yaml must get back to be the last good run's, as dvc.lock records it (each stage
    the params it read): ``; the last good run (dvc.lock) had train.lr=0.002 ...``; "" elsewhere or when equal.
    The keys the ``error`` names come alone when any differ; else every key that differs, the first three.
    """
    if not under_dvc:
        return ""
    try:
        stages = yaml.safe_load(lock.read_text())["stages"].values()
        good = {k: v for stage in stages for k, v in flat(stage.get("params", {}).get("params.yaml")).items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return ""
    now = flat(raw)
    differ = [k for k, v in good.items() if now.get(k) != v]
    differ = [k for k in differ if k in error] or differ
    changed = [f"{k}={good[k] if isinstance(good[k], str) else json.dumps(good[k])}" for k in differ]
    if not changed:
        return ""
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"; the last good run (dvc.lock) had {shown}: set it back in params.yaml"


def with_changes(params: Params, layer: dict[str, Any]) -> Params:
    """``params`` with ``layer`` ({section: {key: value}}) laid over it, checked like a params file."""
    return parse_params(with_overrides(as_dict(params), layer))


def assignment(text: str) -> dict[str, Any]:
    """``section.key=value`` (as ``dvc exp run -S`` takes it) as a layer ``{section: {key: value}}``."""
    key, eq, value = text.partition("=")
    section, dot, name = key.partition(".")
    if not (eq and dot and section and name):
        raise ParamsError(f"{text!r} is not SECTION.KEY=VALUE (e.g. train.epochs=5)")
    return {section: {name: yaml.load(value, Loader=_Yaml12Loader)}}


def save_params(params: Params, path: str | Path) -> None:
    """Write ``params`` as a complete params file (every key) that :func:`load_params` reads back unchanged."""
    write_text(path, yaml.safe_dump(as_dict(params), sort_keys=False))


def training_params(params: Params) -> dict[str, Any]:
    """The params that shape the trained weights, flat (``"train.lr": 0.002``).

    The data, model and train sections, less the knobs marked :data:`SPEED_ONLY`.
    """
    out: dict[str, Any] = {}
    for section in TRAIN_SECTIONS:
        values = getattr(params, section)
        for f in dataclasses.fields(values):
            if SPEED_ONLY not in extras(type(values), f.name):
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
    "ExportParams",
    "ModelParams",
    "Params",
    "ParamsError",
    "TrainParams",
    "as_dict",
    "assignment",
    "load_params",
    "missing_keys",
    "parse_params",
    "read_yaml",
    "save_params",
    "training_params",
    "typed",
    "with_changes",
    "with_overrides",
]
