"""Every command in README.md and docs/ runs: each bash and python block, in order, in a scratch copy of the repo.

A block that needs what the test machines lack (a GPU, a cluster, PyTorch's own package index) is marked in
its page with ``<!-- not run: why -->`` on the line above it; those are listed, never run. The scratch copy
has small params (:data:`DOCS`), a bare git remote named ``origin``, and the image files the predict
examples name; the few addresses the pages give for a user's own infrastructure are replaced by local ones
(:data:`PLACES`). The fault table of docs/resume.md quotes what its tests assert (:data:`FAULT_TESTS`).
"""

from __future__ import annotations

import ast
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.dataset import load_split
from tests.conftest import REPO, child_env, project_repo, sh

# the order a newcomer reads them in: the README's first screen makes the results the guides build on
PAGES = ("README.md", "docs/running.md", "docs/experiments.md", "docs/recipes.md", "docs/python-api.md",
         "docs/resume.md", "docs/sharing.md", "docs/gpus.md")  # fmt: skip
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]+?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
RUNNABLE = ("bash", "python")
# why a block may be left to the reader: hardware, infrastructure or a network the test machines lack, the
# environment set-up that .ci/run itself runs, the test suite itself, or a run too long for CI
NOT_RUN = ("needs a GPU host", "needs two machines", "needs a Slurm cluster", "needs PyTorch's own package index",
           ".ci/run runs these very lines", "it is the test suite itself", "trains for 2 minutes",
           "trains for 8 minutes")  # fmt: skip
DOCS = {
    "data": {"subset": 1200, "val_size": 200},  # room for the fast recipe's data.val_size=1000
    "train": {"epochs": 2, "batch_size": 50},
    "evaluate": {"batch_size": 500},
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    not_run: str | None  # why, for a block the test leaves to the reader

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    text = (REPO / page).read_text()
    return [Block(page, text.count("\n", 0, m.start("code")), m["lang"], m["code"], m["why"])
            for m in BLOCK.finditer(text)]  # fmt: skip


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_page_is_in_the_run_and_every_command_block_runs_or_says_why_not():
    pages = {"README.md", *(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))}
    assert pages == set(PAGES)
    for block in ALL:
        if block.not_run is not None:
            assert block.lang in RUNNABLE and any(block.not_run.startswith(w) for w in NOT_RUN), block
        else:
            assert block.lang in (*RUNNABLE, "text"), f"{block}: a ```{block.lang} block is neither run nor output"
    assert sum(b.lang in RUNNABLE and b.not_run is None for b in ALL) >= 25


def test_the_readmes_install_lines_are_the_ones_ci_runs():
    (install,) = [b for b in blocks("README.md") if b.not_run and b.not_run.startswith(".ci/run runs")]
    ci = (REPO / ".ci" / "run").read_text()
    for command in re.split(r"\n| && ", install.code.strip()):
        assert command.strip() in ci, command


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The project's tracked files as a new git repo on small data, with a bare ``origin`` and predict's inputs."""
    root = tmp_path_factory.mktemp("docs")
    repo = project_repo(root / "repo", DOCS)
    sh(repo, "git", "branch", "-M", "main")
    sh(root, "git", "init", "-q", "--bare", "--initial-branch", "main", str(root / "origin.git"))
    sh(repo, "git", "remote", "add", "origin", str(root / "origin.git"))
    sh(repo, "git", "push", "-q", "-u", "origin", "main")
    return repo


def photos(repo: Path, raw: Path) -> None:
    """The image files the predict examples name: test images as a user would have them (git-ignored here)."""
    test = load_split(raw, "test")
    for name, i in (("my-photo.png", 0), ("photos/a.png", 1), ("photos/b.png", 2), ("shots/c.jpg", 3)):
        (repo / name).parent.mkdir(exist_ok=True)
        Image.fromarray((255 - test.images[i]).numpy()).resize((280, 280)).save(repo / name)
    (repo / ".git" / "info" / "exclude").write_text("my-photo.png\nphotos/\nshots/\n")


def places(repo: Path) -> dict[str, str]:
    """The user's own infrastructure in the pages, and where it is in the scratch copy."""
    root = repo.parent
    return {
        "/mnt/team/fashion-dvc": str(root / "remote"),
        "https://github.com/you/fashion-mnist-pipeline fashion && cd fashion": f"{root / 'origin.git'} "
        f"{root / 'clone'} && cd {root / 'clone'}",
        "https://github.com/you/fashion-mnist-pipeline": str(root / "origin.git"),
    }


