"""pipeline.gpus: which GPUs a run may take, and one run per GPU, on real processes over a simulated GPU list."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

from pipeline import gpus
from pipeline.errors import PipelineError
from pipeline.provenance import environment
from tests.conftest import REPO, child_env, free_port


@pytest.mark.parametrize(
    ("env", "count", "gpu_ids", "expected"),
    [
        ({}, 0, None, []),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 0, None, []),
        ({}, 3, None, ["0", "1", "2"]),
        ({"CUDA_VISIBLE_DEVICES": "2, 3"}, 2, None, ["2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": "1,7,2"}, 1, None, ["1"]),
        ({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, 2, None, ["GPU-aa", "GPU-bb"]),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 4, "3,2", ["3", "2"]),
        ({}, 2, "all", ["0", "1"]),
    ],
    ids=["no-gpu", "no-gpu-despite-the-variable", "all", "the-variable", "as-far-as-torch-counts", "uuids",
         "accelerates-gpu-ids", "gpu-ids-all"],
)  # fmt: skip
def test_a_launch_sees_the_gpus_its_config_or_the_variable_names_else_all(env, count, gpu_ids, expected):
    assert gpus.visible(env, count, gpu_ids) == expected


@pytest.mark.parametrize(
    ("value", "seen", "expected"),
    [(None, ["0", "1"], ["0", "1"]), ("1", ["0", "1"], ["1"]), (" 2,0 ", ["0", "1", "2"], ["2", "0"]),
     ("shared", ["0", "1"], []), ("0,1", [], ["0", "1"]), (None, [], [])],
    ids=["default-all-seen", "one", "spaces-and-order", "shared-takes-none", "simulated-on-cpu", "no-gpu"],
)  # fmt: skip
def test_runs_take_the_gpus_pipeline_gpus_names_else_all_they_see(value, seen, expected):
    env = {} if value is None else {gpus.POOL_VAR: value}
    assert gpus.pool(env, seen) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [("3", r"^PIPELINE_GPUS='3' names GPU 3, which this launch does not see \(it sees 0,1\); name GPUs among"),
     ("0,0", r"^PIPELINE_GPUS='0,0' names a GPU twice;"), (",", r"^PIPELINE_GPUS=',' names no GPU;")],
    ids=["unseen", "twice", "none"],
)  # fmt: skip
def test_a_pipeline_gpus_that_cannot_be_taken_is_one_line(value, match):
    with pytest.raises(PipelineError, match=match):
        gpus.pool({gpus.POOL_VAR: value}, ["0", "1"])


def test_waiting_is_the_default_and_pipeline_gpu_wait_0_turns_it_off():
    assert gpus.waits({}) and gpus.waits({gpus.WAIT_VAR: "1"}) and not gpus.waits({gpus.WAIT_VAR: "0"})
    with pytest.raises(PipelineError, match=r"^PIPELINE_GPU_WAIT='no' is neither 0 .* nor 1"):
        gpus.waits({gpus.WAIT_VAR: "no"})


def test_the_lock_folder_is_the_machines_unless_named_and_one_per_slurm_job(tmp_path):
    assert gpus.lock_folder({}).name == "pipeline-gpus" and gpus.lock_folder({}).is_absolute()
    assert gpus.lock_folder({"SLURM_JOB_ID": "42"}).name == "pipeline-gpus-slurm-42"
    assert gpus.lock_folder({gpus.LOCK_DIR_VAR: str(tmp_path), "SLURM_JOB_ID": "42"}) == tmp_path


def test_the_lines_name_the_gpus_and_who_holds_them():
    assert gpus.taken_line(["1"], ["0", "1"]) == "GPU 1 (of 0,1) for this run"
    assert gpus.taken_line(["0", "2"], ["0", "1", "2"]) == "GPUs 0,2 (of 0,1,2) for this run"
    assert gpus.busy(1, {"0": 123, "1": 456}) == "a free GPU: 0 and 1 are held by other runs (pids 123, 456)"
    assert gpus.busy(2, {"1": 7}) == "2 free GPUs: 1 is held by another run (pid 7)"
    assert gpus.busy(1, {"0": None}) == "a free GPU: 0 is held by another run"
    assert gpus.busy(1, {"0": 5, "1": 5, "2": 6}) == "a free GPU: 0, 1 and 2 are held by other runs (pids 5, 6)"


def test_a_run_that_needs_more_gpus_than_may_be_taken_is_one_line_naming_both_numbers(tmp_path):
    with pytest.raises(PipelineError, match=r"^this launch needs 3 GPUs .* but only 2 may be taken \(0,1\); launch"):
        with gpus.held(["0", "1"], 3, tmp_path, wait=True, report=print):
            pass


def take(folder: Path, pool: list[str], need: int = 1) -> AbstractContextManager[list[str]]:
    """Take ``need`` of ``pool`` without waiting; each call opens its own lock files, so it is another run to the OS."""
    return gpus.held(pool, need, folder, wait=False, report=print)


def test_a_group_takes_the_free_gpus_around_a_held_one_and_keeps_none_while_too_few_are_free(tmp_path):
    with take(tmp_path, ["1"]) as one:
        assert one == ["1"]
        with take(tmp_path, ["0", "1", "2"], 2) as group:
            assert group == ["0", "2"]
        with pytest.raises(PipelineError, match=rf"^this run needs 2 free GPUs: 1 is held by another run \(pid "
                           rf"{os.getpid()}\); run it once they end, or unset PIPELINE_GPU_WAIT"):  # fmt: skip
            with take(tmp_path, ["0", "1"], 2):
                pass
        with take(tmp_path, ["0"]) as zero:  # the refused group let go of GPU 0
            assert zero == ["0"]
    with take(tmp_path, ["0", "1"], 2) as both:
        assert both == ["0", "1"]


def test_a_lock_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    (tmp_path / "locks").write_text("")
    with pytest.raises(PipelineError, match=r"^GPU locks: .*locks is a file where a folder must be; remove it or set "
                       r"PIPELINE_GPU_LOCK_DIR to another folder$"):  # fmt: skip
        with gpus.held(["0"], 1, tmp_path / "locks" / "gpus", wait=True, report=print):
            pass


def test_the_provenance_records_the_gpus_the_run_was_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    env = environment(torch.device("cuda", 0), "no")
    assert (env["gpu"], env["gpus"]) == ("NVIDIA H200", ["1"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1,0,2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine: the first two GPUs they see
    assert environment(torch.device("cuda", 0), "no")["gpus"] == ["3", "1"]


# Real processes: each a stand-in run (tests/gpu_holder.py) that takes GPUs as pipeline.launch does.


def simulated(tmp_path: Path, pool: str, **extra: str) -> dict[str, str]:
    """The environment of a run on a machine with the GPUs ``pool`` names, its locks under ``tmp_path``."""
    return child_env(PIPELINE_GPUS=pool, PIPELINE_GPU_LOCK_DIR=str(tmp_path / "locks"), **extra)


def hold(tmp_path: Path, name: str, need: int, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start run ``name`` taking ``need`` GPUs; its output goes to ``tmp_path/name.out``."""
    cmd = [sys.executable, "-m", "tests.gpu_holder", name, str(need), str(tmp_path / "events")]
    with (tmp_path / f"{name}.out").open("w") as out:  # the run has its own copy
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def events(tmp_path: Path) -> list[str]:
    path = tmp_path / "events"
    return path.read_text().splitlines() if path.exists() else []


