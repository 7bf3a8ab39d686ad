"""pipeline.launch: accelerate's launchers, with every failure of a launched group told in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.launch import Failure, ended, exit_code, main, to_print, told, with_env_defaults
from tests.conftest import REPO, child_env, free_port


def test_the_config_file_and_restarts_from_the_environment_go_first_unless_given():
    env = {"ACCELERATE_CONFIG_FILE": "/my configs/2 procs.yaml", "PET_MAX_RESTARTS": "3"}
    assert with_env_defaults(["-m", "x"], env) == [
        "--config_file", "/my configs/2 procs.yaml", "--max_restarts", "3", "-m", "x"]  # fmt: skip
    assert with_env_defaults(["--config_file", "a.yaml", "--max-restarts=1", "-m", "x"], env) == [
        "--config_file", "a.yaml", "--max-restarts=1", "-m", "x"]  # fmt: skip
    assert with_env_defaults(["--config-file=a.yaml", "-m", "x"], {"ACCELERATE_CONFIG_FILE": "b.yaml"}) == [
        "--config-file=a.yaml", "-m", "x"]  # fmt: skip
    assert with_env_defaults(["-m", "x"], {"ACCELERATE_CONFIG_FILE": ""}) == ["-m", "x"]
    assert with_env_defaults(["-m", "x", "--max_restarts", "1"], env)[:4] == [
        "--config_file",
        env["ACCELERATE_CONFIG_FILE"],
        "--max_restarts",
        "3",
    ]  # the module's own arguments are not the launcher's


def test_one_line_for_a_group_that_fails_alike_and_the_cause_before_its_consequences():
    same = [Failure("bad params", 2, 10.0), Failure("bad params", 2, 9.0)]
    assert to_print(same) == ["bad params"] and exit_code(same) == 2
    caused = [Failure("stopped by SIGTERM; run it again", 143, 5.0, consequence=True),
              Failure("rank 1 has no data", 2, 6.0)]  # fmt: skip
    assert to_print(caused) == ["rank 1 has no data"] and exit_code(caused) == 2
    killed = [Failure("a peer died", 1, 1.0, consequence=True), Failure("rank 1 was killed", 137, 9.0, told=False)]
    assert to_print(killed) == ["rank 1 was killed"] and exit_code(killed) == 137
    stopped = [Failure("stopped by SIGTERM", 143, float("inf"), consequence=True),
               Failure("stopped; run it again", 143, 3.0, consequence=True)]  # fmt: skip
    assert to_print(stopped) == ["stopped; run it again"] and exit_code(stopped) == 143
    # a rank the launcher ended (SIGTERM) before it could say a line: the other rank's line explains it
    torn_down = [Failure("bad params", 2, 5.0), ended(-signal.SIGTERM, "rank 1 (pid 7)", 5.0)]
    assert to_print(torn_down) == ["bad params"] and exit_code(torn_down) == 2
    assert to_print([ended(-signal.SIGTERM, "rank 1 (pid 7)", 5.0)]) == [
        "rank 1 (pid 7) was killed by SIGTERM; run it again to resume from the newest checkpoint"]  # fmt: skip
    oom = [Failure("stopped", 143, 6.0, consequence=True), ended(-signal.SIGKILL, "rank 0 (pid 8)", 5.0)]
    assert to_print(oom) == [oom[1].message] and exit_code(oom) == 137  # SIGKILL (the OOM killer): a cause
    differ = [Failure("disk full on rank 0", 2, 1.0), Failure("rank 1 has no data", 2, 2.0)]
    assert to_print(differ) == ["disk full on rank 0", "rank 1 has no data"]
    assert to_print([]) == [] and exit_code([]) == 0


def test_only_the_last_attempts_lines_count_after_a_restart(tmp_path):
    entry = {"code": 2, "consequence": False, "time": 1.0}
    (tmp_path / "1.json").write_text(json.dumps({**entry, "message": "old", "rank": 0, "attempt": 0}))
    (tmp_path / "2.json").write_text(json.dumps({**entry, "message": "new", "rank": 1, "attempt": 1}))
    (tmp_path / "3.json").write_text("{not json")  # a line cut short: skipped
    assert told(tmp_path) == {1: Failure("new", 2, 1.0)}


def launcher(processes: int) -> list[str]:
    """No accelerate config and no flags beyond the count: accelerate's defaults warning must stay off stderr."""
    if processes == 1:
        return [sys.executable, "-m", "pipeline.launch"]
    return [sys.executable, "-m", "pipeline.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(free_port())]  # fmt: skip


def start(processes: int, plan: str, ready: Path, **env: str) -> subprocess.Popen[str]:
    ready.mkdir(exist_ok=True)
    cmd = [*launcher(processes), "-m", "tests.launched", plan, str(ready)]
    env = {"HF_HOME": str(ready.parent / "no-accelerate-config"), **env}
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, list[str]]:
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the launch did not end")
    return proc.returncode, err.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("processes", "plan", "line", "code"),
    [
        (1, "error:all", "error: the params are bad; fix them", 2),
        (2, "error:all", "error: the params are bad; fix them", 2),
        (2, "error:1", "error: rank 1 has no data; fetch it", 2),
        (2, "kill:1", "error: rank 1 (pid *) was killed by SIGKILL; run it again to resume from the newest checkpoint",
         137),
    ],
    ids=["1proc", "2proc-alike", "2proc-one-rank", "2proc-killed"],
)  # fmt: skip
def test_a_failing_launch_says_one_line_and_no_traceback(tmp_path, processes, plan, line, code):
    returncode, err = finish(start(processes, plan, tmp_path / "ready"))
    assert returncode == code
    assert len(err) == 1, err
    prefix, _, suffix = line.partition("*")
    assert err[0].startswith(prefix) and err[0].endswith(suffix)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["1proc", "2proc"])
