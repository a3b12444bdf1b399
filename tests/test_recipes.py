"""Every file in recipes/ validates; zoo recipes decode to valid mergekit recipes on the real zoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mergekit.config import MergeConfiguration

from mergekit_evolve.config import EvolveConfig, split_template

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path):
    data = split_template(yaml.safe_load(path.read_text()))
    config = EvolveConfig.model_validate(data)  # schema only: real-model recipes need no download
    assert config.fitness is not None


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name.startswith("zoo-")], ids=lambda p: p.name)
def test_zoo_recipe_decodes_to_a_mergekit_recipe(path, zoo):
    from mergekit_evolve.config import load_config
    from mergekit_evolve.search.problems import make_problem

    config = load_config(path)
    problem = make_problem(config)
    candidate = problem.decode(problem.x0())
    if config.space == "dfs":
        assert candidate.path.hops  # model A's own path
    else:
        from mergekit_evolve.export.artifacts import recipe_of

        MergeConfiguration.model_validate(recipe_of(problem, candidate))