def run_block(block: Block, repo: Path) -> subprocess.CompletedProcess:
    code = block.code
    for place, local in places(repo).items():
        code = code.replace(place, local)
    cmd = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "bash" else ["python", "-c", code]
    identity = {"GIT_AUTHOR_NAME": "docs", "GIT_AUTHOR_EMAIL": "docs@example.com", "GIT_COMMITTER_NAME": "docs",
                "GIT_COMMITTER_EMAIL": "docs@example.com"}  # fmt: skip
    return subprocess.run(cmd, cwd=repo, env=child_env(**identity), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_every_command_of_the_readme_and_the_guides_runs_in_order(scratch, capsys):
    skipped = [f"{b}: {b.not_run}" for b in ALL if b.not_run is not None]
    ran: dict[str, str] = {}
    for block in (b for b in ALL if b.lang in RUNNABLE and b.not_run is None):
        if block.page == "README.md" and "fashion-predict" in block.code:
            photos(scratch, scratch / "data" / "raw")
        proc = run_block(block, scratch)
        assert proc.returncode == 0, f"{block} failed ({proc.returncode}):\n{block.code}\n{proc.stdout}\n{proc.stderr}"
        ran[str(block)] = proc.stdout + proc.stderr
    with capsys.disabled():
        print(f"\n{len(ran)} doc blocks ran; not run here:\n  " + "\n  ".join(skipped))
    outputs = "\n".join(ran.values())
    assert "Running stage 'train'" in outputs and "test accuracy" in outputs
    assert "Data and pipelines are up to date" in outputs  # the clone after `dvc pull`
    assert re.search(r"my-photo\.png: \S", outputs) and "test[0] (true: Ankle boot)" in outputs
    # the Python snippet's printout, on the model in the workspace: the fast recipe's experiment (quick_cnn) was
    # applied to it by docs/recipes.md's `dvc exp run` before docs/python-api.md runs
    assert re.search(r"\['(tutorial_cnn|quick_cnn)', \(8, 10\), ", outputs)
    tables = [b for b in ALL if str(b) in ran and re.search(r"dvc (metrics|exp) show", b.code)]
    assert len(tables) >= 2
    for block in tables:  # dvc prints these tables whole, not cut to a terminal's width
        assert max(map(len, ran[str(block)].splitlines())) <= 120, f"{block}:\n{ran[str(block)]}"


# docs/resume.md's fault table: each row's fault, and the test that makes it happen and checks what is kept
FAULT_TESTS = {
    "a bad param": (
        "test_dvc_record.py::test_a_failed_run_after_an_uncommitted_good_one_loses_nothing_that_dvc_checkout_restores"
    ),
    "training diverges (loss not finite)": (
        "test_dvc_record.py::test_a_failed_run_after_an_uncommitted_good_one_loses_nothing_that_dvc_checkout_restores"
    ),
    "going back to params already run": (
        "test_dvc_record.py::test_going_back_to_params_already_run_restores_from_the_run_cache_without_training"
    ),
    "the disk fills while the model is written": (
        "test_train.py::test_a_model_that_does_not_fit_on_disk_is_exported_by_the_rerun_without_training"
    ),
    "the disk fills during a checkpoint": (
        "test_files.py::test_a_checkpoint_that_does_not_fit_is_one_line_not_a_torch_traceback"
    ),
    "a batch too big for memory": (
        "test_memory.py::test_a_batch_whose_step_needs_more_than_the_free_memory_is_refused_naming_the_param"
    ),
    "memory runs out mid-step": (
        "test_memory.py::test_an_allocation_that_fails_is_one_line_naming_the_batch_param_in_use"
    ),
    "a worker stops (SIGSTOP, a hung device, a frozen node)": (
        "test_resume.py::test_a_stopped_worker_ends_the_run_in_one_line_naming_it_and_the_rerun_resumes_bitwise"
    ),
    "SIGKILL, power loss or pre-emption, mid-epoch or mid-save": (
        "test_resume.py::test_killed_run_resumes_to_bitwise_identical_weights_and_metrics"
    ),
    "a worker dies, restarts allowed": (
        "test_resume.py::test_a_killed_worker_restarts_with_its_group_and_resumes_bitwise"
    ),
    "a worker dies, no restarts": "test_launch.py::test_a_failing_launch_says_one_line_and_no_traceback",
    "one node of a Slurm launch fails": "test_slurm.py::test_a_failure_is_told_in_one_error_line_for_all_nodes",
    "Ctrl-C": "test_launch.py::test_ctrl_c_says_interrupted_once",
    "`dvc` or the launcher is killed": "test_guard.py::test_a_run_whose_launcher_dies_stops_instead_of_training_on",
    "a queued run (`dvc queue start`) is killed": (
        "test_runs.py::test_a_queued_run_killed_mid_epoch_resumes_bitwise_when_queued_again"
    ),
    "a second trainer of the same run": (
        "test_train.py::test_a_second_trainer_of_the_same_run_is_refused_and_other_runs_share_the_store"
    ),
    "a checkpoint that is damaged or does not fit": (
        "test_resume.py::test_a_checkpoint_that_does_not_fit_costs_one_line_and_the_previous_one_resumes"
    ),
    "`WORLD_SIZE` set without a launcher": (
        "test_distributed.py::test_world_size_without_a_launcher_is_refused_with_a_hint"
    ),
    "a mirror breaks mid-transfer": "test_download.py::test_a_broken_http_response_falls_through_to_the_next_source",
    "a mirror redirects to ftp: or another scheme": (
        "test_download.py::test_a_redirect_to_another_scheme_is_refused_without_connecting"
    ),
    "a mirror drips bytes": "test_download.py::test_a_source_that_drips_fails_once_past_its_whole_file_deadline",
    "a corrupt `.gz` beside a good raw file": (
        "test_download.py::test_a_corrupt_gz_in_a_folder_falls_back_to_the_raw_file_beside_it"
    ),
    "a source folder or file this user may not read": (
        "test_download.py::test_an_unreadable_source_is_one_line_and_the_next_is_tried"
    ),
    "a mirror that wants a user and password, given wrong ones": (
        "test_download.py::test_a_wrong_password_is_one_line_and_the_next_source_is_tried"
    ),
    "a password in a source URL": "test_download.py::test_a_password_in_a_source_url_is_never_printed",
    "no source has the data": "test_download.py::test_cli_failure_exits_2_with_one_line_per_source_and_no_traceback",
    "a `model.json` whose mean or std would make the input non-finite": (
        "test_model.py::test_a_non_finite_input_scaling_stops_predict_and_evaluate_with_one_line"
    ),
    "a model whose logits come out NaN or infinite": (
        "test_evaluate.py::test_non_finite_logits_are_an_error_and_no_metrics_are_written"
    ),
    "an image bomb given to predict": "test_predict.py::test_a_huge_image_is_refused_before_decoding",
    "an ONNX export that does not match its torch model": (
        "test_export.py::test_an_onnx_model_that_does_not_match_torch_is_refused_and_the_last_export_kept"
    ),
    "a corrupt `model.onnx` given to `fashion-predict --onnx`": (
        "test_predict.py::test_an_onnx_model_that_cannot_run_is_one_line_and_writes_nothing"
    ),
    "a read-only, dangling or file `checkpoints/`": (
        "test_guard.py::test_a_checkpoint_folder_that_cannot_be_written_is_one_line_before_training"
    ),
    "`--out` naming a folder, `--eval-dir` a file": (
        "test_evaluate.py::test_an_output_of_the_wrong_kind_is_one_line_before_anything_is_written"
    ),
    "a missing or broken `ACCELERATE_CONFIG_FILE`": (
        "test_launch.py::test_an_accelerate_config_it_cannot_use_is_one_line_naming_the_variable"
    ),
    "a launch variable that is not a number": "test_launch.py::test_a_launch_variable_it_cannot_use_is_one_line",
    "a `model.json` missing `model.name`": (
        "test_evaluate.py::test_an_artifact_that_lacks_its_model_name_is_one_line_before_anything_is_written"
    ),
    "Ctrl-C while a stage imports torch": "test_errors.py::test_ctrl_c_while_a_stage_imports_is_one_line_and_exit_130",
    "the launcher is killed": (
        "test_guard.py::test_a_run_whose_launcher_is_killed_stops_says_why_and_leaves_no_launcher_folder"
    ),
}


def fault_rows() -> list[list[str]]:
    text = (REPO / "docs" / "resume.md").read_text()
    section = text[text.index("## Faults, and what is kept") :]
    lines = [line for line in section.splitlines() if line.startswith("| ")][2:]  # less the header and its rule
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]


