"""Run folders: one per run key, kept for its resume up to train.keep_runs, and the lock on the folder."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.checkpoint import list_checkpoints
from pipeline.errors import PipelineError
from pipeline.params import with_overrides
from pipeline.provenance import RunKey
from pipeline.runs import STORE_VAR, checkpoint_store, hold_run, in_use, list_runs, open_run
from tests.conftest import REPO, child_env, copy_repo, sh
from tests.test_checkpoint import expected, save


def key(**changes) -> RunKey:
    base = {"code": {"pipeline/train.py": "aa"}, "data": {"train-images-idx3-ubyte": "bb"},
            "params": {"train.lr": 0.002, "train.mixed_precision": "fp32"}, "processes": 1}  # fmt: skip
    return RunKey(**{**base, **changes})


def test_each_run_has_its_own_folder_and_another_runs_state_is_kept_and_named(tmp_path):
    first = key()
    run, ckpt, notes = open_run(tmp_path, first, expected(), fresh=False, keep_runs=3)
    assert run == tmp_path / first.fingerprint() and ckpt is None and notes == []
    save(run, 4)
    second = key(params={"train.lr": 0.004, "train.mixed_precision": "fp32"})
    other, ckpt, notes = open_run(tmp_path, second, expected(), fresh=False, keep_runs=3)
    assert other != run and ckpt is None
    assert notes == [f"no saved state of this run to resume; the newest other run {run} (saved at global step 4) "
                     "differs in param train.lr (0.002 there, 0.004 now): starting fresh, and keeping that state "
                     "for its own resume"]  # fmt: skip
    back, ckpt, notes = open_run(tmp_path, first, expected(), fresh=False, keep_runs=3)
    assert back == run and ckpt is not None and ckpt.state.global_step == 4 and notes == []


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"code": {"pipeline/train.py": "a2"}}, "code (pipeline/train.py changed)"),
        ({"code": {"pipeline/train.py": "aa", "pipeline/new.py": "cc"}}, "code (pipeline/new.py added)"),
        ({"data": {"train-images-idx3-ubyte": "b2"}}, "data (train-images-idx3-ubyte changed)"),
        ({"params": {"train.lr": 0.002, "train.mixed_precision": "bf16"}},
         "precision train.mixed_precision ('fp32' there, 'bf16' now)"),
        ({"processes": 2}, "process count (1 there, 2 now)"),
    ],
    ids=["code", "new-file", "data", "precision", "processes"],
)  # fmt: skip
def test_starting_fresh_names_the_first_thing_that_differs(tmp_path, changes, named):
    run, _, _ = open_run(tmp_path, key(), expected(), fresh=False, keep_runs=3)
    save(run, 4)
    _, ckpt, notes = open_run(tmp_path, key(**changes), expected(), fresh=False, keep_runs=3)
    assert ckpt is None and len(notes) == 1 and f"differs in {named}: starting fresh" in notes[0]


def test_runs_beyond_keep_runs_lose_their_state_oldest_first(tmp_path):
    runs = []
    for lr in (0.1, 0.2, 0.3):
        run, _, _ = open_run(tmp_path, key(params={"train.lr": lr}), expected(), fresh=False, keep_runs=2)
        save(run, 4)
        runs.append(run)
    assert list_runs(tmp_path) == runs[1:]  # the third run pushed out the first
    assert not runs[0].exists()


def test_fresh_discards_only_this_runs_state(tmp_path):
    mine, _, _ = open_run(tmp_path, key(), expected(), fresh=False, keep_runs=3)
    save(mine, 4)
    other, _, _ = open_run(tmp_path, key(processes=2), expected(), fresh=False, keep_runs=3)
    save(other, 6)
    run, ckpt, notes = open_run(tmp_path, key(), expected(), fresh=True, keep_runs=3)
    assert run == mine and ckpt is None and notes == [f"--fresh: removing this run's checkpoints in {mine}"]
    assert list_checkpoints(mine) == [] and len(list_checkpoints(other)) == 1


HOLD = """
import sys, time
from pathlib import Path
from pipeline.runs import hold_run
with hold_run(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_held_checkpoint_folder_is_refused_and_freed_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, text=True, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(PipelineError, match=rf"is being trained by another trainer \(pid {holder.pid} on .*, started"):
        with hold_run(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the OS drops the lock with the process
    holder.communicate()
    with hold_run(tmp_path):
        assert (tmp_path / ".owner.json").is_file()
    assert not (tmp_path / ".owner.json").exists()


def test_a_temporary_workspaces_runs_keep_their_state_in_the_main_workspaces_store(tmp_path):
    main, temp = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12"
    temp.mkdir(parents=True)
    store, why = checkpoint_store(Path("checkpoints"), temp, {"DVC_ROOT": str(main)})
    assert store == main / "checkpoints" and "main workspace's" in why
    assert checkpoint_store(Path("checkpoints"), main, {"DVC_ROOT": str(main)}) == (Path("checkpoints"), "")
    assert checkpoint_store(Path("/abs/ck"), temp, {"DVC_ROOT": str(main)}) == (Path("/abs/ck"), "")  # as given
    assert checkpoint_store(Path("checkpoints"), temp, {}) == (Path("checkpoints"), "")  # not under DVC
    shared, why = checkpoint_store(Path("checkpoints"), temp, {"DVC_ROOT": str(main), STORE_VAR: "/mnt/ck"})
    assert shared == Path("/mnt/ck") and STORE_VAR in why


def test_a_run_in_use_is_never_pruned(tmp_path):
    busy, _, _ = open_run(tmp_path, key(params={"train.lr": 0.1}), expected(), fresh=False, keep_runs=1)
    save(busy, 4)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(busy)], cwd=REPO, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert in_use(busy)
        run, _, notes = open_run(tmp_path, key(params={"train.lr": 0.2}), expected(), fresh=False, keep_runs=1)
        assert busy.is_dir() and not any("removed the resume state" in n for n in notes)
    finally:
        holder.kill()
        holder.communicate()
    assert not in_use(busy)
    open_run(tmp_path, key(params={"train.lr": 0.3}), expected(), fresh=False, keep_runs=1)
    assert not busy.exists()  # no longer held: pruned like any older run


def train_pids_under(folder: Path) -> list[psutil.Process]:
    """The train stage's processes whose working folder is inside ``folder``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "pipeline.train" in (proc.info["cmdline"] or []) and Path(proc.cwd()).is_relative_to(folder):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def start_queue(repo: Path, log: Path) -> None:
    """`dvc queue start`, its output to ``log``: its worker runs on detached and would hold a captured pipe open."""
    with log.open("a") as out:
        subprocess.run(["dvc", "queue", "start"], cwd=repo, env=child_env(), stdout=out, stderr=out, check=True)


def wait_for_queue(repo: Path, timeout: float = 240) -> str:
    """Wait until the repo's queue has nothing queued or running; returns `dvc queue status`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(1)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


@pytest.mark.slow
def test_a_queued_run_killed_mid_epoch_resumes_bitwise_when_queued_again(reproduced, tmp_path):
    repo = copy_repo(reproduced.repo, tmp_path / "repo")
    epochs = {"train": {"epochs": 6}}  # 300 steps, a checkpoint every 10: long enough to be killed mid-epoch
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(with_overrides(yaml.safe_load((repo / "params.yaml").read_text()), epochs)))
    # the same run, uninterrupted, outside DVC (the run-cache would hand its result back)
    ref = tmp_path / "ref"
    outs = ["--model-dir", str(ref / "models"), "--live-dir", str(ref / "live"), "--checkpoint-dir", str(ref / "ck")]
    sh(repo, sys.executable, "-m", "pipeline.train", "--params", str(params), "--data", "data/raw", *outs)
    store = repo / "checkpoints"

    sh(repo, "dvc", "exp", "run", "--queue", "-n", "first", "-S", "train.epochs=6")
    start_queue(repo, tmp_path / "queue.log")
    deadline = time.monotonic() + 180
    while not list(store.glob("*/step-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    temp = repo / ".dvc" / "tmp" / "exps"
    victims = train_pids_under(temp)
    assert list(store.glob("*/step-*")) and victims, "the queued run never checkpointed into the main workspace"
    for proc in victims:
        proc.kill()  # SIGKILL: the temporary workspace goes, its state in the main workspace's store stays
    assert "Failed" in wait_for_queue(repo)
    (run,) = [p.parent for p in store.glob("*/run.json")]
    assert list_checkpoints(run), "the killed run's checkpoints were lost with its workspace"

    sh(repo, "dvc", "exp", "run", "--queue", "-n", "again", "-S", "train.epochs=6")
    start_queue(repo, tmp_path / "queue.log")
    assert "again" in wait_for_queue(repo)
    logs = sh(repo, "dvc", "queue", "logs", "again").stdout
    assert "checkpoints in the main workspace's" in logs and "resuming from" in logs, logs
    sh(repo, "dvc", "exp", "apply", "again")
    assert (repo / "models" / "model.safetensors").read_bytes() == (ref / "models" / "model.safetensors").read_bytes()
    assert not run.exists()  # a finished run's state is removed, as in the workspace
