"""Real `dvc repro` / `dvc exp run` in a temporary git copy of this repo, on a small subset of real data."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.dataset import CLASSES
from pipeline.tracking import TRACES
from tests.conftest import E2E, EXPERIMENTS, copy_repo, set_params, sh, slurm_job

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def repo(reproduced) -> Path:
    return reproduced.repo


def test_repro_runs_all_stages_and_writes_declared_metrics(reproduced):
    repo, out = reproduced.repo, reproduced.log
    for stage in ("download", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    assert "had defaults used instead" not in out  # accelerate's warning, without an accelerate config
    test = json.loads((repo / "metrics" / "test.json").read_text())["test"]
    assert test["samples"] == E2E["data"]["subset"]
    assert list(test) == ["accuracy", "loss", "samples"]
    cm = json.loads((repo / "eval" / "confusion.json").read_text())["counts"]
    assert sum(map(sum, cm)) == E2E["data"]["subset"]
    train = json.loads((repo / "dvclive" / "train" / "metrics.json").read_text())
    assert train["step"] == 2 and train["accuracy"].keys() == train["loss"].keys() == {"val"}
    assert not TRACES & train.keys()  # timings and lr are curves, not metrics
    assert sorted(p.name for p in (repo / "data" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    ]  # fmt: skip
    shown = sh(repo, "dvc", "metrics", "show").stdout
    assert max(map(len, shown.splitlines())) <= 120, shown  # held-out results only; per class in eval/
    assert "test.accuracy" in shown and "accuracy.val" in shown and "test.per_class" not in shown
    per_class = (repo / "eval" / "per_class.csv").read_text()
    assert all(f"{name}," in per_class for name in CLASSES)
    parity = json.loads((repo / "onnx" / "model.json").read_text())["parity"]
    assert parity["images"] == parity["same_class"] == E2E["data"]["subset"]
    assert json.loads((repo / "metrics" / "onnx.json").read_text())["onnx"]["diff"] <= 1e-4 and "onnx.diff" in shown


def test_second_repro_does_nothing(repo):
    out = sh(repo, "dvc", "repro").stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out


PLOT_TITLES = ("Loss by epoch", "Accuracy by epoch", "Learning rate by epoch", "Training throughput by epoch",
               "Test confusion matrix", "Test accuracy by class")  # fmt: skip
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, and with every network route closed: a page that needs a CDN renders nothing here.
OFFLINE_CHROMIUM = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000", "--window-size=1280,2400",
]  # fmt: skip


def test_plots_show_draws_every_plot_from_a_page_with_no_cdn(repo, tmp_path):
    outputs = ["eval/predictions.csv", "eval/per_class.csv", "eval/misclassified.png",
               "dvclive/train/plots/images/train_samples.png", "dvclive/train/plots/metrics/loss/val.tsv",
               "dvclive/train/plots/metrics/samples_per_s.tsv"]  # fmt: skip
    for path in outputs:
        assert (repo / path).is_file(), path
    sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    for title in PLOT_TITLES:
        assert title in html, title
    assert "misclassified.png" in html and "train_samples.png" in html
    assert "<script src=" not in html and "cdn.jsdelivr" not in html  # Vega is inline (.dvc/plots/offline.html)


def test_plots_page_renders_in_headless_chromium_with_networking_off(repo, tmp_path):
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("CI must render the plots: apt-get install chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    url = (tmp_path / "plots" / "index.html").as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *OFFLINE_CHROMIUM, *profile, "--dump-dom", url], capture_output=True,
                         text=True, timeout=120).stdout  # fmt: skip
    assert dom.count('class="marks"') >= len(PLOT_TITLES)  # Vega drew each chart (DVC embeds them as SVG)
    assert dom.count("<img") >= 2  # the two image grids
    shot = tmp_path / "plots.png"
    subprocess.run([CHROMIUM, *OFFLINE_CHROMIUM, *profile, f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)  # fmt: skip
    from PIL import Image

    with Image.open(shot) as im:
        grey = im.convert("L").resize((320, 600))
    ink = sum(1 for v in grey.tobytes() if v < 200) / (320 * 600)
    assert ink > 0.03, f"the screenshot is nearly blank ({ink:.1%} ink)"
    if os.environ.get("PLOTS_SCREENSHOT"):  # keep it to look at
        shutil.copy(shot, os.environ["PLOTS_SCREENSHOT"])


def test_changing_a_train_param_reruns_train_evaluate_and_export_only(reproduced, tmp_path):
    repo = copy_repo(reproduced.repo, tmp_path / "repo")
    set_params(repo, {"train": {"lr": 0.004}})
    out = sh(repo, "dvc", "repro").stdout
    assert "Stage 'download' didn't change, skipping" in out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out and "Running stage 'export'" in out


def test_exp_run_with_a_new_lr_shows_in_metrics_and_params_diff_without_timings(experiments):
    repo = experiments.repo
    metrics = json.loads(sh(repo, "dvc", "metrics", "diff", "--all", "lr-high", "lr-low", "--json").stdout)
    assert "test.accuracy" in metrics["metrics/test.json"] and "loss.val" in metrics["dvclive/train/metrics.json"]
    names = {name.split(".")[0] for by_name in metrics.values() for name in by_name}
    assert not names & TRACES, names  # results only: nothing that differs between two runs of the same params
    metrics = json.loads(sh(repo, "dvc", "metrics", "diff", "HEAD", "lr-low", "--json").stdout)
    accuracy = metrics["metrics/test.json"]["test.accuracy"]
    assert accuracy["new"] != accuracy["old"]  # lr-low against the baseline
    params = json.loads(sh(repo, "dvc", "params", "diff", "HEAD", "lr-low", "--json").stdout)
    lr = params["params.yaml"]["train.lr"]
    assert (lr["old"], lr["new"]) == (0.002, 0.001)  # params.yaml's lr against lr-low's


def test_the_guides_experiment_table_fits_120_columns_best_first(experiments):
    guide = (REPO / "docs" / "experiments.md").read_text()
    line = next(x for x in guide.splitlines() if x.startswith("dvc exp show --only"))
    table = sh(experiments.repo, *shlex.split(line), COLUMNS="120").stdout
    assert max(map(len, table.splitlines())) <= 120, table
    header = table.splitlines()[1].split()
    assert header[0] == "Experiment" and {"test.accuracy", "train.lr"} <= set(header), table  # the changed param
    assert "Created" not in header and "test.samples" not in header, table
    rows = [row.split("]")[1].split() for row in table.splitlines() if "[lr-" in row]  # the experiments
    scores = [float(row[header.index("test.accuracy") - 1]) for row in rows]  # less "Experiment"
    assert len(scores) == len(EXPERIMENTS) and scores == sorted(scores, reverse=True), table


def test_exp_apply_restores_the_model_behind_each_experiments_metrics(experiments, tmp_path):
    repo = copy_repo(experiments.repo, tmp_path / "repo")
    weights = {}
    for name in EXPERIMENTS:
        sh(repo, "dvc", "exp", "apply", name)
        recorded = (repo / "metrics" / "test.json").read_bytes()
        weights[name] = (repo / "models" / "model.safetensors").read_bytes()
        out = tmp_path / f"{name}.json"
        sh(repo, sys.executable, "-m", "pipeline.evaluate", "--out", str(out), "--eval-dir", str(tmp_path / "eval"))
        assert out.read_bytes() == recorded  # the restored model reproduces that experiment's metrics exactly
    assert weights["lr-high"] != weights["lr-low"]


def test_plots_diff_of_two_experiments_overlays_curves_and_shows_both_confusion_matrices(experiments):
    shown = json.loads(sh(experiments.repo, "dvc", "plots", "diff", "lr-high", "lr-low", "--json").stdout)["data"]
    for title in PLOT_TITLES:
        assert set(shown[title][0]["revisions"]) == {"lr-high", "lr-low"}, title
    curve_revs = {row["rev"] for row in shown["Loss by epoch"][0]["content"]["data"]["values"]}
    assert curve_revs == {"lr-high", "lr-low"}  # one chart, both experiments' curves
    images = [item for key, items in shown.items() if key.endswith("misclassified.png") for item in items]
    assert {rev for item in images for rev in item["revisions"]} == {"lr-high", "lr-low"}


def test_a_registered_model_version_downloads_with_dvc_artifacts_get(experiments, tmp_path):
    repo = copy_repo(experiments.repo, tmp_path / "repo")
    sh(repo, "git", "tag", "-a", "fashion-cnn@v1.0.0", "-m", "register the baseline model")  # GTO's tag format
    sh(repo, "dvc", "artifacts", "get", ".", "fashion-cnn", "--rev", "v1.0.0", "-o", str(tmp_path / "got"))
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == ["model.json", "model.safetensors"]
    out = tmp_path / "test.json"
    sh(repo, sys.executable, "-m", "pipeline.evaluate", "--model-dir", str(tmp_path / "got"), "--out", str(out),
       "--eval-dir", str(tmp_path / "eval"))  # fmt: skip
    registered = tmp_path / "registered.json"  # the metrics that version recorded, from the DVC cache
    sh(repo, "dvc", "get", ".", "metrics/test.json", "--rev", "fashion-cnn@v1.0.0", "-o", str(registered))
    assert out.read_text() == registered.read_text()  # it is the model whose metrics that version recorded


def test_repro_honours_the_accelerate_config_file_and_keeps_the_answer(reproduced, tmp_path):
    repo = copy_repo(reproduced.repo, tmp_path / "repo")
    before = json.loads((repo / "dvclive" / "train" / "metrics.json").read_text())
    processes_before = json.loads((repo / "models" / "model.json").read_text())["provenance"]["processes"]
    config = str(repo / "scripts" / "accelerate" / "cpu-2proc.yaml")
    out = sh(repo, "dvc", "repro", "--force", "--single-item", "train", ACCELERATE_CONFIG_FILE=config).stdout
    assert "2 process(es) on cpu" in out and "epoch 2/2" in out  # forced: it trains, nothing is re-exported
    after = json.loads((repo / "dvclive" / "train" / "metrics.json").read_text())
    provenance = json.loads((repo / "models" / "model.json").read_text())["provenance"]
    assert (processes_before, provenance["processes"]) == (1, 2)  # the launch is on the model's record
    # the same answer up to float rounding, which 100 steps at this lr amplify (test_distributed checks 1 against
    # 2 processes to 1e-5 on a shorter run)
    assert after["accuracy"]["val"] == pytest.approx(before["accuracy"]["val"], abs=0.03)


def test_the_sbatch_script_drives_dvc_repro_with_the_train_stage_on_two_loopback_nodes(reproduced, tmp_path):
    # scripts/slurm/train.sbatch as Slurm runs its batch step on the first node: dvc repro there, and the train
    # stage's launch through srun on both "nodes" (stand-ins for srun and scontrol, tests/slurm/; 127.0.0.1)
    repo = copy_repo(reproduced.repo, tmp_path / "repo")
    set_params(repo, {"train": {"lr": 0.003}})
    env = slurm_job(2, repo, HF_HOME=str(tmp_path / "no-accelerate-config"), PIPELINE_CPU_THREADS="1")
    proc = subprocess.run(["bash", "scripts/slurm/train.sbatch"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Running stage 'train'" in proc.stdout and "2 process(es) on cpu (1 threads)" in proc.stdout, proc.stdout
    assert json.loads((repo / "models" / "model.json").read_text())["provenance"]["processes"] == 2
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status").stdout
    assert proc.stderr.count("error") == 0, proc.stderr


def test_a_queued_grid_runs_two_at_a_time_sharing_the_cores_and_taking_a_gpu_each(reproduced, tmp_path):
    # the README's sweep, on a 2 x 1 grid: queued, then `dvc queue start -j 2`: each run takes half the cores, and on
    # a machine with GPUs (two, simulated by PIPELINE_GPUS, which the queue's workers pass on) one GPU each
    repo = copy_repo(reproduced.repo, tmp_path / "repo")
    grid = ["-S", "train.lr=0.001,0.003", "-S", "train.seed=0", "-S", "train.epochs=1"]
    sh(repo, "dvc", "exp", "run", "--queue", *grid)
    sh(repo, "dvc", "queue", "start", "-j", "2", PIPELINE_GPUS="0,1", PIPELINE_GPU_LOCK_DIR=str(tmp_path / "locks"))
    try:
        deadline = time.monotonic() + 300
        while re.search(r"\b(Queued|Running)\b", sh(repo, "dvc", "queue", "status").stdout):
            assert time.monotonic() < deadline, "the queue did not finish"
            time.sleep(2)
    finally:
        sh(repo, "dvc", "queue", "stop", "--kill", check=False)
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    runs = [e for commit in shown for e in commit.get("experiments") or []]
    ran = set()
    for run in runs:
        data = run["revs"][0]["data"]
        train = data["params"]["params.yaml"]["data"]["train"]
        ran.add((train["lr"], train["seed"]))
        assert 0 <= data["metrics"]["metrics/test.json"]["data"]["test"]["accuracy"] <= 1
    assert ran == {(0.001, 0), (0.003, 0)}
    for run in runs:
        assert re.search(r"^GPU [01] \(of 0,1\) for this run$", sh(repo, "dvc", "queue", "logs", run["name"]).stdout,
                         re.M)  # fmt: skip
    log = sh(repo, "dvc", "queue", "logs", runs[-1]["name"]).stdout  # one that ran beside another
    share = max(1, (os.cpu_count() or 1) // 2)
    assert f"1 process(es) on cpu ({share} threads)" in log  # its share of the cores, not all of them
