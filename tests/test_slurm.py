"""scripts/slurm: the sbatch script's launch reaches every node (srun + node.sh), run here on 2 loopback "nodes"
with stand-ins for srun and scontrol (tests/slurm/). The same script driving `dvc repro` is in test_pipeline_e2e."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import launch
from tests.conftest import REPO, slurm_job

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"


def sbatch(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``sbatch --nodes 2 train.sbatch COMMAND`` as its batch step runs it: on the first node, in the submit dir."""
    env = slurm_job(2, REPO, HF_HOME=str(tmp_path / "no-accelerate-config"), PIPELINE_CPU_THREADS="1")
    return subprocess.run(["bash", str(SBATCH), *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip


@pytest.mark.slow
def test_the_stage_launch_runs_once_per_node_with_each_nodes_rank(tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = sbatch(tmp_path, sys.executable, "-m", "pipeline.launch", "-m", "tests.launched", "ok:all", str(ready))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in ready.iterdir()) == ["0", "1"]  # global ranks 0 and 1: one per node
    assert "2 node(s), main 127.0.0.1:" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("plan", "line"),
    [("error:all", "error: the params are bad; fix them"), ("error:1", "error: rank 1 has no data; fetch it")],
    ids=["every-node-alike", "node-1-only"],
)
def test_a_failure_is_told_in_one_error_line_for_all_nodes(tmp_path, plan, line):
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = sbatch(tmp_path, sys.executable, "-m", "pipeline.launch", "-m", "tests.launched", plan, str(ready))
    assert proc.returncode in (2, 143)  # as srun: the highest task's (the other node may be ended with SIGTERM)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert errors == [line], proc.stderr  # not node 0's "stopped by SIGTERM" after node 1 failed, nor a repeat
    assert "Traceback" not in proc.stderr and "consequence: " not in proc.stderr


def test_a_launch_via_a_command_that_cannot_start_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv(launch.VIA_VAR, "no-such-srun --nodes=2 bash scripts/slurm/node.sh")
    assert launch.main(["-m", "pipeline.train"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: PIPELINE_LAUNCH_VIA runs 'no-such-srun', which cannot start")
