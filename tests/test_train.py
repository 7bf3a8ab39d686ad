import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import list_checkpoints, read_checkpoint
from pipeline.train import main
from tests.conftest import REPO, default_params, reset_accelerate_state


def run_train(tmp_path, params, *extra):
    return main(
        [
            "--params", str(params),
            "--data", str(tmp_path / "data" / "raw"),
            "--model-dir", str(tmp_path / "models"),
            "--live-dir", str(tmp_path / "live"),
            "--checkpoint-dir", str(tmp_path / "checkpoints"),
            *extra,
        ]
    )  # fmt: skip


def test_training_writes_artifact_and_one_metrics_row_per_epoch(tmp_path, tiny_raw, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_train(tmp_path, write_params({"train": {"epochs": 3}})) == 0
    meta = json.loads((tmp_path / "models" / "model.json").read_text())
    assert meta["model"]["name"] == "tutorial_cnn" and meta["epoch"] == 3 and meta["final_model"] == "last"
    assert load_file(str(tmp_path / "models" / "model.safetensors"))
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["step"] == 3  # DVCLive steps are epochs counted from 1
    assert metrics == {"loss": {"val": metrics["loss"]["val"]}, "accuracy": {"val": metrics["accuracy"]["val"]},
                       "step": 3}  # held-out results only: `dvc metrics show` fits 120 columns  # fmt: skip
    assert 0.0 <= meta["best_val_accuracy"] <= 1.0 and 1 <= meta["best_epoch"] <= 3
    curves = tmp_path / "live" / "plots" / "metrics"
    for curve in ("accuracy/val.tsv", "loss/train.tsv", "accuracy/train.tsv", "lr.tsv", "samples_per_s.tsv",
                  "epoch_time_s.tsv"):  # fmt: skip
        assert len((curves / curve).read_text().splitlines()) == 1 + 3, curve  # header + one row per epoch


def test_ema_exports_and_validates_the_average_and_leaves_training_as_it_was(
    tmp_path, tiny_raw, write_params, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    weights, kept, metrics = {}, {}, {}
    for ema in (0.0, 0.9):
        run_train(tmp_path, write_params({"train": {"epochs": 2, "ema": ema}}), "--keep-state", "--fresh")
        weights[ema] = load_file(str(tmp_path / "models" / "model.safetensors"))
        ((run,),) = [list((tmp_path / "checkpoints").glob("*/run.json"))]
        kept[ema] = read_checkpoint(list_checkpoints(run.parent)[-1])
        metrics[ema] = {c: (tmp_path / "live" / "plots" / "metrics" / "loss" / f"{c}.tsv").read_text()
                        for c in ("train", "val")}  # fmt: skip
        shutil.rmtree(tmp_path / "checkpoints")
    assert kept[0.0].ema is None and kept[0.9].ema is not None
    trained, plain = kept[0.9].model, kept[0.0].model
    assert all(torch.equal(trained[k], plain[k]) for k in plain)  # the average does not touch training
    average = kept[0.9].scored()
    assert all(torch.equal(weights[0.9][k], average[k]) for k in average)  # the model is the average ...
    assert not torch.equal(weights[0.9]["classifier.4.weight"], trained["classifier.4.weight"])  # ... not the last
    assert all(torch.equal(weights[0.0][k], plain[k]) for k in plain)
    assert metrics[0.9]["train"] == metrics[0.0]["train"]  # the training loss curve
    assert metrics[0.9]["val"] != metrics[0.0]["val"]  # validated: the average


def test_training_learns_the_synthetic_task(tmp_path, tiny_raw, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, write_params({"train": {"epochs": 6, "lr": 0.003}}))
    meta = json.loads((tmp_path / "models" / "model.json").read_text())
    assert meta["best_val_accuracy"] > 0.5  # chance is 0.1


def test_same_seed_gives_bitwise_identical_weights(tmp_path, tiny_raw, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params()
    run_train(tmp_path, params)
    first = load_file(str(tmp_path / "models" / "model.safetensors"))
    run_train(tmp_path, params, "--fresh")
    second = load_file(str(tmp_path / "models" / "model.safetensors"))
    assert all((first[k] == second[k]).all() for k in first)


TECHNIQUES = {
    "optimizer": {"optimizer": "sgd_nesterov", "lr": 0.02},
    "muon": {"optimizer": "muon", "lr": 0.02},
    "triangular": {"schedule": "triangular"},
    "bn-bias-lr": {"bn_bias_lr_scale": 16.0},
    "alternate-flip": {"alternate_flip": True},
    "lookahead": {"lookahead": 0.8, "lookahead_every": 2},
    "dirac-init": {"dirac_init": True},
    "whiten-init": {"whiten_init": True},
}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_speed_technique_reaches_the_training_it_names(tmp_path, tiny_raw, write_params, monkeypatch, technique):
    monkeypatch.chdir(tmp_path)
    weights = {}
    for name, changes in (("off", {}), ("on", TECHNIQUES[technique])):
        params = write_params({"model": {"name": "bn_cnn"}, "train": {"epochs": 1, **changes}}, name=f"{name}.yaml")
        run_train(tmp_path, params, "--fresh")
        weights[name] = load_file(str(tmp_path / "models" / "model.safetensors"))
    assert any(not torch.equal(weights["on"][k], weights["off"][k]) for k in weights["off"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"data": {"val_size": 240}}, r"data\.val_size \(240\) must be at least 1 and less than the 240 training"),
        ({"train": {"batch_size": 500}}, r"train\.batch_size \(500\) is larger than the 200 training samples"),
        ({"train": {"epochs": 0}}, r"train\.epochs must be >= 1"),
        ({"model": {"name": "lenet"}}, r"model\.name 'lenet' is unknown"),
        ({"train": {"bogus": 1}}, r"unknown key train\.bogus"),
        ({"train": {"epochs": 1, "batch_size": 50}}, r"onecycle needs at least 5 optimizer steps and this run has 4"),
        ({"train": {"optimizer": "muon", "optimizer_impl": "fused"}}, r"muon has one implementation, so train\.opt"),
    ],
    ids=[
        "val-size-too-big",
        "batch-larger-than-data",
        "epochs-zero",
        "unknown-model",
        "unknown-key",
        "onecycle-short",
        "muon-fused",
    ],  # fmt: skip
)
def test_bad_inputs_stop_before_work_with_one_line(
    tmp_path, tiny_raw, write_params, monkeypatch, capsys, overrides, match
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_train(tmp_path, write_params(overrides))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(match, err)
    assert not (tmp_path / "models").exists() and not (tmp_path / "live").exists()


def test_missing_data_says_run_download(tmp_path, write_params, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_train(tmp_path, write_params())
    assert "is missing; run `dvc repro download`" in capsys.readouterr().err


def _model_dir_is_a_file(tmp_path):
    (tmp_path / "models").write_text("kept")
    return f"{tmp_path / 'models'} is a file where a folder must be; remove it or pass another --model-dir"


def _live_dir_is_a_dangling_symlink(tmp_path):
    (tmp_path / "live").symlink_to(tmp_path / "gone")
    gone = tmp_path / "gone"
    return f"{tmp_path / 'live'} is a symlink to {gone}, which does not exist; create it or pass another --live-dir"


def _data_is_a_file(tmp_path):
    raw = tmp_path / "data" / "raw"
    shutil.rmtree(raw)
    raw.write_text("kept")
    return f"data: {raw} is a file where a folder must be; remove it or pass another --data"


@pytest.mark.parametrize(
    "fault", [_model_dir_is_a_file, _live_dir_is_a_dangling_symlink, _data_is_a_file],
    ids=["model-dir-a-file", "live-dir-dangling", "data-a-file"],
)  # fmt: skip
def test_a_path_the_stage_cannot_use_is_one_line_before_training(
    tmp_path, tiny_raw, write_params, monkeypatch, capsys, fault
):
    monkeypatch.chdir(tmp_path)
    said, params = fault(tmp_path), write_params()
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as info:
        run_train(tmp_path, params)
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {said}\n"
    made = {p.relative_to(tmp_path) for p in set(tmp_path.rglob("*")) - before}
    assert made <= {Path("checkpoints"), Path("checkpoints/.lock")}  # nothing trained or written but the lock


@pytest.mark.parametrize("choice", ["best", "last"])
def test_final_model_choice_is_recorded_in_artifact_and_metrics(tmp_path, tiny_raw, write_params, monkeypatch, choice):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, write_params({"train": {"epochs": 3, "final_model": choice}}))
    meta = json.loads((tmp_path / "models" / "model.json").read_text())
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert meta["final_model"] == choice
    if choice == "best":
        assert meta["val_accuracy"] == meta["best_val_accuracy"] and meta["epoch"] == meta["best_epoch"]
    else:
        assert meta["epoch"] == 3 and meta["val_accuracy"] == metrics["accuracy"]["val"]


def test_bad_checkpoint_params_are_refused(tmp_path, tiny_raw, write_params, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_train(tmp_path, write_params({"train": {"final_model": "median"}}))
    assert "train.final_model 'median' is unknown; allowed: last, best" in capsys.readouterr().err


def test_output_without_a_terminal_is_one_line_per_epoch_then_a_summary(
    tmp_path, tiny_raw, write_params, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, write_params({"train": {"epochs": 3}}))
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert "\r" not in captured.out + captured.err  # no progress bar redraws in logs
    summary = lines[lines.index("summary") :]
    assert [row.split("  ")[1].strip() for row in summary[1:]] == [
        "best val accuracy",
        "model",
        "time",
        "artifacts",
        "next",
    ]


def test_training_logs_a_sample_grid_of_the_training_data(tmp_path, tiny_raw, write_params, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, write_params())
    with Image.open(tmp_path / "live" / "plots" / "images" / "train_samples.png") as im:
        assert im.width > 200 and im.height > 100  # 40 labelled tiles, 8 per row


def test_channels_last_trains_the_same_model_up_to_rounding(tmp_path, tiny_raw, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = {}
    for layout in (True, False):
        run_train(tmp_path, write_params({"train": {"channels_last": layout}}))
        weights[layout] = load_file(str(tmp_path / "models" / "model.safetensors"))
    diff = max((weights[True][k] - weights[False][k]).abs().max().item() for k in weights[True])
    assert 0 <= diff < 1e-4  # layout changes summation order, not the math
    assert all(t.is_contiguous() for t in weights[True].values())  # the artifact is stored in the standard layout


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_puts_the_convolutions_in_nhwc_and_off_leaves_them_nchw(tiny_raw, write_params, channels_last):
    from pipeline.accelerator import make_accelerator
    from pipeline.params import load_params
    from pipeline.train import build

    params = load_params(write_params({"train": {"channels_last": channels_last}}))
    model = build(make_accelerator(), params, tiny_raw).learner.model
    convs = [p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1]  # with one channel, both layouts agree
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in convs)


def test_speed_options_train_the_same_model_up_to_rounding(tmp_path, tiny_raw, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = {}
    for impl in ("for_loop", "foreach", "fused"):
        run_train(tmp_path, write_params({"train": {"optimizer_impl": impl}}), "--fresh")
        weights[impl] = load_file(str(tmp_path / "models" / "model.safetensors"))
    for impl in ("foreach", "fused"):
        diff = max((weights[impl][k] - weights["for_loop"][k]).abs().max().item() for k in weights[impl])
        assert diff < 1e-4, impl


def test_beyond_model_trains_with_translation_cutout_smoothing_and_bf16(tmp_path, tiny_raw, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = {"model": {"name": "bn_cnn"}}
    overrides["train"] = {"epochs": 4, "translate": 2, "cutout": 6, "label_smoothing": 0.1, "mixed_precision": "bf16"}
    assert run_train(tmp_path, write_params(overrides)) == 0
    meta = json.loads((tmp_path / "models" / "model.json").read_text())
    params = (tmp_path / "live" / "params.yaml").read_text()
    assert meta["model"]["name"] == "bn_cnn" and "running_mean" in " ".join(
        load_file(str(tmp_path / "models" / "model.safetensors"))
    )
    assert "mixed_precision: bf16" in params and "translate: 2" in params
    assert meta["best_val_accuracy"] > 0.3  # learns (chance is 0.1)


def test_changing_precision_does_not_resume_the_other_precisions_checkpoint(
    tmp_path, tiny_raw, write_params, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, write_params({"train": {"mixed_precision": "fp32"}}), "--keep-state")
    capsys.readouterr()
    reset_accelerate_state()
    run_train(tmp_path, write_params({"train": {"mixed_precision": "bf16"}}))
    out = capsys.readouterr().out
    assert "differs in precision train.mixed_precision ('fp32' there, 'bf16' now): starting fresh" in out
    assert "resuming" not in out and "mixed precision: bf16" in out


@pytest.mark.parametrize("launcher", ["bf16", "fp16"])
def test_a_launcher_precision_that_params_do_not_record_is_refused(
    tmp_path, tiny_raw, write_params, monkeypatch, capsys, launcher
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)  # what `accelerate launch --mixed_precision` sets
    with pytest.raises(SystemExit) as info:
        run_train(tmp_path, write_params({"train": {"mixed_precision": "fp32"}}))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert f"the launcher asks for mixed precision {launcher}" in err and "train.mixed_precision is fp32" in err
    assert f"dvc exp run -S train.mixed_precision={launcher}" in err
    assert not (tmp_path / "models").exists()


def test_a_launcher_precision_that_agrees_with_params_trains_in_it(tmp_path, tiny_raw, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert run_train(tmp_path, write_params({"train": {"mixed_precision": "bf16"}})) == 0
    provenance = json.loads((tmp_path / "models" / "model.json").read_text())["provenance"]
    assert provenance["mixed_precision_in_force"] == "bf16"


def test_the_model_artifact_records_how_it_was_made(tmp_path, tiny_raw, write_params, monkeypatch):
    from pipeline.provenance import file_digests, import_closure

    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, write_params({"train": {"lr": 0.004}}), "--cpu-threads", "1")
    provenance = json.loads((tmp_path / "models" / "model.json").read_text())["provenance"]
    assert sorted(provenance["code"]) == import_closure("pipeline.train")
    assert provenance["code"]["pipeline/train.py"] == file_digests(REPO, ["pipeline/train.py"])["pipeline/train.py"]
    assert provenance["data"] == file_digests(tiny_raw, ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"])
    assert provenance["params"]["train.lr"] == 0.004 and "train.keep_runs" not in provenance["params"]
    assert provenance["processes"] == 1 and provenance["mixed_precision_in_force"] == "no"
    assert provenance["device"] == "cpu" and provenance["cpu_threads"] == 1 and provenance["cpu"]
    assert provenance["torch"] == torch.__version__ and len(provenance["fingerprint"]) == 16


def test_a_finished_run_leaves_no_state_and_a_rerun_trains_again(tmp_path, tiny_raw, write_params, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = write_params()
    run_train(tmp_path, params)
    first = (tmp_path / "models" / "model.safetensors").read_bytes()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")] == []
    capsys.readouterr()
    reset_accelerate_state()
    run_train(tmp_path, params)
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "resuming" not in out
    assert (tmp_path / "models" / "model.safetensors").read_bytes() == first  # trained again, same seed


def test_a_kept_finished_run_exports_again_without_training(tmp_path, tiny_raw, write_params, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = write_params()
    run_train(tmp_path, params, "--keep-state")
    first = (tmp_path / "models" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "models")
    capsys.readouterr()
    reset_accelerate_state()
    run_train(tmp_path, params)
    out = capsys.readouterr().out
    assert "is the end of this run's training, whose model was not written: exporting it, no training left" in out
    assert "epoch 1/2" not in out and (tmp_path / "models" / "model.safetensors").read_bytes() == first


def test_a_model_that_does_not_fit_on_disk_is_exported_by_the_rerun_without_training(
    tmp_path, tiny_raw, write_params, monkeypatch, tmpfs, capsys
):
    monkeypatch.chdir(tmp_path)
    params = write_params()
    run_train(tmp_path, params, "--keep-state")  # the reference: the same run, uninterrupted
    reference = {p.name: p.read_bytes() for p in [*(tmp_path / "models").iterdir(), tmp_path / "live" / "metrics.json"]}
    shutil.rmtree(tmp_path / "checkpoints")
    full = tmpfs("100k")  # the model's 430 kB do not fit
    reset_accelerate_state()
    cmd = ["--params", str(params), "--data", str(tiny_raw), "--live-dir", str(tmp_path / "live")]
    with pytest.raises(SystemExit) as failed:
        main([*cmd, "--model-dir", str(full / "models"), "--checkpoint-dir", str(tmp_path / "checkpoints")])
    assert failed.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no space left on device writing {full}/models (it needs about 0.4 MiB")
    assert err.endswith("free space there and run again (what was there is kept)") and "\n" not in err
    reset_accelerate_state()
    shutil.rmtree(tmp_path / "models")  # the reference's: the rerun must write its own
    main([*cmd, "--model-dir", str(tmp_path / "models"), "--checkpoint-dir", str(tmp_path / "checkpoints")])
    out = capsys.readouterr().out
    assert "exporting it, no training left" in out and "epoch 1/2" not in out
    got = {p.name: p.read_bytes() for p in [*(tmp_path / "models").iterdir(), tmp_path / "live" / "metrics.json"]}
    assert got == reference


def test_a_second_trainer_of_the_same_run_is_refused_and_other_runs_share_the_store(tmp_path, tiny_raw, write_params):
    from pipeline.params import load_params
    from pipeline.provenance import run_key

    params = write_params()
    run_dir = tmp_path / "checkpoints" / run_key(load_params(params), tiny_raw, 1).fingerprint()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.runs import "
         "hold_run\nwith hold_run(Path(sys.argv[1])):\n print('held', flush=True); "
         "time.sleep(60)", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    def train(params_file: Path, out: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.train", "--params", str(params_file), "--data", str(tiny_raw),
             "--model-dir", str(tmp_path / out), "--live-dir", str(tmp_path / f"{out}-live"),
             "--checkpoint-dir", str(tmp_path / "checkpoints")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        proc = train(params, "models")
        other = train(write_params({"train": {"seed": 7}}, name="other.yaml"), "other")  # another run, same store
    finally:
        holder.kill()
        holder.communicate()
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"this run ({run_dir}) is being trained by another trainer (pid {holder.pid} on " in err
    assert not (tmp_path / "models").exists()
    assert other.returncode == 0, other.stderr
    assert run_dir.is_dir() and (tmp_path / "other" / "model.safetensors").is_file()


def test_optimizer_impl_picks_the_adamw_kernels():
    from pipeline.model import ModelConfig, build_model
    from pipeline.recipe.optim import make_optimizer

    model = build_model(ModelConfig())
    kernels = {
        impl: {
            k: make_optimizer(model, replace(default_params().train, optimizer_impl=impl)).defaults[k]
            for k in ("foreach", "fused")
        }
        for impl in ("auto", "for_loop", "foreach", "fused")
    }
    assert kernels["auto"] == {"foreach": None, "fused": None}  # torch decides per device
    assert kernels["for_loop"] == {"foreach": False, "fused": None}
    assert kernels["foreach"] == {"foreach": True, "fused": None}
    assert kernels["fused"] == {"foreach": None, "fused": True}


def test_the_logged_training_loss_is_plain_cross_entropy_like_the_validation_loss(
    tmp_path, tiny_raw, write_params, monkeypatch
):
    # with label smoothing 0.5 over 10 classes the smoothed loss never drops below the target's entropy, 1.68;
    # the plain cross-entropy of a model that learned the task does (the optimum is -ln 0.55 = 0.60)
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, write_params({"train": {"epochs": 8, "lr": 0.003, "label_smoothing": 0.5}}))
    curves = tmp_path / "live" / "plots" / "metrics" / "loss"
    train, val = (float((curves / f"{c}.tsv").read_text().splitlines()[-1].split("\t")[-1]) for c in ("train", "val"))
    assert train < 1.5 and val < 1.5  # the last epoch's
    assert train == pytest.approx(val, abs=0.3)


def test_a_diverging_run_stops_within_a_few_steps_not_at_the_end_of_the_epoch(
    tmp_path, tiny_raw, write_params, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    params = write_params({"train": {"batch_size": 4, "lr": 1e30, "epochs": 1}})  # 50 steps per epoch
    with pytest.raises(SystemExit) as info:
        run_train(tmp_path, params)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: training diverged at epoch 1, step 25 (loss ")
    assert err.endswith("; lower train.lr") and not (tmp_path / "models").exists()


def test_the_summarys_next_step_fits_how_the_stage_was_started(monkeypatch):
    from pipeline.train import next_step

    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert next_step(Path("out/models")) == "python -m pipeline.evaluate --model-dir out/models (test accuracy)"
    monkeypatch.setenv("DVC_STAGE", "train")  # under dvc repro the evaluate stage follows by itself
    assert next_step(Path("models")).startswith("the evaluate stage scores the test set; then dvc metrics show")


def test_gradient_accumulation_takes_the_same_step_up_to_rounding(tmp_path, tiny_raw, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = {}
    for accum in (1, 4):  # a global batch of 20: one backward of 20, or four of 5
        run_train(tmp_path, write_params({"train": {"epochs": 1, "grad_accum": accum}}), "--fresh")
        weights[accum] = load_file(str(tmp_path / "models" / "model.safetensors"))
        reset_accelerate_state()
    diff = max(float((weights[4][k] - weights[1][k]).abs().max()) for k in weights[1])
    print(f"largest weight difference, accumulation 4 against 1, after 10 steps: {diff:.2e}")
    assert 0 < diff < 1e-5  # the same gradient, summed in another order


def test_a_batch_that_does_not_split_into_the_accumulation_is_refused(tmp_path, tiny_raw, write_params, capsys):
    with pytest.raises(SystemExit):
        run_train(tmp_path, write_params({"train": {"grad_accum": 3}}))  # 20 per process
    assert "is 20 per process, which must divide by train.grad_accum (3)" in capsys.readouterr().err
