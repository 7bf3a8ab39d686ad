"""The README's fault table says what the tests make happen: each row names a test that quotes its line."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

SECTION = "## Faults, and what is kept"


def fault_rows() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
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


def row_problem(row: list[str]) -> str | None:
    """What is wrong with one row of the table: a cell missing, no test of that name, a quote it does not assert."""
    fault, seen, kept, test = row
    file, _, name = test.strip("`").partition("::")
    source = source_of(file, name)
    quoted = re.search(r"`([^`]+)`", seen)
    if not (fault and kept and quoted):
        return f"the row for {fault!r} lacks a fault, a quoted line or what is kept"
    if source is None:
        return f"the row for {fault!r} names {test}, which does not exist"
    missing = [piece.strip() for piece in quoted.group(1).split("…") if piece.strip() not in source]
    return f"{test} does not assert {missing[0]!r} ({fault})" if missing else None


def test_every_row_of_the_fault_table_quotes_what_its_test_asserts():
    rows = fault_rows()
    assert len(rows) >= 15
    assert [problem for problem in map(row_problem, rows) if problem] == []


def test_a_row_whose_quote_or_test_drifted_is_caught():
    row = ["Ctrl-C", "`error: interrupted`", "all up to the newest checkpoint",
           "`test_launch.py::test_ctrl_c_says_interrupted_once`"]  # fmt: skip
    assert row_problem(row) is None
    assert "does not assert 'error: cancelled'" in str(row_problem([row[0], "`error: cancelled`", *row[2:]]))
    assert "which does not exist" in str(row_problem([*row[:3], "`test_launch.py::test_gone`"]))


def test_the_python_snippet_loads_the_model_and_gives_probabilities(tmp_path, monkeypatch, tiny_raw):
    import torch

    from pipeline.dataset import load_split
    from pipeline.model import ModelConfig, build_model, save_artifact

    text = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S)
    assert snippet and "load_artifact" in snippet.group(1)
    model = build_model(ModelConfig())
    save_artifact(model, ModelConfig(), tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    images = load_split(tiny_raw, "test").images[:5]
    scope: dict = {"images": images}
    exec(snippet.group(1), scope)
    expected = model.eval()(images.unsqueeze(1).float() / 255).softmax(dim=1)
    assert scope["probabilities"].shape == (5, 10) and torch.equal(scope["probabilities"], expected)
