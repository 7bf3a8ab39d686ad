import csv
import json
import subprocess

import pytest
import torch

from pipeline.accelerator import make_accelerator
from pipeline.dataset import CLASSES, load_split
from pipeline.evaluate import command, main
from pipeline.inference import eval_loader, predict
from pipeline.model import ModelConfig, build_model, load_artifact, save_artifact
from tests.conftest import FILE_MODES_BIND, REPO, child_env


@pytest.fixture
def artifact(tmp_path):
    torch.manual_seed(0)
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "models")
    return tmp_path / "models"


def run_eval(tmp_path, params, artifact):
    return main(
        [
            "--params", str(params),
            "--data", str(tmp_path / "data" / "raw"),
            "--model-dir", str(artifact),
            "--out", str(tmp_path / "metrics" / "test.json"),
            "--eval-dir", str(tmp_path / "eval"),
        ]
    )  # fmt: skip


@pytest.mark.parametrize("batch_size", [1, 10, 50, 137, 1000], ids=lambda b: f"batch{b}")
def test_every_test_sample_is_counted_once_whatever_the_batch(tmp_path, tiny_raw, write_params, artifact, batch_size):
    assert run_eval(tmp_path, write_params({"evaluate": {"batch_size": batch_size}}), artifact) == 0
    metrics = json.loads((tmp_path / "metrics" / "test.json").read_text())["test"]
    cm = json.loads((tmp_path / "eval" / "confusion.json").read_text())["counts"]
    labels = load_split(tiny_raw, "test").labels
    assert metrics["samples"] == 137 == sum(map(sum, cm))
    assert [sum(row) for row in cm] == torch.bincount(labels, minlength=10).tolist()  # per-class totals = class sizes


def per_class_csv(path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {row["class"]: float(row["accuracy"]) for row in csv.DictReader(f)}


def test_metrics_match_a_direct_computation(tmp_path, tiny_raw, write_params, artifact):
    run_eval(tmp_path, write_params({"evaluate": {"batch_size": 32}}), artifact)
    metrics = json.loads((tmp_path / "metrics" / "test.json").read_text())["test"]
    model, _ = load_artifact(artifact)
    test = load_split(tiny_raw, "test")
    with torch.no_grad():
        logits = model(test.images.unsqueeze(1).float() / 255)
    preds = logits.argmax(1)
    assert metrics["accuracy"] == pytest.approx((preds == test.labels).float().mean().item(), abs=1e-6)
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, test.labels).item(), abs=1e-5)
    assert list(metrics) == ["accuracy", "loss", "samples"]  # per class: a plot, so `dvc metrics show` stays narrow
    per_class = per_class_csv(tmp_path / "eval" / "per_class.csv")
    assert list(per_class) == list(CLASSES)
    for k, name in enumerate(CLASSES):
        mask = test.labels == k
        expected = (preds[mask] == k).float().mean().item()
        assert per_class[name] == pytest.approx(expected, abs=1e-6)


def mirrored_mean(model, x):
    return (model(x) + model(x.flip(-1))) / 2


def tta_expectation(model, x, tta):
    """The logits ``tta`` must score, written out; and those of the next simpler scoring, which must differ."""
    plain, flipped = model(x), mirrored_mean(model, x)
    if tta == "flip":
        return flipped, plain
    up_left, down_right = torch.zeros_like(x), torch.zeros_like(x)
    up_left[..., :-1, :-1] = x[..., 1:, 1:]
    down_right[..., 1:, 1:] = x[..., :-1, :-1]
    return flipped / 2 + (mirrored_mean(model, up_left) + mirrored_mean(model, down_right)) / 4, flipped


@pytest.mark.parametrize("tta", ["flip", "flip_shift"])
def test_tta_scores_the_average_logits_of_the_views_it_names(tmp_path, tiny_raw, write_params, capsys, tta):
    torch.manual_seed(0)
    net = build_model(ModelConfig())
    with torch.no_grad():
        net.classifier[-1].weight.mul_(100)  # confident logits: an image and its mirror or shift score apart
    artifact = tmp_path / "models"
    save_artifact(net, ModelConfig(), artifact)
    run_eval(tmp_path, write_params({"evaluate": {"batch_size": 32, "tta": tta}}), artifact)
    metrics = json.loads((tmp_path / "metrics" / "test.json").read_text())["test"]
    model, _ = load_artifact(artifact)
    test = load_split(tiny_raw, "test")
    with torch.no_grad():
        expected, simpler = tta_expectation(model, test.images.unsqueeze(1).float() / 255, tta)
    loss = torch.nn.functional.cross_entropy
    assert metrics["loss"] == pytest.approx(loss(expected, test.labels).item(), abs=1e-5)
    assert metrics["loss"] != pytest.approx(loss(simpler, test.labels).item(), abs=1e-4)
    assert metrics["accuracy"] == pytest.approx((expected.argmax(1) == test.labels).float().mean().item(), abs=1e-6)
    assert f"{tta} test-time augmentation" in capsys.readouterr().out


