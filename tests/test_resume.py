"""Kill real training runs with SIGKILL, run them again, and compare with an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests.conftest import TIMING_KEYS, child_env, full_params, train_command, write_raw

pytestmark = pytest.mark.slow

OVERRIDES = {
    "data": {"subset": 0, "val_size": 77},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "seed": 5, "eval_batch_size": 16,
              "checkpoint_every_steps": 7, "keep_checkpoints": 2, "final_model": "best"},
}  # fmt: skip
# 323 train samples: 40 steps/epoch, 80 in all; mid-epoch checkpoints every 7 steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    raw = write_raw(root / "raw", n_train=400, n_test=50)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(full_params(OVERRIDES)))
    return root, raw, params


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def run_and_kill(cmd: list[str], ckpt_dir: Path, when: str, log: Path | None = None) -> None:
    """Start training and SIGKILL its whole process group at the moment ``when`` names; stdout to ``log``."""
    out = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120

    def found(pattern: str) -> set[Path]:  # inside run folders, checkpoints/<fingerprint>/
        return set(ckpt_dir.glob(f"*/{pattern}")) if ckpt_dir.is_dir() else set()

    before = found("step-*")  # another run's checkpoints in the same folder do not count

    def names(pattern: str) -> set[str]:
        return {p.name for p in found(pattern) - before}

    def newest() -> int:
        return max((int(n.removeprefix("step-")) for n in names("step-*")), default=0)

    # the moment to kill: once the condition holds (or a checkpoint late in the run says it will not)
    moments = {
        "after-save": lambda: newest() >= 14,  # the instant the 2nd checkpoint (a mid-epoch one) is complete
        "mid-epoch": lambda: newest() >= 14,  # then 20 ms more: between two mid-epoch checkpoints
        "during-save": lambda: (newest() >= 7 and bool(names(".tmp-*"))) or newest() >= 60,  # a .tmp-* folder
    }
    try:
        while not moments[when]() and time.monotonic() < deadline:
            time.sleep(0.0002)
        if when == "mid-epoch":
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be killed"
    finally:
        kill_tree(proc)
        if log:
            out.close()
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


def metrics(out: Path) -> dict:
    return json.loads((out / "live" / "metrics.json").read_text())  # results only: timings are curves


def curves(out: Path) -> dict[str, str]:
    root = out / "live" / "plots" / "metrics"
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*.tsv") if p.stem not in TIMING_KEYS}


@pytest.fixture(scope="module")
def reference(setup):
    root, raw, params = setup
    outs = {}
    for processes in (1, 2):
        out = root / f"reference-{processes}"
        run(train_command(out, params, raw, processes))
        outs[processes] = out
    return outs


@pytest.mark.parametrize(
    ("when", "processes"),
    [("mid-epoch", 1), ("after-save", 1), ("during-save", 1), ("mid-epoch", 2)],
    ids=["mid-epoch-1proc", "after-save-1proc", "during-save-1proc", "mid-epoch-2proc"],
)  # only the main process saves, so the moments around a save differ in nothing with 2 processes
def test_killed_run_resumes_to_bitwise_identical_weights_and_metrics(setup, reference, processes, when):
    root, raw, params = setup
    out = root / f"killed-{processes}-{when}"
    cmd = train_command(out, params, raw, processes)
    run_and_kill(cmd, out / "checkpoints", when)
    assert not (out / "models").exists()
    resumed = run(cmd)
    assert "resuming from" in resumed.stdout
    ref = reference[processes]
    assert (out / "models" / "model.safetensors").read_bytes() == (ref / "models" / "model.safetensors").read_bytes()
    assert (out / "models" / "model.json").read_bytes() == (ref / "models" / "model.json").read_bytes()
    assert metrics(out) == metrics(ref)
    assert curves(out) == curves(ref)  # every epoch's row, including those the killed run logged
    # the finished run's state is gone, its lock with it (a finished run is never resumed)
    assert list((out / "checkpoints").iterdir()) == []


def test_two_experiments_interrupted_one_after_the_other_both_resume(setup, reference, tmp_path):
    root, raw, params = setup
    other = tmp_path / "params-lr.yaml"
    other.write_text(yaml.safe_dump(full_params(OVERRIDES, {"train": {"lr": 0.002}})))
    shared = tmp_path / "checkpoints"  # one workspace: both experiments use the same checkpoint folder

    def cmd(params_file: Path, out: Path) -> list[str]:
        return train_command(out, params_file, raw, checkpoints=shared)

    run(train_command(tmp_path / "lr-reference", other, raw))
    run_and_kill(cmd(params, tmp_path / "a"), shared, "mid-epoch")
    run_and_kill(cmd(other, tmp_path / "b"), shared, "mid-epoch", log=tmp_path / "b.log")
    assert len([p for p in shared.iterdir() if not p.name.startswith(".")]) == 2  # both runs' state kept
    said = (tmp_path / "b.log").read_text()  # b started fresh and said why, naming the param
    assert "differs in param train.lr (0.003 there, 0.002 now): starting fresh" in said and "resuming" not in said

    resumed_a = run(cmd(params, tmp_path / "a"))
    assert "resuming from" in resumed_a.stdout
    resumed_b = run(cmd(other, tmp_path / "b"))
    assert "resuming from" in resumed_b.stdout
    for out, ref in ((tmp_path / "a", reference[1]), (tmp_path / "b", tmp_path / "lr-reference")):
        weights = out / "models" / "model.safetensors"
        assert weights.read_bytes() == (ref / "models" / "model.safetensors").read_bytes()


def test_a_checkpoint_that_does_not_fit_costs_one_line_and_the_previous_one_resumes(setup, reference, tmp_path):
    _, raw, params = setup
    out = tmp_path / "tampered"
    cmd = train_command(out, params, raw)
    run_and_kill(cmd, out / "checkpoints", "mid-epoch")
    (run_dir,) = [p for p in (out / "checkpoints").iterdir() if p.is_dir()]
    newest = sorted(run_dir.glob("step-*"))[-1]
    optimizer = torch.load(newest / "optimizer.pt", weights_only=True)
    optimizer["state"][0]["exp_avg"] = torch.zeros(3, 3)  # readable, but of another shape
    torch.save(optimizer, newest / "optimizer.pt")
    resumed = run(cmd)
    notes = [line for line in resumed.stdout.splitlines() if "cannot resume this run" in line]
    assert len(notes) == 1 and f"{newest} cannot resume this run: its optimizer exp_avg of parameter 0" in notes[0]
    assert "resuming from" in resumed.stdout and "Traceback" not in resumed.stderr
    weights = (out / "models" / "model.safetensors").read_bytes()
    assert weights == (reference[1] / "models" / "model.safetensors").read_bytes()  # the previous one, bit for bit


def test_a_killed_worker_restarts_with_its_group_and_resumes_bitwise(setup, reference, tmp_path):
    # torchrun's elastic agent (accelerate launch --max_restarts) restarts the whole group when one worker
    # dies; the restarted group joins under a store prefix of its own (runtime.join_restarted_group) and
    # resumes from the newest checkpoint. One restart allowed (torchrun's PET_MAX_RESTARTS, as under dvc
    # repro; --max_restarts 1 is accelerate's own flag): the group must come back at the first try.
    _, raw, params = setup
    out = tmp_path / "elastic"
    cmd = train_command(out, params, raw, processes=2)
    proc = subprocess.Popen(cmd, env=child_env(PET_MAX_RESTARTS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    run_dir = out / "checkpoints"
    deadline = time.monotonic() + 120
    while max((int(p.name[5:]) for p in run_dir.glob("*/step-*")), default=0) < 14 and time.monotonic() < deadline:
        time.sleep(0.0002)
    time.sleep(0.02)  # mid-epoch, between two checkpoints
    (worker,) = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    worker.send_signal(signal.SIGKILL)  # one worker, not the launcher
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail("the launch did not end after its restart")
    assert proc.returncode == 0, stderr
    assert stdout.count("resuming from") == 1 and stderr == ""  # the dead attempt's lines are not shown
    ref = reference[2]
    assert (out / "models" / "model.safetensors").read_bytes() == (ref / "models" / "model.safetensors").read_bytes()
    assert metrics(out) == metrics(ref) and curves(out) == curves(ref)


@pytest.mark.parametrize(
    "state",
    [{"ema": 0.9}, {"lookahead": 0.8, "lookahead_every": 3}, {"optimizer": "muon", "lr": 0.02}],
    ids=["moving-average", "lookahead", "muon"],
)
def test_a_killed_run_with_averaged_weights_resumes_bitwise(setup, tmp_path, state):
    # the average (train.ema), lookahead's slow weights and Muon's momentum are state too: a resume that restarted
    # them would export other weights
    root, raw, _ = setup
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(full_params(OVERRIDES, {"train": state})))
    ref, out = tmp_path / "reference", tmp_path / "killed"
    run(train_command(ref, params, raw))
    cmd = train_command(out, params, raw)
    run_and_kill(cmd, out / "checkpoints", "mid-epoch")
    assert "resuming from" in run(cmd).stdout
    assert (out / "models" / "model.safetensors").read_bytes() == (ref / "models" / "model.safetensors").read_bytes()
    assert metrics(out) == metrics(ref)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of ``rank`` under ``launcher``."""
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "pipeline.train" in p.cmdline():
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} under the launcher")


