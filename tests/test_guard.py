"""The train stage's process guard, on real processes: SIGTERM, a dead launcher."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.errors import ERROR_DIR_VAR, Stopped
from pipeline.guard import Stopper, held_stops, starters
from pipeline.train import Paths, command
from tests.conftest import FILE_MODES_BIND, REPO, child_env, train_command

# A run under the Stopper, as the train stage has it: it prints its pid, then "trains" until stopped.
GUARDED = """
import os, sys, time
from pipeline.errors import cli
from pipeline.guard import Stopper, starters

@cli
def main():
    with Stopper(starters(), poll_s=0.05):
        print(os.getpid(), flush=True)
        time.sleep(120)

main()
"""

# A stand-in for `accelerate launch`: starts the run with a launcher's environment, then waits.
LAUNCHER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={**os.environ, "LOCAL_RANK": "0"},
                         stderr=open(sys.argv[2], "w"))
time.sleep(120)
"""


def python(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, text=True, **kwargs)


def test_sigterm_ends_a_guarded_run_in_one_line_with_exit_143():
    run = python("-c", GUARDED, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert run.stdout is not None and int(run.stdout.readline()) == run.pid
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 143
    assert err.strip() == "error: stopped by SIGTERM; run it again to resume from the newest checkpoint"


def test_a_run_whose_launcher_dies_stops_instead_of_training_on(tmp_path):
    log = tmp_path / "run.err"
    launcher = python("-c", LAUNCHER, GUARDED, str(log))
    deadline = time.monotonic() + 60
    while not psutil.Process(launcher.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (run,) = psutil.Process(launcher.pid).children()
    time.sleep(1)  # the run is up, watching its launcher
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    gone, alive = psutil.wait_procs([run], timeout=15)
    assert not alive, "the run trains on as an orphan"
    said = log.read_text()  # the launcher is named as it was while it ran: "python (pid N)"
    assert re.search(rf"^error: \S+ \(pid {launcher.pid}\), which started this run, has exited: stopping", said)


def test_only_a_launcher_or_dvc_is_watched():
    assert starters({}) == []  # run by hand: nohup keeps working
    (launcher,) = starters({"LOCAL_RANK": "0"})
    assert launcher.pid == os.getppid()


def test_one_ctrl_c_interrupts_once_and_its_copies_cannot_break_into_the_unwinding():
    before = signal.getsignal(signal.SIGINT)
    unwound = False
    try:
        with pytest.raises(KeyboardInterrupt), Stopper([]):
            try:
                os.kill(os.getpid(), signal.SIGINT)  # the terminal's
                time.sleep(1)
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # the launcher's copy, while the first unwinds
                time.sleep(0.05)
                unwound = True
        assert unwound and signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # until the process ends
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("signum, stop", [(signal.SIGTERM, Stopped), (signal.SIGINT, KeyboardInterrupt)])
def test_a_stop_while_a_checkpoint_is_written_waits_for_it_to_be_finished(signum, stop):
    before = signal.getsignal(signal.SIGINT)
    finished = False
    try:
        with pytest.raises(stop), Stopper([]):
            with held_stops():
                os.kill(os.getpid(), signum)
                time.sleep(0.05)  # the handler has run by now; the stop waits
                finished = True
            pytest.fail("the held stop was not raised as the block ended")
        assert finished
        with Stopper([]), held_stops():  # nothing is left over for the next block
            pass
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_write_that_fails_while_a_stop_is_held_says_its_own_error():
    with pytest.raises(OSError, match="disk full"), Stopper([]), held_stops():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        raise OSError("disk full")
    with Stopper([]), held_stops():  # the dropped stop is not raised by the next block
        pass


def test_a_sigterm_while_the_trainer_writes_its_first_checkpoint_keeps_it(
    tmp_path, tiny_raw, write_params, monkeypatch
):
    import pipeline.trainer
    from pipeline.checkpoint import list_checkpoints, read_checkpoint
    from pipeline.train import main

    real = pipeline.trainer.save_checkpoint

    def stopped_while_saving(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, before the checkpoint is written
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.trainer, "save_checkpoint", stopped_while_saving)
    run = Paths.under(tmp_path / "run", tiny_raw)
    argv = command(write_params({"train": {"epochs": 3}}), run, [])
    with pytest.raises(SystemExit) as stop:
        main(argv[argv.index("--params") :])
    assert stop.value.code == Stopped.exit_code
    ((folder,),) = [list(run.checkpoint_dir.glob("*/run.json"))]
    (kept,) = list_checkpoints(folder.parent)  # the first epoch's, whole: the stop waited for it
    assert read_checkpoint(kept).state.epoch == 1
    assert not run.model_dir.exists()  # and the run stopped there


def _read_only(checkpoints: Path) -> str:  # a folder used before (its lock file is there), read-only now
    checkpoints.mkdir()
    (checkpoints / ".lock").touch()
    checkpoints.chmod(0o555)
    return f"{checkpoints}: permission denied for this user; make it writable (and readable), or"


def _dangling_symlink(checkpoints: Path) -> str:
    checkpoints.symlink_to(checkpoints.parent / "gone")
    return f"{checkpoints} is a symlink to {checkpoints.parent / 'gone'}, which does not exist; create it or"


def _a_file(checkpoints: Path) -> str:
    checkpoints.write_text("kept")
    return f"{checkpoints} is a file where a folder must be; remove it or"


@pytest.mark.parametrize("fault", [_read_only, _dangling_symlink, _a_file], ids=["read-only", "dangling", "a-file"])
def test_a_checkpoint_folder_that_cannot_be_written_is_one_line_before_training(tiny_raw, write_params, fault):
    params, checkpoints = write_params(), tiny_raw.parents[1] / "checkpoints"
    said = fault(checkpoints)
    before = {p.name: p.is_file() for p in checkpoints.parent.iterdir()}
    cmd = [*FILE_MODES_BIND, *train_command(checkpoints.parent / "run", params, tiny_raw, checkpoints=checkpoints)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    finally:
        if checkpoints.is_dir() and not checkpoints.is_symlink():
            checkpoints.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: checkpoint folder: {said} pass another --checkpoint-dir"]
    assert {p.name: p.is_file() for p in checkpoints.parent.iterdir()} == before  # no model, no metrics, nothing
    assert not checkpoints.is_file() or checkpoints.read_text() == "kept"
    assert not checkpoints.is_dir() or [p.name for p in checkpoints.iterdir()] == [".lock"]


def test_a_run_whose_launcher_is_killed_stops_says_why_and_leaves_no_launcher_folder(tmp_path, tiny_raw, write_params):
    params = write_params({"train": {"epochs": 1000}})  # far longer than the test waits
    launch = [sys.executable, "-m", "pipeline.launch"]  # one process: its stderr is a pipe the launcher reads
    cmd = command(params, Paths.under(tmp_path / "run", tiny_raw), launch, "--cpu-threads", "1")
    env = child_env(HF_HOME=str(tmp_path / "no-accelerate-config"))
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    while not launcher.stdout.readline().startswith("epoch "):  # training is under way
        assert launcher.poll() is None, launcher.communicate()
    while not list((tmp_path / "run" / "checkpoints").glob("*/step-*")):  # and its first epoch is saved
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.05)
    (trainer,) = psutil.Process(launcher.pid).children()
    folder = Path(trainer.environ()[ERROR_DIR_VAR])  # the launcher's, which it would remove as it ends
    assert folder.is_dir()
    launcher.kill()
    _, err = launcher.communicate(timeout=30)  # at the end of the pipe, as dvc is: the trainer's stderr is gone
    assert not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE, "the trainer trains on as an orphan"
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert re.fullmatch(rf"error: \S+ \(pid {launcher.pid}\), which started this run, has exited: stopping, not "
                        "training on alone; run it again to resume from the newest checkpoint", line)  # fmt: skip
    assert not folder.exists()
    assert list((tmp_path / "run" / "checkpoints").glob("*/step-*"))  # what it trained is kept for the rerun
