"""pipeline.errors: a user error is one line, told to the group's launcher or printed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import (
    DVC_STAGE_VAR,
    ERROR_DIR_VAR,
    LAUNCHER_PID_VAR,
    RESTORE,
    PipelineError,
    Stopped,
    cli,
    peer_lost,
    report,
    with_restore_hint,
)
from tests.conftest import REPO, child_env


def test_a_pipeline_error_is_one_line_and_exit_2_and_a_stop_exit_143(capsys):
    @cli
    def fails(error: Exception) -> int:
        raise error

    for error, code in ((PipelineError("bad input; fix it"), 2), (Stopped("stopped by SIGTERM"), 143)):
        with pytest.raises(SystemExit) as stop:
            fails(error)
        assert stop.value.code == code
    assert capsys.readouterr().err == "error: bad input; fix it\nerror: stopped by SIGTERM\n"


def test_a_collective_that_lost_its_peer_is_one_line_and_other_runtime_errors_keep_their_traceback(capsys):
    @cli
    def fails(error: Exception) -> int:
        raise error

    gloo = RuntimeError("[pair.cc:545] Read error [127.0.0.1]:34517: Connection reset by peer. This is typically")
    with pytest.raises(SystemExit) as stop:
        fails(gloo)
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("error: another process of this group died mid-step")
    with pytest.raises(RuntimeError, match="a bug"):
        fails(RuntimeError("a bug"))
    assert peer_lost(ValueError("Connection reset by peer")) is None


def test_under_the_launcher_the_line_goes_to_it_and_elsewhere_to_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ERROR_DIR_VAR, str(tmp_path))
    monkeypatch.setenv(LAUNCHER_PID_VAR, str(os.getppid()))  # this process's parent is "the launcher"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert report("rank 1 has no data", 2, consequence=False) == 2
    (entry,) = [json.loads(p.read_text()) for p in tmp_path.iterdir()]
    assert {k: entry[k] for k in ("message", "code", "consequence", "rank", "attempt")} == {
        "message": "rank 1 has no data", "code": 2, "consequence": False, "rank": 1, "attempt": 2}  # fmt: skip
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(LAUNCHER_PID_VAR, "1")  # the launcher is gone: this process has another parent now
    report("stopped", 143, consequence=True)
    assert capsys.readouterr().err == "error: stopped\n"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("from http://reader:s3cr:t@x@127.0.0.1:8/raw/", "from http://reader:***@127.0.0.1:8/raw/"),
        ("got 'https://TOKEN@host/a'", "got 'https://***@host/a'"),
        ("http://host/a@b and mail@example.com", "http://host/a@b and mail@example.com"),
    ],
    ids=["password-with-at-signs", "token", "no-credentials"],
)
def test_a_url_password_is_hidden_in_every_error_line(text, shown, capsys):
    @cli
    def fails() -> int:
        raise PipelineError(f"download.sources must be a list, {text}")

    with pytest.raises(SystemExit):
        fails()
    assert capsys.readouterr().err == f"error: download.sources must be a list, {shown}\n"


def test_under_dvc_every_line_says_how_the_last_good_outputs_come_back(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DVC_STAGE_VAR, "train")
    report("training diverged; lower train.lr", 2)  # a first run: no dvc.lock, nothing to bring back
    assert capsys.readouterr().err == "error: training diverged; lower train.lr\n"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: python -m pipeline.train\n")
    report("training diverged; lower train.lr", 2)
    assert capsys.readouterr().err == f"error: training diverged; lower train.lr; {RESTORE}\n"
    assert with_restore_hint("x", env={}) == "x"  # not under DVC
    assert with_restore_hint("x", env={DVC_STAGE_VAR: "evaluate"}) == "x"  # no run of that stage recorded


def _in_the_way(tmp_path):
    (tmp_path / "out").write_text("kept")
    return FileExistsError(errno.EEXIST, "", str(tmp_path / "out" / "raw")), "out is a file where a folder must be"


def _dangling(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    return FileExistsError(errno.EEXIST, "", str(tmp_path / "out")), "out is a symlink to {tmp}/gone, which does"


def _a_folder(tmp_path):
    (tmp_path / "out").mkdir()
    error = IsADirectoryError(errno.EISDIR, "", str(tmp_path / ".tmp-1-out"), str(tmp_path / "out"))
    return error, "out is a folder where a file must be; remove it or"


def _no_permission(tmp_path):
    return PermissionError(errno.EACCES, "", str(tmp_path / "out")), ": permission denied for this user"


@pytest.mark.parametrize(
    "fault", [_in_the_way, _dangling, _a_folder, _no_permission], ids=["file-in-the-way", "dangling-symlink",
                                                                      "folder-in-the-way", "no-permission"]
)  # fmt: skip
def test_an_os_error_about_a_path_is_one_line_naming_the_path_and_what_to_do(tmp_path, capsys, fault):
    error, said = fault(tmp_path)

    @cli
    def fails() -> int:
        raise error

    with pytest.raises(SystemExit) as stop:
        fails()
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {tmp_path}") and said.format(tmp=tmp_path) in line, line
    assert line.endswith("name another path"), line


def test_an_os_error_about_no_path_keeps_its_traceback():
    @cli
    def fails() -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        fails()


# On the import of STALL_IMPORT, a stage's process marks STALL_READY and waits: Ctrl-C then lands inside that import.
STALL = """
import os, sys, time

class Stall:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["STALL_IMPORT"]:
            sys.meta_path.remove(self)
            open(os.environ["STALL_READY"], "w").close()
            time.sleep(60)
        return None

sys.meta_path.insert(0, Stall())
"""


@pytest.mark.parametrize(
    ("module", "importing"),
    [("pipeline.train", "torch"), ("pipeline.evaluate", "torch"), ("pipeline.download", "tqdm"),
     ("pipeline.launch", "psutil"), ("scripts.predict", "torch"), ("fashion-predict", "torch")],
    ids=["train", "evaluate", "download", "launch", "predict", "fashion-predict"],
)  # fmt: skip
def test_ctrl_c_while_a_stage_imports_is_one_line_and_exit_130(tmp_path, module, importing):
    (tmp_path / "sitecustomize.py").write_text(STALL)  # Python imports it at startup, before the stage
    ready = tmp_path / "ready"
    env = child_env(PYTHONPATH=str(tmp_path), STALL_IMPORT=importing, STALL_READY=str(ready))
    command = [sys.executable, "-m", module] if "." in module else [str(Path(sys.executable).parent / module)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err, out) == (130, "error: interrupted\n", "")
