"""dvc.yaml declares, per stage, exactly the code it runs and the params it reads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def import_closure(module: str) -> set[str]:
    """Files of the ``pipeline`` package that ``module`` imports, transitively, itself included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = f"{name.replace('.', '/')}.py"
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
                todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("pipeline.")]
    return seen


@pytest.mark.parametrize("stage", ["download", "train", "evaluate"])
def test_stage_code_deps_are_exactly_the_modules_it_imports(stage):
    code_deps = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert code_deps == import_closure(f"pipeline.{stage}")


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


def test_train_runs_under_accelerate_launch():
    assert STAGES["train"]["cmd"].startswith("accelerate launch ")
    assert " pipeline/train.py " in STAGES["train"]["cmd"]


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
