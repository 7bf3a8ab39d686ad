import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.runtime import cpu_threads_for, make_accelerator


@pytest.mark.parametrize(
    ("requested", "cores", "local", "expected"),
    [(3, 16, 2, 3), (0, 16, 2, 8), (0, 2, 1, 2), (0, 2, 4, 1), (0, None, 1, 1)],
    ids=["explicit", "split-across-processes", "single-process", "more-processes-than-cores", "unknown-cores"],
)
def test_cpu_threads_default_to_the_cores_split_across_local_processes(requested, cores, local, expected):
    assert cpu_threads_for(requested, cores, local) == expected


def test_accelerator_overrides_the_launchers_single_thread_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `accelerate launch` exports on CPU
    before = torch.get_num_threads()
    try:
        make_accelerator(cpu_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_negative_thread_count_is_refused():
    with pytest.raises(PipelineError, match="--cpu-threads must be 0"):
        make_accelerator(cpu_threads=-1)