def test_a_stopped_worker_ends_the_run_in_one_line_naming_it_and_the_rerun_resumes_bitwise(setup, reference):
    root, raw, params = setup
    out = root / "stalled-2"
    cmd = train_command(out, params, raw, 2)
    proc = subprocess.Popen(cmd, env=child_env(PIPELINE_STALL_TIMEOUT="10"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("*/step-*")) and time.monotonic() < deadline:
        time.sleep(0.0002)
    stopped = rank_process(proc, 1)
    stopped.suspend()  # SIGSTOP: alive, silent, holding the group's next all-reduce
    start = time.monotonic()
    err = proc.communicate(timeout=120)[1]
    assert time.monotonic() - start < 10 + 10, "the run did not end within the stall timeout"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        rf"error: the group waited 10 s \(PIPELINE_STALL_TIMEOUT\) for a process that stopped making progress: "
        rf"rank 1 \(pid {stopped.pid} on .+\) silent; run it again to resume from the newest checkpoint",
        errors[0],
    ), errors[0]
    assert proc.returncode == 1
    resumed = run(cmd)
    assert "resuming from" in resumed.stdout
    ref = reference[2]
    assert (out / "models" / "model.safetensors").read_bytes() == (ref / "models" / "model.safetensors").read_bytes()
    assert metrics(out) == metrics(ref)
