import copy
import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline import evaluate
from pipeline.errors import ModelArtifactError
from pipeline.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    BnCNN,
    ModelConfig,
    QuickCNN,
    QuickResNet9,
    Residual,
    ResNet9,
    TutorialCNN,
    build_model,
    load_artifact,
    save_artifact,
)
from tests.conftest import REPO, sh


def test_tutorial_cnn_flatten_size_is_computed_for_28px_input():
    model = TutorialCNN(ModelConfig())
    assert model.flat_features == 32 * 2 * 2  # the tutorial hard-coded 32 * 5 * 5 and crashed
    assert model.classifier[0].in_features == 128


def test_tutorial_cnn_maps_a_batch_to_ten_logits():
    model = build_model(ModelConfig())
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_bn_cnn_maps_a_batch_to_ten_logits_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(name="bn_cnn")
    model = build_model(cfg)
    assert isinstance(model, BnCNN) and model.flat_features == 4 * BnCNN.width * 3 * 3
    assert all(float(m.running_mean.abs().sum()) == 0 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model(torch.rand(8, 1, 28, 28)).sum().backward()  # one training-mode batch moves the running stats
    model.eval()
    save_artifact(model, cfg, tmp_path / "m")
    loaded, loaded_cfg = load_artifact(tmp_path / "m")
    x = torch.rand(3, 1, 28, 28)
    assert loaded_cfg == cfg
    assert float(loaded.features[1].running_mean.abs().sum()) > 0
    loaded.eval()
    assert torch.equal(loaded(x), model(x))  # running statistics travel with the weights


def test_quick_cnn_pools_before_normalising_and_maps_a_batch_to_ten_logits():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="quick_cnn"))
    kinds = [type(m).__name__ for m in model.features]
    assert isinstance(model, QuickCNN) and kinds == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"] * 3
    assert model.flat_features == 4 * QuickCNN.width * 3 * 3  # 28 -> 14 -> 7 -> 3
    assert sum(p.numel() for p in model.parameters()) == 61_042  # the count docs/recipes.md gives
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_resnet9_maps_a_batch_to_ten_logits_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(name="resnet9")
    model = build_model(cfg)
    assert isinstance(model, ResNet9) and sum(isinstance(m, Residual) for m in model.modules()) == 2
    assert sum(p.numel() for p in model.parameters()) == 412_666  # the count the README gives
    model(torch.rand(8, 1, 28, 28)).sum().backward()  # a training-mode batch moves the running statistics
    model.eval()
    save_artifact(model, cfg, tmp_path / "m")
    loaded, loaded_cfg = load_artifact(tmp_path / "m")
    loaded.eval()
    x = torch.rand(3, 1, 28, 28)
    assert loaded_cfg == cfg and loaded(x).shape == (3, 10)
    assert torch.equal(loaded(x), model(x))


