"""The committed dvc.lock describes the committed code and params: a change that forgets `dvc repro` fails here."""

from __future__ import annotations

import hashlib
from functools import reduce
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
LOCK = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

RERUN = "the committed dvc.lock is stale: run `dvc repro` and commit dvc.lock with the change"


def _paths(entries: list) -> set[str]:
    return {e if isinstance(e, str) else next(iter(e)) for e in entries}


@pytest.mark.parametrize("stage", list(STAGES))
def test_lock_records_the_stage_as_dvc_yaml_declares_it(stage):
    locked, declared = LOCK[stage], STAGES[stage]
    assert locked["cmd"] == declared["cmd"], RERUN
    assert {d["path"] for d in locked["deps"]} == _paths(declared["deps"]), RERUN
    assert {o["path"] for o in locked["outs"]} == _paths(declared.get("outs", []) + declared.get("metrics", [])), RERUN


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_code_dep_in_the_lock_has_the_committed_files_md5(stage):
    code = [d for d in LOCK[stage]["deps"] if (REPO / d["path"]).is_file() and d["path"].endswith(".py")]
    assert code, "the stage has no code deps"
    for dep in code:
        assert hashlib.md5((REPO / dep["path"]).read_bytes()).hexdigest() == dep["md5"], f"{dep['path']}: {RERUN}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_param_in_the_lock_has_params_yamls_value(stage):
    locked = LOCK[stage]["params"]["params.yaml"]
    assert set(locked) == set(STAGES[stage]["params"]), RERUN
    for key, value in locked.items():
        assert reduce(lambda d, k: d[k], key.split("."), PARAMS) == value, f"{key}: {RERUN}"