def source_of(file: str, name: str) -> str | None:
    """The source of test ``name`` in ``tests/file``, its decorators (parametrized cases) included."""
    source = (REPO / "tests" / file).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return "\n".join(source.splitlines()[first - 1 : node.end_lineno])
    return None


def row_problem(row: list[str], tests: dict[str, str]) -> str | None:
    """What is wrong with one row of the table: a cell missing, no test for it, a quote its test does not assert."""
    fault, seen, kept = row
    quoted = re.search(r"`([^`]+)`", seen)
    if not (fault and kept and quoted):
        return f"the row for {fault!r} lacks a fault, a quoted line or what is kept"
    if fault not in tests:
        return f"no test is named for the row {fault!r}"
    file, _, name = tests[fault].partition("::")
    if source_of(file, name) is None:
        return f"the row for {fault!r} names {tests[fault]}, which does not exist"
    source = (REPO / "tests" / file).read_text()  # the test, and the helpers that make its fault and its line
    missing = [piece.strip() for piece in quoted.group(1).split("…") if piece.strip() not in source]
    return f"{tests[fault]} does not assert {missing[0]!r} ({fault})" if missing else None


def test_every_row_of_the_fault_table_quotes_what_its_test_asserts():
    rows = fault_rows()
    assert {row[0] for row in rows} == set(FAULT_TESTS)
    assert [problem for problem in (row_problem(row, FAULT_TESTS) for row in rows) if problem] == []


