"""pipeline.errors: a user error is one line, told to the group's launcher or printed."""

from __future__ import annotations

import json
import os

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


def test_under_dvc_every_line_says_how_the_last_good_outputs_come_back(monkeypatch, capsys):
    monkeypatch.setenv(DVC_STAGE_VAR, "train")
    report("training diverged; lower train.lr", 2)
    assert capsys.readouterr().err == f"error: training diverged; lower train.lr; {RESTORE}\n"
    assert with_restore_hint("x", env={}) == "x"
