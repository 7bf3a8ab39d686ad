"""The benchmark script runs end to end in --quick mode (correctness only: no timing asserts)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_raw

pytestmark = pytest.mark.slow


def test_quick_benchmark_reports_every_variant_against_the_seed_loop(tmp_path):
    raw = write_raw(tmp_path / "raw", n_train=3200, n_test=50)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--data", str(raw), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"seed", "pipeline", "pipeline-nchw", "pipeline-bf16", "pipeline-bf16-b512"}
    for row in results["results"].values():
        assert row["samples_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["samples"] >= 1536  # whole global batches of up to 512 out of 2,000
    assert results["results"]["seed"]["ratio_vs_seed"] == 1.0
    assert results["machine"]["torch"] and "| pipeline |" in proc.stdout


def test_benchmark_without_data_says_what_to_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "run `dvc repro download`" in proc.stderr
