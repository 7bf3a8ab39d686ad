"""The benchmark script runs end to end in --quick mode (correctness only: no timing asserts)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_raw

pytestmark = pytest.mark.slow


def test_quick_benchmark_reports_every_variant_and_recipe_against_the_seed_loop(tmp_path):
    raw = write_raw(tmp_path / "raw", n_train=3200, n_test=300)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--quick", "--data", str(raw), "--out", str(out),
         "--targets", "0.05", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    speed = report["throughput"]
    cpu_options = {"default", "nchw", "bf16", "foreach", "fused", "compile", "bf16-b512"}
    assert set(speed) == {"seed"} | cpu_options  # cudnn-benchmark is GPU-only
    for row in speed.values():
        assert row["samples_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["ratio_vs_seed"] > 0
        assert row["samples_per_s_rounds"] == [row["samples_per_s"]]  # --quick: one round
    assert speed["seed"]["ratio_vs_seed"] == 1.0
    assert speed["default"]["samples"] == 1920 and speed["bf16-b512"]["samples"] == 1536  # whole global batches
    accuracy = report["accuracy"]
    assert set(accuracy) == {"seed", "default", "fast", "beyond"}
    assert accuracy["beyond"]["recipe"]["model"] == "bn_cnn"
    for row in accuracy.values():
        assert len(row["curve"]) == 2  # --quick: two epochs, a test accuracy after each
        assert row["curve"][0]["train_s"] < row["curve"][1]["train_s"] == row["train_s"]
        assert 0.0 <= row["final_test_accuracy"] <= 1.0
        assert row["to_target"]["0.050"]["train_s"] == row["curve"][0]["train_s"]  # 5% is reached at once
        assert set(row["to_target"]) == {"0.050", "0.500"}
    assert accuracy["seed"]["to_target"]["0.050"]["ratio_vs_seed"] == 1.0
    for row in report["datapath"].values():
        assert row["data_ms_per_step"] > 0 and 0 < row["data_share"] < 1
    assert report["machine"]["torch"] and "| compile |" in proc.stdout and "| beyond |" in proc.stdout


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_to_target_ratios_and_the_seed_loop_that_never_gets_there():
    bench = load_benchmark()
    common = {"samples_per_s": 1000.0, "peak_rss_mb": 500.0}
    seed = {**common, "train_s": 300.0, "curve": [{"train_s": 100.0, "test_accuracy": 0.89},
                                        {"train_s": 300.0, "test_accuracy": 0.905}]}  # fmt: skip
    fast = {**common, "train_s": 20.0, "curve": [{"train_s": 10.0, "test_accuracy": 0.902},
                                       {"train_s": 20.0, "test_accuracy": 0.912}]}  # fmt: skip
    slow = {**common, "train_s": 50.0, "curve": [{"train_s": 50.0, "test_accuracy": 0.85}]}
    report = bench.summarise(
        {"throughput": {}, "accuracy": {"seed": seed, "fast": fast, "slow": slow}, "datapath": {}}, [0.90, 0.91]
    )
    rows = report["accuracy"]
    assert rows["fast"]["to_target"]["0.900"] == {"train_s": 10.0, "ratio_vs_seed": 30.0, "ratio_is_lower_bound": False}
    # the seed loop never reached 91%: its whole 300 s run bounds its time from below
    assert rows["fast"]["to_target"]["0.910"] == {"train_s": 20.0, "ratio_vs_seed": 15.0, "ratio_is_lower_bound": True}
    assert rows["seed"]["to_target"]["0.910"] == {"train_s": None}
    assert rows["slow"]["to_target"]["0.900"] == {"train_s": None} and rows["slow"]["final_test_accuracy"] == 0.85
    per_seed = {"fast/seed0": fast, "fast/seed1": {**fast, "train_s": 30.0, "curve": [
        {"train_s": 15.0, "test_accuracy": 0.90}, {"train_s": 30.0, "test_accuracy": 0.908}]}}  # fmt: skip
    many = bench.summarise({"throughput": {}, "accuracy": {"seed": seed, **per_seed}, "datapath": {}}, [0.90, 0.91])
    mean = many["accuracy"]["fast (mean)"]
    assert mean["seeds"] == 2 and mean["final_test_accuracy"] == 0.91 and mean["train_s"] == 25.0
    assert mean["to_target"]["0.900"] == {"train_s": 12.5, "ratio_vs_seed": 24.0, "ratio_is_lower_bound": False}
    assert mean["to_target"]["0.910"] == {"train_s": None}  # seed 1 never got there
    table = bench.markdown({**report, "machine": {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2"}})
    assert "| fast | 0.9120 | 20.0 |" in table and "10.0 s (30.0×) | 20.0 s (>15.0×)" in table
    assert "| slow | 0.8500 |" in table and "not reached | not reached" in table


def test_benchmark_without_data_says_what_to_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--quick", "--data", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "run `dvc repro download`" in proc.stderr


def test_step_profile_splits_seed_loop_time_and_groups_pipeline_ops(tmp_path):
    raw = write_raw(tmp_path / "raw", n_train=3200, n_test=10)
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.profile_step", "--steps", "4", "--data", str(raw),
         "--out", str(out)],
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
    convs = report["conv_rates_fp32"]
    layers = {"1->16 3x3 on 28x28", "16->16 3x3 on 26x26", "16->32 5x5 on 12x12", "32->32 5x5 on 8x8"}
    assert {c["layer"] for c in convs} == layers  # the tutorial CNN's four convolutions, each timed both ways
    assert all(c["forward_gflops"] > 0 and c["backward_gflops"] > 0 for c in convs)


def test_throughput_rounds_give_medians_and_ratios_paired_by_round():
    bench = load_benchmark()
    seed = [{"samples_per_s": r, "peak_rss_mb": 800.0} for r in (2000.0, 1000.0, 2100.0)]
    default = [{"samples_per_s": r, "first_epoch_samples_per_s": f, "peak_rss_mb": m}
               for r, f, m in ((6000.0, 4000.0, 900.0), (3000.0, 2000.0, 950.0), (7350.0, 5000.0, 910.0))]  # fmt: skip
    rows = bench.merge_rounds({"seed": seed, "default": default})
    assert rows["seed"]["ratio_vs_seed"] == 1.0 and rows["seed"]["ratio_vs_seed_range"] == [1.0, 1.0]
    row = rows["default"]
    assert row["samples_per_s"] == 6000.0 and row["samples_per_s_rounds"] == [6000.0, 3000.0, 7350.0]
    # round 2 hit a slow spell on both sides: paired with its own seed run it is still 3.0x, not 1.5x
    assert row["ratio_vs_seed"] == 3.0 and row["ratio_vs_seed_range"] == [3.0, 3.5]
    assert row["first_epoch_samples_per_s"] == 4000.0 and row["peak_rss_mb"] == 950.0
    machine = {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2", "throughput_samples_per_epoch": 20000}
    table = bench.markdown({"throughput": rows, "accuracy": {}, "datapath": {}, "machine": machine})
    assert "median of 3 rounds" in table and "| default | 6000 | 3.0 | 3.0-3.5 | 4000 | 950 |" in table


def test_recipe_check_runs_a_recipe_per_seed_with_overrides_laid_on_top(tmp_path):
    import yaml

    raw = write_raw(tmp_path / "raw", n_train=600, n_test=100)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["data"].update(subset=0, val_size=100)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(base))
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "scripts.recipe_check", "--params", str(params), "--data", str(raw)]
    proc = subprocess.run(
        [*cmd, "--recipe", "fast", "--set", "train.epochs=1", "--seeds", "0", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    train = report["params"]["train"]
    assert train["label_smoothing"] == 0.1 and train["mixed_precision"] == "bf16"  # from recipes/fast.yaml
    assert train["epochs"] == 1  # --set wins over the recipe
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    assert all(0 <= r["test_accuracy"] <= 1 for r in report["runs"])
    bad = subprocess.run([*cmd, "--set", "trian.epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: override section 'trian' is not a params section")
    assert "Traceback" not in bad.stderr