def test_ctrl_c_says_interrupted_once(tmp_path, processes):
    ready = tmp_path / "ready"
    proc = start(processes, "wait:none", ready)
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < processes and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
    returncode, err = finish(proc)
    assert (returncode, err) == (130, ["error: interrupted"])


@pytest.mark.slow
def test_a_bug_keeps_its_traceback_and_the_launch_names_the_process(tmp_path):
    returncode, err = finish(start(1, "bug:all", tmp_path / "ready"))
    assert returncode == 1 and "RuntimeError: a bug" in err
    assert err[-1] == "error: the process exited with status 1 (its output above says why)"


@pytest.mark.slow
def test_the_config_file_named_by_the_environment_is_used_spaces_and_all(tmp_path):
    config = tmp_path / "my configs" / "2 procs.yaml"
    config.parent.mkdir()
    config.write_text(
        (REPO / "scripts" / "accelerate" / "cpu-2proc.yaml").read_text() + f"main_process_port: {free_port()}\n"
    )
    ready = tmp_path / "ready"
    ready.mkdir()
    cmd = [sys.executable, "-m", "pipeline.launch", "-m", "tests.launched", "ok:all", str(ready)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(ACCELERATE_CONFIG_FILE=str(config)), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in ready.iterdir()) == ["0", "1"]  # two processes: the file's setting


def _missing(tmp_path):
    return tmp_path / "none.yaml", "it does not exist"


def _a_folder(tmp_path):
    (tmp_path / "configs").mkdir()
    return tmp_path / "configs", "it is not a file"


def _not_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("num_processes: [2\n")
    return tmp_path / "c.yaml", "while parsing a flow sequence"


def _not_a_mapping(tmp_path):
    (tmp_path / "c.yaml").write_text("- num_processes: 2\n")
    return tmp_path / "c.yaml", "it is not a mapping of settings"


