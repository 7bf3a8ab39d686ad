"""dvc.lock tells the truth: real `dvc repro` / `dvc exp` runs in a temporary git copy of this repo.

Every model comes from the code, data and params recorded beside it; the pipeline stays up to date
after the ordinary DVC workflows; killed runs resume only themselves, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import child_env, copy_repo, model_md5, set_params, sh

pytestmark = pytest.mark.slow

UP_TO_DATE = "Data and pipelines are up to date."


@pytest.fixture
def first(reproduced) -> str:
    """The baseline's model md5 (conftest's E2E params: 50 steps per epoch, a checkpoint every 10)."""
    return reproduced.md5


@pytest.fixture
def repo(reproduced, tmp_path) -> Path:
    return copy_repo(reproduced.repo, tmp_path / "repo")


def assert_up_to_date(repo: Path) -> None:
    assert sh(repo, "dvc", "status").stdout.strip() == UP_TO_DATE
    out = sh(repo, "dvc", "repro").stdout
    assert "Running stage" not in out and UP_TO_DATE in out


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_a_code_change_retrains_and_reverting_it_gives_the_first_model_back(repo, first):
    # an architecture change (fc 256 -> 200): the old code gave a load_state_dict traceback here, and a
    # change that kept the shapes (OneCycle's pct_start) silently re-exported the old weights
    model = repo / "pipeline" / "model.py"
    edit(model, "nn.Linear(self.flat_features, 256), nn.ReLU(),\n            nn.Linear(256, 128)",
         "nn.Linear(self.flat_features, 200), nn.ReLU(),\n            nn.Linear(200, 128)")  # fmt: skip
    proc = sh(repo, "dvc", "repro", "train")  # (evaluate would rerun too; the record of train is the point)
    assert "Running stage 'train'" in proc.stdout and "epoch 2/2" in proc.stdout
    assert "resuming" not in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert model_md5(repo) != first  # new code, new weights
    recorded = json.loads((repo / "models" / "model.json").read_text())["provenance"]["code"]["pipeline/model.py"]
    assert recorded == hashlib.sha256(model.read_bytes()).hexdigest()
    sh(repo, "git", "checkout", "--", "pipeline/model.py")
    sh(repo, "dvc", "repro", "train")
    assert model_md5(repo) == first
    assert_up_to_date(repo)  # the whole pipeline: evaluate's recorded model is the first one again


def test_repro_force_trains_from_scratch(repo, first):
    out = sh(repo, "dvc", "repro", "--force", "--single-item", "train").stdout
    assert "epoch 1/2" in out and "epoch 2/2" in out and "resuming" not in out
    assert model_md5(repo) == first  # the same code, data and params train the same weights


def start_repro(repo: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(["dvc", "repro", "--force", "--single-item", "train"], cwd=repo, env=child_env(),
                                stdout=f, stderr=subprocess.STDOUT)  # fmt: skip


def wait_for_checkpoint(repo: Path, proc: subprocess.Popen, step: int) -> None:
    """Until a checkpoint at ``step`` or later exists in the run's folder (mid-epoch 1 for step < 50)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        steps = [int(p.name.removeprefix("step-")) for p in (repo / "checkpoints").glob("*/step-*")]
        if max(steps, default=0) >= step:
            return
        assert proc.poll() is None, "dvc repro ended before the checkpoint"
        time.sleep(0.001)
    raise AssertionError("no checkpoint in time")


def trainers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "pipeline.train" in p.cmdline()]


def test_sigkill_mid_epoch_then_repro_resumes_to_the_uninterrupted_model(repo, first, tmp_path):
    proc = start_repro(repo, tmp_path / "killed.log")
    wait_for_checkpoint(repo, proc, 30)
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:  # the whole tree at once, as a lost machine
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=10)
    out = sh(repo, "dvc", "repro", "--force", "--single-item", "train").stdout  # the same command again
    assert "resuming from checkpoints/" in out and "(epoch 1, step " in out
    assert model_md5(repo) == first  # bit for bit what the uninterrupted run wrote
    assert_up_to_date(repo)


def test_sigterm_to_dvc_ends_the_trainer_and_the_run_resumes(repo, first, tmp_path):
    log = tmp_path / "terminated.log"
    proc = start_repro(repo, log)
    wait_for_checkpoint(repo, proc, 20)
    running = trainers(proc)
    assert running, "no trainer process found under dvc"
    os.kill(proc.pid, signal.SIGTERM)  # dvc alone; its children are not signalled
    proc.wait()
    gone, alive = psutil.wait_procs(running, timeout=20)
    assert not alive, "the trainer trains on as an orphan"
    assert "which started this run, has exited: stopping" in log.read_text()
    out = sh(repo, "dvc", "repro", "--force", "--single-item", "train").stdout  # the lock was released, state kept
    assert "resuming from checkpoints/" in out
    assert model_md5(repo) == first


