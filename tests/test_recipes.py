"""The recipes in recipes/ are valid params, and the `dvc exp run` lines that run them say the same thing."""

import re
import shlex

import pytest
import yaml

from pipeline.params import as_dict, parse_params, with_overrides
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def overrides(recipe: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in recipe.items() for key, value in values.items()}


def exp_run_line(text: str) -> str:
    (line,) = [m.group(1) for m in re.finditer(r"^#?\s*(dvc exp run .*)$", text, re.M)]
    return line


def set_params(line: str) -> dict[str, object]:
    words = shlex.split(line)
    return {k: yaml.safe_load(v) for k, v in (words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "-S")}


def test_there_are_fast_two_minute_and_beyond_recipes():
    assert {p.stem for p in RECIPES} >= {"fast", "two-minute", "beyond"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_merged_over_params_is_valid(path):
    recipe = yaml.safe_load(path.read_text())
    params = parse_params(with_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), recipe))
    assert params.train.epochs >= 1
    assert as_dict(params)["train"] | recipe.get("train", {}) == as_dict(params)["train"]  # the recipe took effect
    assert as_dict(params)["model"] | recipe.get("model", {}) == as_dict(params)["model"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_command_in_file_and_guide_sets_exactly_the_recipe(path):
    text = path.read_text()
    line = exp_run_line(text)
    assert set_params(line) == overrides(yaml.safe_load(text))
    assert f"-n {path.stem} " in line
    assert line in (REPO / "docs" / "recipes.md").read_text(), f"docs/recipes.md does not show `{line}`"
