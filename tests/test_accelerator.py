import os
import subprocess
import sys

import pytest
import torch

from pipeline.accelerator import cpu_threads_for, make_accelerator
from pipeline.errors import PipelineError
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("requested", "cores", "local", "runs", "expected"),
    [(3, 16, 2, 1, 3), (0, 16, 2, 1, 8), (0, 2, 1, 1, 2), (0, 2, 4, 1, 1), (0, None, 1, 1, 1), (0, 16, 2, 2, 4),
     (0, 2, 1, 2, 1), (3, 16, 1, 4, 3)],
    ids=["explicit", "split-across-processes", "single-process", "more-processes-than-cores", "unknown-cores",
         "two-queued-runs-of-two-processes", "two-queued-runs-on-two-cores", "explicit-beats-the-queue"],
)  # fmt: skip
def test_cpu_threads_default_to_the_cores_split_across_local_processes_and_queued_runs(
    requested, cores, local, runs, expected
):
    assert cpu_threads_for(requested, cores, local, runs) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the thread count is set on CPU only")
def test_accelerator_sets_the_requested_thread_count_over_the_launchers_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `accelerate launch` exports on CPU
    before = torch.get_num_threads()
    requested = (os.cpu_count() or 1) + 1  # a count neither torch nor the launcher would pick
    torch.set_num_threads(1)
    try:
        make_accelerator(cpu_threads=requested)
        assert torch.get_num_threads() == requested
        make_accelerator(cpu_threads=0)  # 0: this host's cores, for its one process
        assert torch.get_num_threads() == cpu_threads_for(0, os.cpu_count(), 1)
    finally:
        torch.set_num_threads(before)


def test_negative_thread_count_is_refused():
    with pytest.raises(PipelineError, match="--cpu-threads must be 0"):
        make_accelerator(cpu_threads=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is fine on a GPU")
def test_fp16_on_cpu_is_refused_instead_of_silently_running_fp32():
    with pytest.raises(PipelineError, match="fp16 mixed precision needs a GPU.*bf16"):
        make_accelerator(mixed_precision="fp16")


def test_bf16_on_cpu_autocasts_the_forward_pass():
    accelerator = make_accelerator(mixed_precision="bf16")
    layer = torch.nn.Linear(4, 2)
    seen = []
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    model = accelerator.prepare(torch.nn.Sequential(layer))
    assert model(torch.ones(1, 4)).dtype == torch.float32  # Accelerate hands back fp32 outputs
    assert seen == [torch.bfloat16]  # ... computed in bf16


def test_a_world_size_with_a_master_address_but_no_launcher_is_refused_not_left_to_hang(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # enough for torch to wait in the rendezvous for 30 minutes
    monkeypatch.setenv("MASTER_PORT", "29555")
    with pytest.raises(PipelineError, match=r"^WORLD_SIZE=2 is set but no launcher .* started this process"):
        make_accelerator()


def test_the_thread_count_comes_from_the_environment_unless_given(monkeypatch):
    import argparse

    from pipeline.accelerator import CPU_THREADS_VAR
    from pipeline.args import add_common_args

    def parsed(*argv: str) -> int:
        p = argparse.ArgumentParser()
        add_common_args(p)
        return p.parse_args(list(argv)).cpu_threads

    assert parsed() == 0  # auto: the cores split across this host's processes
    monkeypatch.setenv(CPU_THREADS_VAR, "1")  # e.g. PIPELINE_CPU_THREADS=1 dvc queue start -j 2
    assert parsed() == 1 and parsed("--cpu-threads", "3") == 3
    monkeypatch.setenv(CPU_THREADS_VAR, "two")  # one line naming the variable, not argparse's usage
    with pytest.raises(PipelineError, match=r"^PIPELINE_CPU_THREADS='two' is no count; set it to a whole number"):
        parsed()


@pytest.mark.parametrize("var", ["WORLD_SIZE", "LOCAL_WORLD_SIZE"])
def test_a_process_count_in_the_environment_that_is_no_count_is_one_line_naming_it(monkeypatch, var):
    monkeypatch.setenv(var, "two")
    with pytest.raises(PipelineError, match=rf"^{var}='two' is no count; set it to a whole number \(0 or more\)"):
        make_accelerator()


def test_a_run_under_a_dvc_queue_counts_the_workers_of_its_own_queue(tmp_path):
    # three stand-in workers, as `dvc queue start -j 2` runs them (dvc exp queue-worker <node>), and one of
    # another repo's queue; the run is a child of the first
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    count = "from pipeline.accelerator import queue_runs; print(queue_runs())"
    run_under = [
        sys.executable,
        "-c",
        f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {count!r}]))",
    ]
    others = [subprocess.Popen([*sleep, "exp", "queue-worker", node]) for node in
              ("dvc-exp-abc123-2@localhost", "dvc-exp-ffffff-1@localhost")]  # fmt: skip
    try:
        out = subprocess.run([*run_under, "exp", "queue-worker", "dvc-exp-abc123-1@localhost", "--clean"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        alone = subprocess.run([sys.executable, "-c", count], cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        for proc in others:
            proc.kill()
            proc.wait()
    assert out.stdout.strip() == "2", out.stderr  # its own queue's two workers; the other queue's is not counted
    assert alone.stdout.strip() == "1", alone.stderr  # outside a queue: one run
