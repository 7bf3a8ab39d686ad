"""How the package reads: short functions (ruff's C901 checks their branching; this, their length)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
MAX_LINES = 60


def function_lengths(source: str) -> dict[str, int]:
    """Lines per function or method (decorators and docstring included), by qualified name."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    lengths[name] = (child.end_lineno or child.lineno) - first + 1
                visit(child, name + ".")

    visit(ast.parse(source), "")
    return lengths


def test_function_lengths_count_every_line_of_nested_definitions():
    source = "class A:\n    @staticmethod\n    def f():\n        def g():\n            pass\n        return 1\n"
    assert function_lengths(source) == {"A.f": 5, "A.f.g": 2}


def test_no_function_in_the_package_is_over_60_lines():
    long = {
        f"{path.name}:{name}": n
        for path in sorted(PACKAGE.glob("*.py"))
        for name, n in function_lengths(path.read_text()).items()
        if n > MAX_LINES
    }
    assert not long, f"split these (over {MAX_LINES} lines): {long}"
