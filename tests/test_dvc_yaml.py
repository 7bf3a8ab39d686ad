"""dvc.yaml declares, per stage, exactly the code it runs and the params it reads."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

from pipeline.model import ModelConfig, build_model, save_artifact
from pipeline.params import Params, parse_params
from pipeline.provenance import import_closure
from pipeline.train import Paths, command
from tests.conftest import DEBIAN, REPO, TINY, full_params

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", ["download", "train", "evaluate", "export"])
def test_stage_code_deps_are_exactly_the_modules_its_command_runs_and_they_import(stage):
    code_deps = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    modules = re.findall(r"-m (pipeline\.\w+)", STAGES[stage]["cmd"])  # train's: the launcher and the stage
    assert f"pipeline.{stage}" in modules  # the train stage's run key hashes import_closure("pipeline.train")
    assert code_deps == {path for module in modules for path in import_closure(module)}


class Unread:
    """A params value that dvc.yaml does not list for the stage at hand: any use of it fails the test."""

    def __init__(self, key: str) -> None:
        object.__setattr__(self, "key", key)

    def _used(self, *_: object, **__: object) -> NoReturn:
        raise AssertionError(f"the stage read {object.__getattribute__(self, 'key')}, which dvc.yaml does not list")

    __getattr__ = __bool__ = __eq__ = __hash__ = __int__ = __float__ = __index__ = __iter__ = __len__ = _used
    __lt__ = __le__ = __gt__ = __ge__ = __add__ = __radd__ = __mul__ = __rmul__ = __sub__ = __str__ = __format__ = _used
    __deepcopy__ = __reduce_ex__ = _used


def only_declared(params: Params, declared: set[str]) -> Params:
    """``params`` with each key that ``declared`` (dvc.yaml's ``section``, ``section.key`` items) lacks: Unread."""
    sections = {}
    for name, section in vars(params).items():
        keys = {f"{name}.{k}": v for k, v in vars(section).items()}
        if name in declared:
            sections[name] = section
        elif declared & keys.keys():
            sections[name] = dataclasses.replace(
                section, **{key.split(".")[1]: v if key in declared else Unread(key) for key, v in keys.items()}
            )
        else:
            sections[name] = Unread(name)
    return Params(**sections)


def run_stage(stage: str, tmp_path: Path, raw: Path) -> int:
    """Run ``stage``'s main on tiny inputs; train, evaluate and export read the tiny data set, download copies the real
    one."""
    from pipeline import download, evaluate, export, train

    if stage == "download":
        return download.main(["--out", str(tmp_path / "raw")])
    if stage == "train":
        return train.main(["--data", str(raw), *train.command(Path(), train.Paths.under(tmp_path, raw))[5:]])
    save_artifact(build_model(ModelConfig()), ModelConfig(), tmp_path / "models")
    if stage == "export":
        return export.main(export.command(Path(), raw, tmp_path / "models", tmp_path / "onnx", tmp_path / "o.json")[5:])
    return evaluate.main(evaluate.command(Path(), raw, tmp_path / "models", tmp_path / "t.json", tmp_path / "e")[5:])


@pytest.mark.parametrize("stage", ["download", "train", "evaluate", "export"])
def test_each_stage_reads_no_params_beyond_those_dvc_yaml_lists_for_it(stage, tmp_path, tiny_raw, monkeypatch):
    if stage == "download" and not DEBIAN.is_dir():
        pytest.fail("this test downloads from the offline source: apt-get install dataset-fashion-mnist")
    tiny = full_params(TINY, {"download": {"sources": [str(DEBIAN)]}})
    params = only_declared(parse_params(tiny), set(STAGES[stage]["params"]))
    monkeypatch.setattr(f"pipeline.{stage}.load_params", lambda *_: params)
    assert run_stage(stage, tmp_path, tiny_raw) == 0


def test_a_stage_that_reads_an_undeclared_param_fails_that_check():
    params = only_declared(parse_params(full_params()), {"data.subset", "evaluate"})
    assert params.data.subset == 0 and params.evaluate.batch_size == 1000
    with pytest.raises(AssertionError, match=r"read data\.val_size, which dvc.yaml does not list"):
        params.data.val_size + 1
    with pytest.raises(AssertionError, match=r"read train, which dvc.yaml does not list"):
        _ = params.train.lr
    with pytest.raises(AssertionError, match=r"which dvc.yaml does not list"):
        dataclasses.asdict(params)  # logging every param reads every param


def test_stages_chain_through_their_outputs():
    assert "data/raw" in STAGES["download"]["outs"]
    assert "data/raw" in STAGES["train"]["deps"] and "models" in STAGES["train"]["outs"]
    assert {"data/raw", "models"} <= set(STAGES["evaluate"]["deps"])
    assert {"data/raw", "models"} <= set(STAGES["export"]["deps"]) and "onnx" in STAGES["export"]["outs"]


def test_train_runs_as_a_module_under_the_pipelines_launcher_with_the_stages_own_command_line():
    cmd = STAGES["train"]["cmd"]
    assert cmd.startswith("python -m pipeline.launch -m pipeline.train ")
    paths = Paths(Path("data/raw"), Path("models"), Path("dvclive/train"), Path("checkpoints"))
    expected = command(Path("params.yaml"), paths)[1:]  # less this Python: the launcher brings its own
    assert cmd[cmd.index(" -m pipeline.train ") :].split() == expected


def test_evaluate_runs_the_stages_own_command_line():
    from pipeline.evaluate import command as evaluate_command

    paths = [Path(p) for p in ("params.yaml", "data/raw", "models", "metrics/test.json", "eval")]
    assert STAGES["evaluate"]["cmd"].split() == ["python", *evaluate_command(*paths)[1:]]


def test_export_runs_the_stages_own_command_line():
    from pipeline.export import command as export_command

    paths = [Path(p) for p in ("params.yaml", "data/raw", "models", "onnx", "metrics/onnx.json")]
    assert STAGES["export"]["cmd"].split() == ["python", *export_command(*paths)[1:]]


def test_metrics_files_are_declared():
    declared = [m if isinstance(m, str) else next(iter(m)) for s in STAGES.values() for m in s.get("metrics", [])]
    assert declared == ["dvclive/train/metrics.json", "metrics/test.json", "metrics/onnx.json"]


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


def test_every_output_is_cached_so_that_a_failed_run_and_the_run_cache_can_restore_it():
    # DVC removes a stage's outputs before its command runs: a cached one comes back with `dvc checkout`, an
    # uncached one is lost; and DVC restores a stage from its run-cache only when every output is cached
    for stage in STAGES.values():
        for path, opts in _outs(stage):
            assert opts.get("cache", True) and not opts.get("persist"), path


def test_resume_state_is_no_output_and_git_ignored():
    assert all(path != "checkpoints" for stage in STAGES.values() for path, _ in _outs(stage))
    ignored = subprocess.run(["git", "check-ignore", "-q", "checkpoints/0123456789abcdef/step-00000001"], cwd=REPO)
    assert ignored.returncode == 0
