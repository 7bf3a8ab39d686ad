"""The benchmark script runs end to end in --quick mode (correctness only: no timing asserts)."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from bench.bench_stage import at_batch, recipe_params
from bench.benchmark import OPTIONS, RECIPES, SPEED_ROWS, Job, plan
from pipeline.params import with_changes
from tests.conftest import REPO, write_raw


def test_the_plan_runs_every_option_per_round_then_the_recipes_per_seed_then_their_data_paths():
    args = argparse.Namespace(parts=["throughput", "accuracy", "datapath"], options=list(OPTIONS), repeats=2,
                              quick=False, recipes=list(RECIPES), seeds=[3, 4], batches=[])  # fmt: skip
    jobs = plan(args)
    cpu_options = [o for o in OPTIONS if o != "cudnn-benchmark"]
    throughput = [j for j in jobs if j.part == "throughput"]
    assert [(j.variant, j.round) for j in throughput] == [(v, r) for r in (0, 1) for v in ["seed", *cpu_options]]
    accuracy = [j.row for j in jobs if j.part == "accuracy"]
    assert accuracy == ["seed"] + [f"{r}/seed{s}" for r in RECIPES for s in (3, 4)]
    assert [j.variant for j in jobs if j.part == "datapath"] == list(RECIPES)
    assert all(Job.from_json(j.to_json()) == j for j in jobs)  # what a child process is told, it reads back
    assert not [j for j in jobs if j.part == "scaling"]  # on request only


def test_the_scaling_part_and_batches_add_their_rows():
    args = argparse.Namespace(parts=["accuracy", "scaling"], options=[], repeats=1, quick=False,
                              recipes=["default"], seeds=[0], batches=[512])  # fmt: skip
    jobs = plan(args)
    assert [j.row for j in jobs if j.part == "accuracy"] == ["seed", "default", "default@b512"]
    scaling = [j.variant for j in jobs if j.part == "scaling"]
    assert scaling[:2] == ["1proc", "2proc"] and "bn_cnn/b1024" in scaling and "tutorial_cnn/b64" in scaling
    assert at_batch(recipe_params("default").train, 512) == {"batch_size": 512, "lr": 0.004}  # 0.002 x sqrt(4)


@pytest.mark.slow
def test_quick_benchmark_reports_options_and_recipes_against_the_seed_loop(tmp_path):
    # a speed option and a recipe against the seed loop, end to end; which jobs each makes is the plan's test
    raw = write_raw(tmp_path / "raw", n_train=1600, n_test=500)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.benchmark", "--quick", "--data", str(raw), "--out", str(out),
         "--targets", "0.05", "0.5", "--options", "bf16-b512", "--recipes", "beyond"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    speed = report["throughput"]
    assert set(speed) == {"seed", "bf16-b512"}
    for row in speed.values():
        assert row["samples_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["ratio_vs_seed"] > 0
        assert row["samples_per_s_rounds"] == [row["samples_per_s"]]  # --quick: one round
    assert speed["seed"]["ratio_vs_seed"] == 1.0
    assert speed["bf16-b512"]["samples"] == 512  # whole global batches of the 1,000 samples
    accuracy = report["accuracy"]
    assert set(accuracy) == {"seed", "beyond"}
    assert accuracy["beyond"]["recipe"]["model"] == "resnet9"
    for row in accuracy.values():
        assert len(row["curve"]) == 2  # --quick: two epochs, a test accuracy after each
        assert row["curve"][0]["train_s"] < row["curve"][1]["train_s"] == row["train_s"]
        assert 0.0 <= row["final_test_accuracy"] <= 1.0
        assert row["to_target"]["0.050"]["train_s"] == row["curve"][0]["train_s"]  # 5% is reached at once
        assert set(row["to_target"]) == {"0.050", "0.500"}
    assert accuracy["seed"]["to_target"]["0.050"]["ratio_vs_seed"] == 1.0
    for row in report["datapath"].values():
        assert row["data_ms_per_step"] > 0 and 0 < row["data_share"] < 1
    assert report["machine"]["seed_loop_threads"] >= 1 and report["machine"]["stage_threads"] >= 1
    assert report["machine"]["torch"] and "| bf16-b512 |" in proc.stdout and "| beyond |" in proc.stdout


@pytest.mark.parametrize(("recipe", "row"), SPEED_ROWS.items())
def test_each_recipes_speed_row_trains_at_the_recipes_speed_settings(recipe, row):
    def speed(p):  # what sets the step's speed; lr, smoothing and the like do not
        t = p.train
        return p.model.name, t.batch_size, t.mixed_precision, t.channels_last, t.compile, t.optimizer_impl, t.hflip

    assert speed(recipe_params(recipe)) == speed(with_changes(recipe_params("default"), OPTIONS[row]))


def test_a_saved_report_prints_again_with_other_targets_without_measuring(tmp_path):
    curve = [{"train_s": 10.0, "test_accuracy": 0.9}, {"train_s": 20.0, "test_accuracy": 0.95}]
    row = {"samples_per_s": 100.0, "peak_rss_mb": 1.0, "train_s": 20.0, "curve": curve}
    machine = {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2"}
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"throughput": {}, "accuracy": {"seed": row}, "datapath": {}, "machine": machine}))
    out = tmp_path / "again.json"
    run = [sys.executable, "-m", "bench.benchmark", "--data", str(tmp_path / "none"), "--report"]
    proc = subprocess.run([*run, str(saved), "--targets", "0.94", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| seed | 0.9500 | 20.0 | 100 | 20.0 s (1.0×) |" in proc.stdout
    assert json.loads(out.read_text())["accuracy"]["seed"]["to_target"]["0.940"]["train_s"] == 20.0
    (tmp_path / "bad.json").write_text("[]")
    for bad in ("bad.json", "missing.json"):
        proc = subprocess.run([*run, str(tmp_path / bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "pass the JSON" in proc.stderr


def test_benchmark_without_data_says_what_to_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.benchmark", "--quick", "--data", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "run `dvc repro download`" in proc.stderr


@pytest.mark.slow
def test_step_profile_splits_seed_loop_time_and_groups_pipeline_ops(tmp_path):
    raw = write_raw(tmp_path / "raw", n_train=3200, n_test=10)
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.profile_step", "--steps", "4", "--data", str(raw),
         "--batches", "64", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    seed = report["seed_loop"]
    assert 0 <= seed["data_share"] < 1 and seed["max_gain_from_data_path"] >= 1
    for key in ("pipeline_fp32", "pipeline_bf16"):
        shares = report[key]["share_by_group"]
        assert shares["convolution"] > 0 and sum(shares.values()) <= 1.0001
        assert report[key]["top_ops"] and report[key]["samples_per_s_profiled"] > 0
    ceiling = report["compute_ceiling"]
    assert 10 < ceiling["mflop_per_sample"] < 20  # the tutorial CNN: ~16 MFLOP forward + backward
    assert ceiling["samples_per_s_for_8x_seed"] > ceiling["seed_loop_samples_per_s"] > 0
    for dtype in ("fp32", "bf16"):
        expected = ceiling[f"matmul_gflops_{dtype}"] * 1e3 / ceiling["mflop_per_sample"]
        assert ceiling[f"ceiling_samples_per_s_{dtype}"] == pytest.approx(expected, rel=1e-3)
    layers = {"1->16 3x3 on 28x28", "16->16 3x3 on 26x26", "16->32 5x5 on 12x12", "32->32 5x5 on 8x8"}
    by_batch = [report["conv_rates_fp32"], *report["conv_rates_fp32_other_batches"]]
    assert [rates["batch"] for rates in by_batch] == [128, 64]
    for rates in by_batch:
        convs = rates["layers"]
        assert {c["layer"] for c in convs} == layers  # the tutorial CNN's four convolutions, each timed both ways
        assert all(c["forward_gflops"] > 0 and c["backward_gflops"] > 0 for c in convs)
        assert rates["step_us_per_sample"] > 0


@pytest.mark.slow
def test_recipe_check_runs_a_recipe_per_seed_with_overrides_laid_on_top(tmp_path):
    import yaml

    raw = write_raw(tmp_path / "raw", n_train=600, n_test=100)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["data"].update(subset=0, val_size=100)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(base))
    out = tmp_path / "results" / "check.json"  # its folder is made
    cmd = [sys.executable, "-m", "bench.recipe_check", "--params", str(params), "--data", str(raw)]
    proc = subprocess.run(
        [*cmd, "--recipe", "fast", "--set", "train.epochs=2", "--set", "data.val_size=100", "--seeds", "0", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    train = report["params"]["train"]
    assert train["label_smoothing"] == 0.1 and train["mixed_precision"] == "bf16"  # from recipes/fast.yaml
    assert train["epochs"] == 2 and report["params"]["data"]["val_size"] == 100  # --set wins over the recipe
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    assert all(0 <= r["test_accuracy"] <= 1 for r in report["runs"])
    bad = subprocess.run([*cmd, "--set", "trian.epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: override section 'trian' is not a params section")
    assert "Traceback" not in bad.stderr


def test_recipe_check_ends_a_failed_stage_in_one_line_without_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "bench.recipe_check", "--data", str(tmp_path), "--seeds", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "error: the train stage (seed 0) failed (its error is above); nothing was written"
    )
    unknown = subprocess.run([*cmd, "--recipe", "fastest"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.startswith(
        "error: recipe 'fastest' not found in recipes/; known: beyond, fast, two-minute"
    )


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["2proc", "bn_cnn/b256"])
def test_a_scaling_row_trains_on_its_processes_or_at_its_batch(tmp_path, variant):
    raw = write_raw(tmp_path / "raw", n_train=1600, n_test=10)
    job = Job("scaling", variant).to_json()
    proc = subprocess.run([sys.executable, "-m", "bench.benchmark", "--job", job, "--quick", "--data", str(raw)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])  # as the stage recorded the run (models/model.json)
    assert row["samples_per_s"] > 0
    if variant == "2proc":
        share = max(1, (os.cpu_count() or 1) // 2)  # each process's share of the cores
        assert (row["processes"], row["threads"], row["model"]) == (2, share, "tutorial_cnn")
    else:
        assert (row["processes"], row["model"], row["batch_size"], row["lr"]) == (1, "bn_cnn", 256, 0.002828)


def test_the_ablation_runs_each_technique_through_the_train_stage_and_tables_it(tmp_path):
    from bench.ablation import main as ablation

    raw = write_raw(tmp_path / "raw", n_train=1600, n_test=500)
    out = tmp_path / "ablation.json"
    assert ablation(["--data", str(raw), "--quick", "--only", "base", "alternate-flip", "--epochs", "2",
                     "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["rows"]["alternate-flip"]["recipe"]["alternate_flip"] is True
    assert report["rows"]["base"]["recipe"]["alternate_flip"] is False
    table = out.with_suffix(".md").read_text()
    assert "| alternate-flip |" in table and " pts |" in table


def test_a_negative_score_last_is_refused_in_one_line_before_any_measurement():
    proc = subprocess.run([sys.executable, "-m", "bench.benchmark", "--score-last", "-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "argument --score-last: invalid non_negative value: '-1'" in proc.stderr
    assert "Traceback" not in proc.stderr