def _unknown_key(tmp_path):
    (tmp_path / "c.yaml").write_text((REPO / "scripts" / "accelerate" / "cpu-2proc.yaml").read_text() + "procs: 2\n")
    return tmp_path / "c.yaml", "had unknown keys (['procs'])"


def refused_launch(tmp_path, capsys) -> str:
    """Launch a process that would mark a folder; the launch must be refused (exit 2, nothing launched): its line."""
    ready = tmp_path / "ready"
    ready.mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["-m", "tests.launched", "ok:all", str(ready)])
    assert stop.value.code == 2
    assert not any(ready.iterdir())  # nothing was launched
    (line,) = capsys.readouterr().err.splitlines()
    return line


@pytest.mark.parametrize(
    "config",
    [_missing, _a_folder, _not_yaml, _not_a_mapping, _unknown_key],
    ids=["missing", "a-folder", "not-yaml", "not-a-mapping", "unknown-key"],
)
def test_an_accelerate_config_it_cannot_use_is_one_line_naming_the_variable(tmp_path, monkeypatch, capsys, config):
    path, said = config(tmp_path)
    monkeypatch.setenv("ACCELERATE_CONFIG_FILE", str(path))
    line = refused_launch(tmp_path, capsys)
    assert line.startswith(f"error: ACCELERATE_CONFIG_FILE={path} is not an accelerate config a launch can use: ")
    assert said in line and line.endswith("point ACCELERATE_CONFIG_FILE at another (`accelerate config --config_file` "
                                          "writes one), or unset it")  # fmt: skip


@pytest.mark.parametrize(
    ("var", "value", "said"),
    [("PET_MAX_RESTARTS", "two", "PET_MAX_RESTARTS='two' is no count of restarts; set it to 0 or more, or unset it"),
     ("PIPELINE_LAUNCH_VIA", 'srun "x', "PIPELINE_LAUNCH_VIA='srun \"x' is not a command line (No closing quotation)"),
     ("LOGLEVEL", "loud", "LOGLEVEL='loud' is no log level; set it to one of CRITICAL, ")],
    ids=["restarts", "via", "loglevel"],
)  # fmt: skip
def test_a_launch_variable_it_cannot_use_is_one_line(tmp_path, monkeypatch, capsys, var, value, said):
    monkeypatch.setenv(var, value)
    assert refused_launch(tmp_path, capsys).startswith(f"error: {said}")


def run_in_a_terminal(cmd: list[str], cwd: Path) -> str:
    """Run ``cmd`` with a pseudo-terminal for its stdout and stderr, as a user's shell does; what it wrote."""
    import pty

    parent, child = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the terminal closed: the process and its children are done
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(parent)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_a_terminal_sees_a_live_progress_bar_through_the_launcher_and_a_log_sees_none(tmp_path, tiny_raw, write_params):
    params = write_params({"train": {"epochs": 2, "batch_size": 4}})  # 50 steps an epoch
    stage = ["-m", "pipeline.train", "--params", str(params), "--data", str(tiny_raw),
             "--model-dir", str(tmp_path / "m"), "--live-dir", str(tmp_path / "l"),
             "--checkpoint-dir", str(tmp_path / "c"), "--cpu-threads", "1"]  # fmt: skip
    shown = run_in_a_terminal([sys.executable, "-m", "pipeline.launch", *stage], tmp_path)
    assert re.search(r"\r(?!\n)", shown) and "epoch 1/2:" in shown and "sample/s" in shown, shown  # redrawn bar
    assert "epoch 2/2  train loss" in shown  # and the epoch's line
    logged = subprocess.run([sys.executable, "-m", "pipeline.launch", *stage, "--fresh"], cwd=tmp_path,
                            env=child_env(), capture_output=True, text=True)  # fmt: skip
    assert logged.returncode == 0 and "sample/s" not in logged.stdout + logged.stderr
    assert "epoch 2/2  train loss" in logged.stdout