def test_exp_apply_of_an_experiment_and_of_the_baseline_keeps_the_pipeline_up_to_date(experiments, first, tmp_path):
    repo, changed = copy_repo(experiments.repo, tmp_path / "repo"), experiments.md5["lr-high"]
    assert changed != first
    sh(repo, "dvc", "exp", "apply", "lr-high")
    assert model_md5(repo) == changed
    assert_up_to_date(repo)
    sh(repo, "git", "checkout", "--", ".")  # back to the baseline: git for the small files ...
    sh(repo, "dvc", "checkout")  # ... DVC for the cached outputs
    assert model_md5(repo) == first
    assert_up_to_date(repo)


def test_git_checkout_then_dvc_checkout_keeps_the_pipeline_up_to_date(experiments, first, tmp_path):
    repo = copy_repo(experiments.repo, tmp_path / "repo")
    sh(repo, "dvc", "exp", "branch", "lr-high", "lr-high-branch")
    sh(repo, "git", "checkout", "-q", "lr-high-branch")
    sh(repo, "dvc", "checkout")
    assert model_md5(repo) == experiments.md5["lr-high"]
    assert_up_to_date(repo)
    sh(repo, "git", "checkout", "-q", "-")
    sh(repo, "dvc", "checkout")
    assert model_md5(repo) == first
    assert_up_to_date(repo)


def test_a_fresh_clone_and_dvc_pull_from_a_remote_is_up_to_date_and_serves_each_model_version(repo, first, tmp_path):
    # as the README's "Share" section does it: a default remote committed with the repo, a registered version
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    sh(repo, "git", "commit", "-qam", "a shared remote")
    sh(repo, "git", "tag", "-a", "fashion-cnn@v1.0.0", "-m", "first release")
    sh(repo, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    assert model_md5(clone) == first
    assert_up_to_date(clone)
    # a teammate with only the repository's address: the version by name, its files from the remote
    bare = tmp_path / "bare"
    sh(tmp_path, "git", "clone", "-q", "--bare", str(repo), str(bare))  # no workspace, no DVC cache
    got = tmp_path / "got"
    sh(tmp_path, "dvc", "artifacts", "get", str(bare), "fashion-cnn", "--rev", "v1.0.0", "-o", str(got))
    for name in ("model.safetensors", "model.json"):
        assert (got / name).read_bytes() == (repo / "models" / name).read_bytes()  # the tagged commit's model


OUTPUTS = ("models", "dvclive/train", "eval", "metrics", "onnx")  # every output of train, evaluate and export


def outputs(repo: Path) -> dict[str, bytes]:
    """Every file of the train, evaluate and export outputs, by path (DVC's .gitignore files left out)."""
    files = [p for folder in OUTPUTS for p in sorted((repo / folder).rglob("*")) if p.is_file()]
    return {str(p.relative_to(repo)): p.read_bytes() for p in files if p.name != ".gitignore"}


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("train.lr=-1", "error: train.lr must be > 0, got -1.0; the last good run (dvc.lock) had train.lr=0.004: set "
                        "it back in params.yaml; `dvc checkout --force` brings back the last good run's outputs"),
        ("train.lr=1e30", "error: training diverged at epoch 1, step 25 (loss "),
    ],
    ids=["bad-param", "divergence"],
)  # fmt: skip
def test_a_failed_run_after_an_uncommitted_good_one_loses_nothing_that_dvc_checkout_restores(repo, bad, says):
    set_params(repo, {"train": {"lr": 0.004}})
    sh(repo, "dvc", "repro")  # a good run, never committed
    good = outputs(repo)
    proc = sh(repo, "dvc", "exp", "run", "-S", bad, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(says), errors
    assert errors[0].endswith("; `dvc checkout --force` brings back the last good run's outputs")
    sh(repo, "dvc", "checkout", "--force")  # --force: a run that failed mid-training left its first files
    assert outputs(repo) == good


def test_going_back_to_params_already_run_restores_from_the_run_cache_without_training(repo):
    baseline = outputs(repo)
    set_params(repo, {"train": {"lr": 0.004}})
    sh(repo, "dvc", "repro")
    other = outputs(repo)
    sh(repo, "git", "checkout", "params.yaml")
    back = sh(repo, "dvc", "repro").stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in back and "Running stage" not in back
    assert outputs(repo) == baseline
    again = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.004").stdout
    assert "Stage 'train' is cached - skipping run" in again and "Running stage" not in again
    assert outputs(repo) == other


def test_a_launcher_precision_that_params_do_not_record_is_refused(repo, tmp_path):
    config = tmp_path / "bf16.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_machines: 1\n"
                      "num_processes: 1\nmixed_precision: bf16\nuse_cpu: true\n")  # fmt: skip
    proc = sh(repo, "dvc", "repro", "--force", "--single-item", "train", check=False,
              ACCELERATE_CONFIG_FILE=str(config))  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: the launcher asks for mixed precision bf16")
    assert "Traceback" not in proc.stdout + proc.stderr