def said(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.out").read_text()


def wait_until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # a bound for a stuck test, not a measurement
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def release(tmp_path: Path, proc: subprocess.Popen[str], name: str) -> None:
    (tmp_path / f"release-{name}").touch()
    assert proc.wait(timeout=60) == 0, said(tmp_path, name)


def holders_never_overlap(log: list[str]) -> bool:
    """Replay ``took`` and ``released`` lines: no GPU is ever taken while another run holds it."""
    holding: dict[str, str] = {}
    for line in log:
        name, action, taken = line.split()
        for gpu in taken.split(","):
            if action == "took" and gpu in holding:
                return False
            if action == "took":
                holding[gpu] = name
            else:
                del holding[gpu]
    return True


@pytest.mark.slow
def test_three_runs_on_two_gpus_never_share_one_and_the_third_takes_the_first_freed(tmp_path):
    env = simulated(tmp_path, "0,1")
    runs = {name: hold(tmp_path, name, 1, env) for name in ("a", "b")}
    wait_until(lambda: len(events(tmp_path)) == 2, "two runs to take a GPU each")
    by_gpu = {line.split()[2]: line.split()[0] for line in events(tmp_path)}
    assert sorted(by_gpu) == ["0", "1"]
    runs["c"] = hold(tmp_path, "c", 1, env)
    wait_until(lambda: "waiting" in said(tmp_path, "c"), "the third run to wait")
    pids = f"{runs[by_gpu['0']].pid}, {runs[by_gpu['1']].pid}"
    assert said(tmp_path, "c") == f"waiting for a free GPU: 0 and 1 are held by other runs (pids {pids})\n"
    release(tmp_path, runs[by_gpu["1"]], by_gpu["1"])
    wait_until(lambda: any(line.startswith("c took") for line in events(tmp_path)), "the third run to take one")
    for name in (by_gpu["0"], "c"):
        release(tmp_path, runs[name], name)
    log = events(tmp_path)
    assert log[2:4] == [f"{by_gpu['1']} released 1", "c took 1"]  # the third took GPU 1 only once it was freed
    assert holders_never_overlap(log) and len(log) == 6


def test_the_overlap_check_catches_a_shared_gpu():
    assert not holders_never_overlap(["a took 0", "b took 0,1"])
    assert holders_never_overlap(["a took 0", "a released 0", "b took 0,1"])


@pytest.mark.slow
def test_a_run_killed_with_sigkill_frees_its_gpu_for_the_run_waiting_for_it(tmp_path):
    env = simulated(tmp_path, "0")
    killed = hold(tmp_path, "a", 1, env)
    wait_until(lambda: events(tmp_path) == ["a took 0"], "the first run to take GPU 0")
    waiting = hold(tmp_path, "b", 1, env)
    wait_until(lambda: "waiting" in said(tmp_path, "b"), "the second run to wait")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    wait_until(lambda: len(events(tmp_path)) == 2, "the second run to take GPU 0")
    release(tmp_path, waiting, "b")
    assert events(tmp_path) == ["a took 0", "b took 0", "b released 0"]


@pytest.mark.slow
def test_without_waiting_a_run_that_finds_no_free_gpu_fails_in_one_line_naming_the_holder(tmp_path):
    holder = hold(tmp_path, "a", 1, simulated(tmp_path, "0,1"))
    wait_until(lambda: len(events(tmp_path)) == 1, "the first run to take a GPU")
    gpu = events(tmp_path)[0].split()[2]
    refused = hold(tmp_path, "b", 1, simulated(tmp_path, gpu, PIPELINE_GPU_WAIT="0"))
    assert refused.wait(timeout=60) == 2
    assert said(tmp_path, "b") == (f"error: this run needs a free GPU: {gpu} is held by another run (pid "
                                   f"{holder.pid}); run it once they end, or unset PIPELINE_GPU_WAIT (0 now) to have "
                                   "it wait\n")  # fmt: skip
    release(tmp_path, holder, "a")


def launch(tmp_path: Path, plan: str, *flags: str) -> subprocess.Popen[str]:
    """pipeline.launch of tests/launched.py on a machine with simulated GPUs 0 and 1, no accelerate config."""
    (tmp_path / "ready").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline.launch", *flags, "-m", "tests.launched", plan, str(tmp_path / "ready")]
    env = simulated(tmp_path, "0,1", HF_HOME=str(tmp_path / "no-accelerate-config"))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


@pytest.mark.slow
def test_the_launch_holds_a_free_gpu_while_its_process_runs_and_shows_it_only_that_one(tmp_path):
    locks = tmp_path / "locks"
    with take(locks, ["0"]):  # another run holds GPU 0
        proc = launch(tmp_path, "wait:none")
        ready = tmp_path / "ready" / "0"
        wait_until(lambda: ready.exists() and ready.read_text() != "", "the launched process to start")
        assert ready.read_text() == "1"  # its CUDA_VISIBLE_DEVICES
        with pytest.raises(PipelineError, match=rf"1 is held by another run \(pid {proc.pid}\)"):
            with take(locks, ["1"]):
                pass
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130 and out.splitlines()[0] == "GPU 1 (of 0,1) for this run", (out, err)
    with take(locks, ["1"]) as taken:  # given back when the launch ended
        assert taken == ["1"]


@pytest.mark.slow
def test_a_launch_of_more_processes_than_gpus_is_one_line_naming_both_numbers(tmp_path):
    flags = ("--multi_gpu", "--num_processes", "3", "--main_process_port", str(free_port()))
    out, err = launch(tmp_path, "ok:all", *flags).communicate(timeout=90)
    assert err.splitlines() == [
        "error: this launch needs 3 GPUs (one per process on this machine) but only 2 may be taken (0,1); launch 2 "
        "or fewer processes (--num_processes, or num_processes in the accelerate config)"
    ]
    assert not list((tmp_path / "ready").iterdir())  # no process started