def test_subset_limits_the_test_set(tmp_path, tiny_raw, write_params, artifact):
    run_eval(tmp_path, write_params({"data": {"subset": 30}}), artifact)
    assert json.loads((tmp_path / "metrics" / "test.json").read_text())["test"]["samples"] == 30


def test_missing_model_says_run_train(tmp_path, tiny_raw, write_params, capsys):
    with pytest.raises(SystemExit) as info:
        run_eval(tmp_path, write_params(), tmp_path / "nothing")
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("is missing; run `dvc repro train`")
    assert not (tmp_path / "metrics").exists()


def test_predict_returns_one_row_per_sample(tiny_raw):
    accelerator = make_accelerator()
    model = build_model(ModelConfig())
    model, loader = accelerator.prepare(model, eval_loader(load_split(tiny_raw, "test"), 64))
    got = predict(accelerator, model, loader)
    assert got.preds.shape == got.labels.shape == got.losses.shape == got.confidence.shape == (137,)
    assert got.labels.tolist() == load_split(tiny_raw, "test").labels.tolist()  # in the split's own order
    assert ((got.confidence > 0.1 - 1e-6) & (got.confidence <= 1)).all()  # the top of 10 probabilities


def test_classes_are_named_as_the_artifact_names_them(tmp_path, tiny_raw, write_params):
    names = [f"class {i}" for i in range(10)]
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "named", extra={"classes": names})
    assert run_eval(tmp_path, write_params(), tmp_path / "named") == 0
    assert list(per_class_csv(tmp_path / "eval" / "per_class.csv")) == names
    assert json.loads((tmp_path / "eval" / "confusion.json").read_text())["classes"] == names


def test_an_artifact_that_does_not_name_its_classes_is_refused(tmp_path, tiny_raw, write_params, capsys):
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "bad", extra={"classes": ["only", "two"]})
    with pytest.raises(SystemExit) as info:
        run_eval(tmp_path, write_params(), tmp_path / "bad")
    assert info.value.code == 2
    assert "does not name its 10 classes; run `dvc repro train`" in capsys.readouterr().err


def test_non_finite_logits_are_an_error_and_no_metrics_are_written(tmp_path, tiny_raw, write_params, capsys):
    model = build_model(ModelConfig())
    with torch.no_grad():
        for weight in model.parameters():
            weight.mul_(1e8)  # finite weights whose activations overflow float32 within seven layers
    save_artifact(model, ModelConfig(), tmp_path / "models")
    with pytest.raises(SystemExit) as info:
        run_eval(tmp_path, write_params(), tmp_path / "models")
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: model {tmp_path / 'models'} gives NaN or infinite logits on 137 of 137 test samples; "
        "no metrics written; retrain: dvc repro --force train\n"
    )
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "eval").exists()


def _out_is_a_folder(tmp_path):
    (tmp_path / "metrics" / "test.json").mkdir(parents=True)
    return f"{tmp_path / 'metrics' / 'test.json'} is a folder where a file must be; remove it or pass another --out"


def _eval_dir_is_a_file(tmp_path):
    (tmp_path / "eval").write_text("kept")
    return f"{tmp_path / 'eval'} is a file where a folder must be; remove it or pass another --eval-dir"


@pytest.mark.parametrize("fault", [_out_is_a_folder, _eval_dir_is_a_file], ids=["out-a-folder", "eval-dir-a-file"])
def test_an_output_of_the_wrong_kind_is_one_line_before_anything_is_written(
    tmp_path, tiny_raw, write_params, artifact, capsys, fault
):
    said, params = fault(tmp_path), write_params()
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as info:
        run_eval(tmp_path, params, artifact)
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {said}\n"
    assert sorted(tmp_path.rglob("*")) == before  # no metrics, no plots: nothing written


def test_an_out_folder_this_user_cannot_write_is_one_line_before_scoring(tmp_path, tiny_raw, write_params, artifact):
    locked = tmp_path / "metrics"
    locked.mkdir(mode=0o555)
    cmd = command(write_params(), tiny_raw, artifact, locked / "test.json", tmp_path / "eval")
    try:
        proc = subprocess.run([*FILE_MODES_BIND, *cmd], cwd=REPO, env=child_env(), capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {locked}: permission denied for this user; make it writable (and "
                                        "readable), or pass another --out"]  # fmt: skip
    assert not any(locked.iterdir()) and not (tmp_path / "eval").exists()


def test_an_artifact_that_lacks_its_model_name_is_one_line_before_anything_is_written(
    tmp_path, tiny_raw, write_params, artifact, capsys
):
    config = artifact / "model.json"
    meta = json.loads(config.read_text())
    del meta["model"]["name"]
    config.write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as info:
        run_eval(tmp_path, write_params(), artifact)
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {config} lacks model.name; retrain: dvc repro --force train\n"
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "eval").exists()