def test_quick_resnet9_is_resnet9_with_each_pool_before_its_batchnorm():
    def units(model):  # the layer kinds, a residual block as one
        return [type(m).__name__ for m in model.features]

    torch.manual_seed(0)
    page, quick = build_model(ModelConfig(name="resnet9")), build_model(ModelConfig(name="quick_resnet9"))
    assert isinstance(quick, QuickResNet9)
    unit, pool, res, end = ["Conv2d", "BatchNorm2d", "ReLU"], ["MaxPool2d"], ["Residual"], ["AdaptiveMaxPool2d"]
    pooled = ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    # resnet9's whole layout as it always was, so its artifacts' state-dict keys still match
    assert units(page) == [*unit, *unit, *pool, *res, *unit, *pool, *unit, *pool, *res, *end]
    assert units(quick) == [*unit, *pooled, *res, *pooled, *pooled, *res, *end]
    assert [p.shape for p in quick.parameters()] == [p.shape for p in page.parameters()]
    assert quick(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_a_residual_block_adds_its_input_to_its_branch():
    torch.manual_seed(0)
    block = Residual(4).eval()
    x = torch.rand(2, 4, 6, 6)
    assert torch.equal(block(x), x + block.body(x))
    torch.nn.init.zeros_(block.body[4].weight)  # the last BatchNorm's scale: the branch now adds zero
    torch.nn.init.zeros_(block.body[4].bias)
    assert torch.equal(block(x), x)


def test_bn_cnn_trained_with_sync_batchnorm_saves_a_plain_artifact(tmp_path):
    """Multi-GPU runs swap BatchNorm for SyncBatchNorm; the artifact must still load as the plain model."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="bn_cnn")
    model = build_model(cfg)
    model(torch.rand(8, 1, 28, 28))  # a training-mode batch moves the running statistics
    reference = copy.deepcopy(model).eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what train does on several GPUs
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn > 0
    save_artifact(synced.eval(), cfg, tmp_path / "m")
    loaded, _ = load_artifact(tmp_path / "m")
    loaded.eval()
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in loaded.modules())
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), reference(x))  # same weights and running statistics


def test_flatten_follows_the_image_size():
    assert TutorialCNN(ModelConfig(image_size=32)).flat_features == 32 * 3 * 3


def test_artifact_round_trip_rebuilds_the_same_function(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    save_artifact(model, ModelConfig(), tmp_path / "models", extra={"epochs": 3})
    loaded, cfg = load_artifact(tmp_path / "models")
    x = torch.rand(4, 1, 28, 28)
    assert cfg == ModelConfig()
    assert torch.equal(model(x), loaded(x))
    assert json.loads((tmp_path / "models" / CONFIG_FILE).read_text())["epochs"] == 3


def test_artifact_weights_have_no_wrapper_prefixes(tmp_path):
    model = build_model(ModelConfig())
    save_artifact(model, ModelConfig(), tmp_path / "m")
    keys = load_file(str(tmp_path / "m" / WEIGHTS_FILE)).keys()
    assert keys and not [k for k in keys if k.startswith(("module.", "_orig_mod."))]


def test_saving_replaces_an_existing_artifact_whole(tmp_path):
    out = tmp_path / "m"
    save_artifact(build_model(ModelConfig()), ModelConfig(), out)
    (out / "stale.txt").write_text("old")
    save_artifact(build_model(ModelConfig()), ModelConfig(), out)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_unknown_architecture_is_refused(tmp_path):
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    meta["model"]["name"] = "vit_giant"
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelArtifactError, match="names model 'vit_giant', which this version does not know"):
        load_artifact(tmp_path / "m")


def test_missing_artifact_says_to_run_train(tmp_path):
    with pytest.raises(ModelArtifactError, match=r"model\.json is missing; run `dvc repro train`"):
        load_artifact(tmp_path)


@pytest.mark.parametrize("fields", [["name"], ["mean", "std"]], ids=["name", "mean-and-std"])
def test_an_artifact_config_that_lacks_a_field_is_refused_not_filled_with_a_default(tmp_path, fields):
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    for field in fields:
        del meta["model"][field]
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(meta))
    lacks = ", ".join(f"model.{f}" for f in fields)
    with pytest.raises(ModelArtifactError, match=rf"model\.json lacks {re.escape(lacks)}; retrain: dvc repro --force"):
        load_artifact(tmp_path / "m")


@pytest.mark.parametrize(
    ("damage", "match"),
    [(lambda config: config.mkdir(), r"model config: .*model\.json is a folder where a file must be; remove it or "
                                     r"pass another --model-dir"),
     (lambda config: config.write_bytes(b"\xff\xfe{}"), r"model\.json is not valid JSON \('utf-8' codec can't decode")],
    ids=["a-folder", "not-utf8"],
)  # fmt: skip
def test_an_artifact_config_that_cannot_be_read_is_one_error(tmp_path, damage, match):
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).unlink()
    damage(tmp_path / "m" / CONFIG_FILE)
    with pytest.raises(ModelArtifactError, match=match):
        load_artifact(tmp_path / "m")


def test_corrupt_weights_are_reported(tmp_path):
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelArtifactError, match="are unreadable"):
        load_artifact(tmp_path / "m")


def test_compiled_model_unwraps_to_plain_keys_for_the_artifact(tmp_path):
    from pipeline.accelerator import make_accelerator

    accelerator = make_accelerator()
    compiled = torch.compile(build_model(ModelConfig()))  # lazy: nothing is compiled here
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    prepared = accelerator.prepare(compiled)
    save_artifact(accelerator.unwrap_model(prepared, keep_torch_compile=False), ModelConfig(), tmp_path / "m")
    keys = load_file(str(tmp_path / "m" / WEIGHTS_FILE)).keys()
    assert keys == build_model(ModelConfig()).state_dict().keys()
    load_artifact(tmp_path / "m")  # strict load: no missing or unexpected keys


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("image_size", 100_000, r"model\.image_size must be 8 to 256 pixels, got 100000"),
        ("num_classes", 1e9, r"model\.num_classes must be an integer, got 1000000000\.0"),
        ("in_channels", "1", r"model\.in_channels must be an integer, got '1'"),
        ("std", 0, r"model\.std must be 0\.001 to 1, got 0\.0"),
        ("mean", "nan", r"model\.mean must be a number, got 'nan'"),
    ],
    ids=["huge-image", "huge-classes", "string-channels", "zero-std", "string-mean"],
)
def test_an_artifact_config_is_checked_as_strictly_as_params(tmp_path, field, value, match):
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    meta["model"][field] = value
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelArtifactError, match=match + r"; retrain: dvc repro --force train") as info:
        load_artifact(tmp_path / "m")
    assert "\n" not in str(info.value)


def test_non_finite_weights_are_an_error_not_a_metric(tmp_path):
    model = build_model(ModelConfig())
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    save_artifact(model, ModelConfig(), tmp_path / "m")
    with pytest.raises(
        ModelArtifactError, match=r"holds NaN or infinite weights \(.*\); retrain: dvc repro --force train"
    ):
        load_artifact(tmp_path / "m")


def with_statistics(model_dir, **fields: float) -> None:
    """Set the input statistics (``mean``, ``std``) an artifact's model.json records."""
    meta = json.loads((model_dir / CONFIG_FILE).read_text())
    meta["model"].update(fields)
    (model_dir / CONFIG_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"mean": 1e300}, r"model\.mean must be 0 to 1 \(inputs are scaled to \[0, 1\]\), got 1e\+300"),
        ({"mean": -0.5}, r"model\.mean must be 0 to 1 \(inputs are scaled to \[0, 1\]\), got -0\.5"),
        ({"std": 1e-300}, r"model\.std must be 0\.001 to 1, got 1e-300"),
        ({"std": 1e300}, r"model\.std must be 0\.001 to 1, got 1e\+300"),
    ],
    ids=["huge-mean", "negative-mean", "tiny-std", "huge-std"],
)
def test_input_statistics_that_break_the_input_are_refused(tmp_path, fields, said):
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "m")
    with_statistics(tmp_path / "m", **fields)
    config = tmp_path / "m" / CONFIG_FILE
    with pytest.raises(
        ModelArtifactError, match=rf"^{re.escape(str(config))}: {said}; retrain: dvc repro --force train$"
    ) as info:
        load_artifact(tmp_path / "m")
    assert "\n" not in str(info.value)


def predict_command(model_dir, data, out) -> list[str]:
    return [sys.executable, "-m", "pipeline.predict", "--model-dir", str(model_dir), "--data", str(data),
            "--idx", "0", "--out", str(out / "predictions.json")]  # fmt: skip


def evaluate_command(model_dir, data, out, params) -> list[str]:
    return evaluate.command(params, data, model_dir, out / "metrics" / "test.json", out / "eval")


@pytest.mark.parametrize("stage", ["predict", "evaluate"])
def test_a_non_finite_input_scaling_stops_predict_and_evaluate_with_one_line(tmp_path, tiny_raw, write_params, stage):
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "m")
    with_statistics(tmp_path / "m", mean=1e300, std=1e-300)  # (0 - mean) / std overflows to -inf
    out = tmp_path / "out"
    out.mkdir()
    args = (tmp_path / "m", tiny_raw, out)
    cmd = predict_command(*args) if stage == "predict" else evaluate_command(*args, write_params())
    proc = sh(REPO, *cmd, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'm' / CONFIG_FILE}: model.mean must be 0 to 1 (inputs are scaled to [0, 1]), got 1e+300; "
        "retrain: dvc repro --force train"
    ]
    assert list(out.iterdir()) == []
