"""Models by name, and the model artifact: safetensors weights + an architecture JSON.

The artifact is enough to rebuild the model: evaluate and any other consumer call
:func:`load_artifact` and never read params.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.dataset import CLASSES
from pipeline.errors import ModelArtifactError, ParamsError, path_problem
from pipeline.files import atomic_path
from pipeline.params import Bounds, ModelName, typed

ARTIFACT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved beside its weights."""

    name: str = "tutorial_cnn"
    in_channels: Annotated[int, Bounds(ge=1, le=16, says="1 to 16")] = 1
    image_size: Annotated[int, Bounds(ge=8, le=256, says="8 to 256 pixels")] = 28
    num_classes: Annotated[int, Bounds(ge=2, le=1000, says="2 to 1000")] = len(CLASSES)
    # Fashion-MNIST training-set pixel statistics, for inputs scaled to [0, 1]; bounded so that the standardised
    # input (x - mean) / std stays within +-1000, finite in any precision the models run in
    mean: Annotated[float, Bounds(ge=0, le=1, says="0 to 1 (inputs are scaled to [0, 1])")] = 0.2860
    std: Annotated[float, Bounds(ge=1e-3, le=1, says="0.001 to 1")] = 0.3530


class ImageClassifier(nn.Module):
    """What every model here is: standardise the input, ``features`` (convolutions), flatten, ``classifier``.

    Subclasses set ``mean``, ``std`` (the input statistics), ``features`` and ``classifier``.
    """

    mean: float
    std: float
    features: nn.Module
    classifier: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std  # (B, C, H, W) in [0, 1] -> standardised
        return self.classifier(self.features(x).flatten(1))  # (B, num_classes) logits


class TutorialCNN(ImageClassifier):
    """The seed tutorial's CNN, with the flatten size computed instead of hard-coded.

    The tutorial wrote ``x.view(-1, 32 * 5 * 5)``, but 28x28 input leaves a 32x2x2 map
    (28 -> 26 -> 24 -> 12 -> 8 -> 4 -> 2), so it crashed.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mean, self.std = cfg.mean, cfg.std  # input statistics, part of the architecture JSON
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_channels, 16, 3), nn.ReLU(),
            nn.Conv2d(16, 16, 3), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(),
            nn.Conv2d(32, 32, 5), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.flat_features = flat_size(self.features, cfg.in_channels, cfg.image_size)
        self.classifier = nn.Sequential(
            nn.Linear(self.flat_features, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, cfg.num_classes),
        )  # fmt: skip


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    """A padded 3x3 convolution, BatchNorm and ReLU: the unit of the BatchNorm models (laid flat into a Sequential)."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class BnCNN(ImageClassifier):
    """A small VGG-style net with BatchNorm, padded 3x3 convolutions and more width (the first "beyond" model).

    Three stages (28 -> 14 -> 7 -> 3) of ``width``, ``2 * width``, ``4 * width`` channels, then one
    linear layer. About 3x the tutorial CNN's compute per image.
    """

    width = 32

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mean, self.std = cfg.mean, cfg.std
        w = self.width
        self.features = nn.Sequential(
            *conv_bn(cfg.in_channels, w), *conv_bn(w, w), nn.MaxPool2d(2),
            *conv_bn(w, 2 * w), *conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        )  # fmt: skip
        self.flat_features = flat_size(self.features, cfg.in_channels, cfg.image_size)
        self.classifier = nn.Linear(self.flat_features, cfg.num_classes)


class Residual(nn.Module):
    """``x + f(x)``, where ``f`` is two :func:`conv_bn` units of ``channels`` channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(channels, channels), *conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(ImageClassifier):
    """A small ResNet: the ResNet-9 of the DAWNBench CIFAR-10 runs (Page, 2018) at a quarter of its width.

    A 3x3 stem, then three stages (28 -> 14 -> 7 -> 3) of ``2 * width``, ``4 * width`` and ``8 * width``
    channels, a residual pair of convolutions after the first and the last, a global max pool and
    one linear layer. About 0.8x ``bn_cnn``'s compute per image, with 2.7x its parameters.
    """

    width = 16
    pool_first = False  # each stage's max pool after its BatchNorm and ReLU (Page's order)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mean, self.std = cfg.mean, cfg.std
        w = self.width
        down = conv_pool_bn if self.pool_first else conv_bn_pool
        self.features = nn.Sequential(
            *conv_bn(cfg.in_channels, w),
            *down(w, 2 * w), Residual(2 * w),
            *down(2 * w, 4 * w),
            *down(4 * w, 8 * w), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
        )  # fmt: skip
        self.classifier = nn.Linear(8 * w, cfg.num_classes)


class QuickResNet9(ResNet9):
    """:class:`ResNet9` with each stage's max pool moved before its BatchNorm and ReLU (as :class:`QuickCNN`),
    so those cost a quarter: the same parameters, about 1.2x faster per image on a CPU."""

    pool_first = True


class QuickCNN(ImageClassifier):
    """The fastest way here to 91 %: three units of a padded 3x3 convolution, a 2x2 max pool, BatchNorm and
    ReLU (pooling before the normalisation, as airbench does, so each costs a quarter), of ``width``,
    ``2 * width`` and ``4 * width`` channels (28 -> 14 -> 7 -> 3), then one linear layer. About 1.5x the
    tutorial CNN's compute per image, with half its parameters.
    """

    width = 24

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mean, self.std = cfg.mean, cfg.std
        w = self.width
        self.features = nn.Sequential(*conv_pool_bn(cfg.in_channels, w), *conv_pool_bn(w, 2 * w),
                                      *conv_pool_bn(2 * w, 4 * w))  # fmt: skip
        self.flat_features = flat_size(self.features, cfg.in_channels, cfg.image_size)
        self.classifier = nn.Linear(self.flat_features, cfg.num_classes)


def conv_bn_pool(c_in: int, c_out: int) -> list[nn.Module]:
    """:func:`conv_bn`, then a 2x2 max pool."""
    return [*conv_bn(c_in, c_out), nn.MaxPool2d(2)]


def conv_pool_bn(c_in: int, c_out: int) -> list[nn.Module]:
    """A padded 3x3 convolution, a 2x2 max pool, BatchNorm and ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.ReLU()]


