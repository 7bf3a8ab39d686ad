"""dvc.yaml declares, per stage, exactly the code it runs and the params it reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.provenance import import_closure
from pipeline.train import Paths, command

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", ["download", "train", "evaluate"])
def test_stage_code_deps_are_exactly_the_modules_it_imports(stage):
    code_deps = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert code_deps == set(import_closure(f"pipeline.{stage}"))  # the train stage's run key hashes the same files


@pytest.mark.parametrize(
    ("stage", "params"),
    [
        ("download", ["download"]),
        ("train", ["data.subset", "data.val_size", "data.split_seed", "model", "train"]),
        ("evaluate", ["data.subset", "evaluate"]),
    ],
)
def test_stage_params_are_the_keys_it_reads(stage, params):
    assert STAGES[stage]["params"] == params


def test_stages_chain_through_their_outputs():
    assert "data/raw" in STAGES["download"]["outs"]
    assert "data/raw" in STAGES["train"]["deps"] and "models" in STAGES["train"]["outs"]
    assert {"data/raw", "models"} <= set(STAGES["evaluate"]["deps"])


def test_train_runs_as_a_module_under_accelerate_launch_with_the_stages_own_command_line():
    cmd = STAGES["train"]["cmd"]
    assert cmd.startswith("accelerate launch --quiet ")
    paths = Paths(Path("data/raw"), Path("models"), Path("dvclive/train"), Path("checkpoints"))
    expected = command(Path("params.yaml"), paths)[1:]  # less this Python: the launcher brings its own
    assert cmd[cmd.index(" -m pipeline.train ") :].split() == expected


def test_evaluate_runs_the_stages_own_command_line():
    from pipeline.evaluate import command as evaluate_command

    paths = [Path(p) for p in ("params.yaml", "data/raw", "models", "metrics/test.json", "eval")]
    assert STAGES["evaluate"]["cmd"].split() == ["python", *evaluate_command(*paths)[1:]]


def test_metrics_files_are_declared_and_kept_in_git():
    declared = [next(iter(m)) for s in STAGES.values() for m in s.get("metrics", [])]
    assert declared == ["dvclive/train/metrics.json", "metrics/test.json"]
    for stage in STAGES.values():
        for m in stage.get("metrics", []):
            assert next(iter(m.values()))["cache"] is False


def test_dvc_config_disables_analytics():
    assert "analytics = false" in (REPO / ".dvc" / "config").read_text()


@pytest.mark.parametrize("name", ["cpu-2proc.yaml", "gpu-1.yaml", "gpu-8.yaml", "2-nodes.yaml"])
def test_example_accelerate_configs_load_with_accelerates_own_reader(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "scripts" / "accelerate" / name))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"


def _outs(stage: dict) -> list[tuple[str, dict]]:
    return [(o, {}) if isinstance(o, str) else next(iter(o.items())) for o in stage.get("outs", [])
            + stage.get("metrics", [])]  # fmt: skip


def test_every_output_restores_from_git_or_the_dvc_cache():
    # a persist or uncached output that git does not hold has a hash in dvc.lock that nothing can restore,
    # so the pipeline would never be up to date after `dvc exp apply`, `dvc checkout` or a clone + `dvc pull`
    for stage in STAGES.values():
        for path, opts in _outs(stage):
            assert not opts.get("persist"), path
            if opts.get("cache") is False:
                tracked = subprocess.run(["git", "ls-files", path], cwd=REPO, capture_output=True, text=True).stdout
                assert tracked.strip(), f"{path} is uncached but not in git"


def test_resume_state_is_no_output_and_git_ignored():
    assert all(path != "checkpoints" for stage in STAGES.values() for path, _ in _outs(stage))
    ignored = subprocess.run(["git", "check-ignore", "-q", "checkpoints/0123456789abcdef/step-00000001"], cwd=REPO)
    assert ignored.returncode == 0
