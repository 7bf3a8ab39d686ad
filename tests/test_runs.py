"""Run folders: one per run key, kept for its resume up to train.keep_runs, and the lock on the folder."""

import signal
import subprocess
import sys

import pytest

from pipeline.checkpoint import list_checkpoints
from pipeline.errors import PipelineError
from pipeline.provenance import RunKey
from pipeline.runs import hold_checkpoint_dir, list_runs, open_run
from tests.conftest import REPO
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
from pipeline.runs import hold_checkpoint_dir
with hold_checkpoint_dir(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_held_checkpoint_folder_is_refused_and_freed_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, text=True, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(PipelineError, match=rf"is in use by another trainer \(pid {holder.pid} on .*, started"):
        with hold_checkpoint_dir(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the OS drops the lock with the process
    holder.communicate()
    with hold_checkpoint_dir(tmp_path):
        assert (tmp_path / ".owner.json").is_file()
    assert not (tmp_path / ".owner.json").exists()
