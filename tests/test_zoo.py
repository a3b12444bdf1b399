"""The embedded zoo: real checkpoints, disjoint deterministic data, and different skills."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from mergekit_evolve.fitness import Fitness, FitnessConfig
from mergekit_evolve.zoo import Zoo
from mergekit_evolve.zoo.data import Skills
from mergekit_evolve.zoo.train import new_model, train


@pytest.fixture(scope="module")
def heldout_scores(zoo) -> dict[str, dict[str, float]]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo.models["base"])
    tasks = [
        {"name": t.name, "data": str(t.fitness), "heldout": str(t.heldout), "max_new_tokens": t.max_new_tokens}
        for t in zoo.tasks.values()
    ]
    fitness = Fitness(FitnessConfig(tasks=tasks, batch_size=64), tokenizer)
    return {
        name: fitness.score(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), "heldout")
        for name, path in zoo.models.items()
    }


def test_manifest_and_checkpoints(zoo):
    assert Zoo.load(zoo.root) == zoo
    assert set(zoo.models) == {"base", "script", "math"} and zoo.target == "script_math"
    for path in zoo.models.values():
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        config = transformers.AutoConfig.from_pretrained(path)
        assert config.model_type == "llama" and config.num_hidden_layers == 4


def test_splits_are_disjoint_and_deterministic(zoo):
    for task in zoo.tasks.values():
        fit = [json.loads(line)["prompt"] for line in task.fitness.read_text().splitlines()]
        held = [json.loads(line)["prompt"] for line in task.heldout.read_text().splitlines()]
        assert not set(fit) & set(held), f"{task.name}: fitness and held-out share prompts"
        assert len(set(held)) == len(held)
        assert Skills(zoo.seed).task_rows(task.name, "heldout") == [
            json.loads(x) for x in task.heldout.read_text().splitlines()
        ]


def test_training_is_bitwise_deterministic():
    skills = Skills(0)
    a = train(new_model(0, hidden=32), skills.base_row, steps=3, lr=1e-3, seed=0, batch_size=8)
    b = train(new_model(0, hidden=32), skills.base_row, steps=3, lr=1e-3, seed=0, batch_size=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    rng1, rng2 = random.Random(5), random.Random(5)
    assert [skills.script_row(rng1) for _ in range(5)] == [skills.script_row(rng2) for _ in range(5)]


def test_each_expert_has_its_own_skill(heldout_scores):
    s = heldout_scores
    assert s["script"]["script"] >= s["base"]["script"] + 0.3
    assert s["script"]["script"] >= s["math"]["script"] + 0.3
    assert s["math"]["math"] >= s["base"]["math"] + 0.3
    assert s["math"]["math"] >= s["script"]["math"] + 0.3


def test_no_source_solves_the_target(heldout_scores):
    assert max(scores["script_math"] for scores in heldout_scores.values()) <= 0.5


def test_seed0_is_the_shipped_zoo_and_matches_its_manifest(zoo):
    from mergekit_evolve.zoo import build

    assert zoo.root == build.SHIPPED_DIR.absolute()
    assert build.file_digests(zoo.root) == build.shipped_digests()  # every shipped byte as in SHA256SUMS
    assert len(build.shipped_digests()) == 3 * 5 + 3 * 2  # 5 files per model, 2 splits per task


def test_a_rebuild_is_compared_file_by_file(zoo, tmp_path):
    """`zoo build` reports exactly which files differ from the shipped ones (here: one changed weight)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mergekit_evolve.zoo import build

    copy = tmp_path / "zoo"
    shutil.copytree(zoo.root, copy)
    assert build.compare_with_shipped(Zoo.load(copy)) == []
    weights_file = copy / "models" / "math" / "model.safetensors"
    weights = load_file(weights_file)
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-6
    save_file(weights, weights_file, metadata={"format": "pt"})
    assert build.compare_with_shipped(Zoo.load(copy)) == ["models/math/model.safetensors"]


def test_zoo_build_restores_torch_determinism_setting():
    from mergekit_evolve.zoo.build import _deterministic_torch

    before = torch.are_deterministic_algorithms_enabled()
    with _deterministic_torch():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