def flat_size(features: nn.Module, in_channels: int, image_size: int) -> int:
    """Number of features ``features`` produces for one image, found by a forward pass on zeros."""
    was_training = features.training
    features.eval()  # BatchNorm: no batch statistics from (or into) the probe
    with torch.no_grad():
        n = int(features(torch.zeros(1, in_channels, image_size, image_size)).numel())
    features.train(was_training)
    return n


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "tutorial_cnn": TutorialCNN,
    "bn_cnn": BnCNN,
    "resnet9": ResNet9,
    "quick_cnn": QuickCNN,
    "quick_resnet9": QuickResNet9,
}
assert tuple(MODELS) == typing.get_args(ModelName), "model.name's choices (params.ModelName) are the models built here"


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model ``cfg.name`` names."""
    try:
        return MODELS[cfg.name](cfg)
    except KeyError:
        raise ModelArtifactError(f"unknown model {cfg.name!r}; known: {', '.join(MODELS)}") from None


def save_artifact(model: nn.Module, cfg: ModelConfig, out_dir: str | Path, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir``, replacing it atomically.

    ``model`` must already be unwrapped (no ``module.`` or ``_orig_mod.`` prefixes).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k in state if k.startswith(("module.", "_orig_mod."))]
    assert not bad, f"wrapped model passed to save_artifact: {bad[:3]}"
    meta = {"format": ARTIFACT_FORMAT, "model": dataclasses.asdict(cfg), "classes": list(CLASSES), **(extra or {})}
    needs = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_path(out_dir, folder=True, needs=needs) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": str(ARTIFACT_FORMAT)})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _read_meta(model_dir: str | Path) -> tuple[ModelConfig, dict]:
    """Read and check the artifact's JSON once: its architecture, and the whole JSON."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelArtifactError(f"model config {path} is missing; run `dvc repro train`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelArtifactError(f"model config {path} is not valid JSON ({e}); run `dvc repro train`") from None
    except OSError as e:  # a folder in its place, or no permission to read it
        raise ModelArtifactError(f"model config: {path_problem(e, 'pass another --model-dir')}") from None
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT or not isinstance(meta.get("model"), dict):
        raise ModelArtifactError(f"{path} is not a format-{ARTIFACT_FORMAT} model artifact; run `dvc repro train`")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(meta["model"]) - known
    if unknown:
        raise ModelArtifactError(
            f"{path} has unknown model fields {sorted(unknown)}; it was written by a newer version"
        )
    if known - set(meta["model"]):  # the artifact alone rebuilds the model: no field may fall back to a default
        missing = ", ".join(f"model.{k}" for k in sorted(known - set(meta["model"])))
        raise ModelArtifactError(f"{path} lacks {missing}; retrain: dvc repro --force train")
    try:
        cfg = typed(ModelConfig, meta["model"], "model")
    except ParamsError as e:
        raise ModelArtifactError(f"{path}: {e}; retrain: dvc repro --force train") from None
    if cfg.name not in MODELS:
        raise ModelArtifactError(
            f"{path} names model {cfg.name!r}, which this version does not know ({', '.join(MODELS)})"
        )
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) != cfg.num_classes or not all(isinstance(c, str) for c in classes):
        raise ModelArtifactError(f"{path} does not name its {cfg.num_classes} classes; run `dvc repro train`")
    return cfg, meta


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and check the architecture JSON of an artifact."""
    return _read_meta(model_dir)[0]


def artifact_info(model_dir: str | Path) -> dict:
    """The artifact's JSON: architecture, class names, and what training recorded (final_model, epoch, ...)."""
    return _read_meta(model_dir)[1]


def load_artifact(model_dir: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Rebuild the model from ``model_dir`` alone (no pickle: safetensors + JSON)."""
    cfg = load_config(model_dir)
    path = Path(model_dir) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise ModelArtifactError(f"model weights {path} are missing; run `dvc repro train`") from None
    except (SafetensorError, OSError) as e:
        raise ModelArtifactError(f"model weights {path} are unreadable ({e}); run `dvc repro train`") from None
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ModelArtifactError(
            f"{path} holds NaN or infinite weights ({broken[0]}); retrain: dvc repro --force train"
        )
    model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelArtifactError(f"{path} does not fit model {cfg.name!r}: {first}") from None
    return model, cfg
