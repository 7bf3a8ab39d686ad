"""Kill real training runs with SIGKILL, run them again, and compare with an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, write_raw
from tests.test_distributed import free_port

pytestmark = pytest.mark.slow

TRAIN = str(REPO / "pipeline" / "train.py")
TIMING_KEYS = {"epoch_time_s", "samples_per_s", "train_time_s"}
PARAMS = (
    "data: {val_size: 77}\n"
    "train: {epochs: 3, batch_size: 8, lr: 0.003, seed: 5, eval_batch_size: 16,"
    " checkpoint_every_steps: 7, keep_checkpoints: 2, final_model: best}\n"
)  # 323 train samples: 40 steps/epoch, 120 in all; mid-epoch checkpoints every 7 steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    raw = write_raw(root / "raw", n_train=400, n_test=50)
    params = root / "params.yaml"
    params.write_text(PARAMS)
    return root, raw, params


def command(processes: int, out: Path, params: Path, raw: Path) -> list[str]:
    launch = [sys.executable] if processes == 1 else [
        "accelerate", "launch", "--quiet", "--multi_gpu", "--num_processes", str(processes),
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    return [*launch, TRAIN, "--params", str(params), "--data", str(raw), "--model-dir", str(out / "models"),
            "--live-dir", str(out / "live"), "--checkpoint-dir", str(out / "checkpoints"),
            "--cpu-threads", "1"]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def run_and_kill(cmd: list[str], ckpt_dir: Path, when: str) -> None:
    """Start training and SIGKILL its whole process group at the moment ``when`` names."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120

    def names(pattern: str) -> set[str]:
        return {p.name for p in ckpt_dir.glob(pattern)} if ckpt_dir.is_dir() else set()

    def newest() -> int:
        return max((int(n.removeprefix("step-")) for n in names("step-*")), default=0)

    try:
        if when == "after-save":  # the instant the 2nd checkpoint (a mid-epoch one, step 14) is complete
            while newest() < 14 and time.monotonic() < deadline:
                time.sleep(0.0005)
        elif when == "mid-epoch":  # between two mid-epoch checkpoints
            while newest() < 14 and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(0.02)
        elif when == "during-save":  # while a checkpoint is being written (a .tmp-* folder exists)
            while not (newest() >= 7 and names(".tmp-*")) and newest() < 60 and time.monotonic() < deadline:
                time.sleep(0.0002)
        assert proc.poll() is None, "training finished before it could be killed"
    finally:
        kill_tree(proc)
    print(f"killed {when}: newest checkpoint step {newest()}, save in progress: {bool(names('.tmp-*'))}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once, as a lost machine would.

    torchrun starts its workers in sessions of their own, so killing the launcher's process
    group alone would leave them training.
    """
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(victims[1:], timeout=10)


def untimed_metrics(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "live" / "metrics.json").read_text()).items() if k not in TIMING_KEYS}


def curves(out: Path) -> dict[str, str]:
    root = out / "live" / "plots" / "metrics"
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*.tsv") if p.stem not in TIMING_KEYS}


@pytest.fixture(scope="module")
def reference(setup):
    root, raw, params = setup
    outs = {}
    for processes in (1, 2):
        out = root / f"reference-{processes}"
        run(command(processes, out, params, raw))
        outs[processes] = out
    return outs


@pytest.mark.parametrize("processes", [1, 2], ids=["1proc", "2proc"])
@pytest.mark.parametrize("when", ["mid-epoch", "after-save", "during-save"])
def test_killed_run_resumes_to_bitwise_identical_weights_and_metrics(setup, reference, processes, when):
    root, raw, params = setup
    out = root / f"killed-{processes}-{when}"
    cmd = command(processes, out, params, raw)
    run_and_kill(cmd, out / "checkpoints", when)
    assert not (out / "models").exists()
    resumed = run(cmd)
    assert "resuming from" in resumed.stdout
    ref = reference[processes]
    assert (out / "models" / "model.safetensors").read_bytes() == (ref / "models" / "model.safetensors").read_bytes()
    assert (out / "models" / "model.json").read_bytes() == (ref / "models" / "model.json").read_bytes()
    assert untimed_metrics(out) == untimed_metrics(ref)
    assert curves(out) == curves(ref)  # every epoch's row, including those the killed run logged
    assert len([p for p in (out / "checkpoints").iterdir()]) == 2  # keep_checkpoints held; temp folders gone


def test_changed_params_start_fresh_and_say_so(setup, reference, tmp_path):
    root, raw, _ = setup
    out = root / "reference-1"
    changed = tmp_path / "params.yaml"
    changed.write_text(PARAMS.replace("lr: 0.003", "lr: 0.002"))
    proc = run(command(1, out, changed, raw))
    assert "was made with other training params" in proc.stdout and "starting fresh" in proc.stdout
    assert "resuming" not in proc.stdout
    assert json.loads((out / "models" / "model.json").read_text())["epoch"] >= 1
    run(command(1, out, setup[2], raw) + ["--fresh"])  # put the reference back for other tests


def test_finished_run_rewrites_the_same_model_without_training(setup, reference):
    _, raw, params = setup
    ref = reference[1]
    before = (ref / "models" / "model.safetensors").read_bytes()
    proc = run(command(1, ref, params, raw))
    assert "training already complete" in proc.stdout and "epoch 1/3" not in proc.stdout
    assert (ref / "models" / "model.safetensors").read_bytes() == before