def test_a_row_whose_quote_or_test_drifted_is_caught():
    tests = {"Ctrl-C": "test_launch.py::test_ctrl_c_says_interrupted_once"}
    row = ["Ctrl-C", "`error: interrupted`", "all up to the newest checkpoint"]
    assert row_problem(row, tests) is None
    assert "does not assert 'error: cancelled'" in str(row_problem([row[0], "`error: cancelled`", row[2]], tests))
    assert "which does not exist" in str(row_problem(row, {"Ctrl-C": "test_launch.py::test_gone"}))
    assert "no test is named" in str(row_problem(row, {}))


def test_the_python_api_snippet_runs_on_a_saved_model(tmp_path, monkeypatch, tiny_raw):
    from pipeline.model import ModelConfig, build_model, save_artifact

    (snippet,) = [b for b in blocks("docs/python-api.md") if b.lang == "python" and "load_artifact" in b.code]
    model = build_model(ModelConfig())
    save_artifact(model, ModelConfig(), tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet.code, scope)
    images = load_split(tiny_raw, "test").images[:8]
    expected = model.eval()(images.unsqueeze(1).float() / 255).softmax(dim=1)
    assert torch.equal(scope["probabilities"], expected)


def test_the_onnx_snippet_runs_on_an_exported_model(tmp_path, monkeypatch, tiny_raw, write_params, capsys):
    from pipeline import export
    from pipeline.dataset import CLASSES
    from pipeline.model import ModelConfig, build_model, save_artifact

    (snippet,) = [b for b in blocks("docs/python-api.md") if b.lang == "python" and "onnxruntime" in b.code]
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    save_artifact(model, ModelConfig(), tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    assert export.main(["--params", str(write_params()), "--data", str(tiny_raw)]) == 0
    capsys.readouterr()
    exec(snippet.code, {})
    with torch.no_grad():
        expected = model.eval()(load_split(tiny_raw, "test").images[:3].unsqueeze(1).float() / 255).argmax(dim=1)
    assert capsys.readouterr().out == f"18 {[CLASSES[int(i)] for i in expected]}\n"
