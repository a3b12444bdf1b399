"""Conformance: the in-memory merger against mergekit's own ``run_merge``, on models built the way
mergekit's tests build them (random tiny Llama checkpoints saved without tokenizer files).

Every merge method mergekit registers gets a recipe derived from its typed spec (inputs, base model,
required parameters), merged with ``dtype: bfloat16`` from float32 sources, so the test also checks
that the merger's model takes the dtype mergekit writes (float32 for arcee_fusion and ramplus_tl).
Further cases: gradients, filters, slices, out_dtype and the tokenizer options. ``run_merge`` runs in
this process with the options ``mergekit-yaml --random-seed`` applies (``apply_global_options``), so
random methods draw the same numbers. Each case's tensors must be equal bitwise, dtypes included.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import registered_methods
from mergekit.merge_methods.base import BasePolicy, ParameterScope
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_evolve.merge import InMemoryMerger
from mergekit_evolve.merge.inmemory import _tied_aliases
from mergekit_evolve.zoo.random_models import make_random_model
from mergekit_evolve.zoo.tokenizer import build_tokenizer

SEED = 7
NUM_LAYERS = 2
METHODS = sorted(m.spec.name for m in registered_methods())
# Values for a method's required parameters (and a few optional ones, so they are exercised).
PER_MODEL_VALUES = {"weight": [0.6, 0.3], "density": [0.7, 0.5], "gamma": [0.05, 0.1], "epsilon": [0.1, 0.05]}
SHARED_VALUES = {"t": 0.3, "select_topk": 0.5}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A base and three other random models without tokenizer files; two with tokenizers (one with
    an added token, so a union vocabulary differs from the base's)."""
    root = tmp_path_factory.mktemp("conformance")
    found = {
        name: make_random_model(
            root / name, seed=i, tokenizer=False, num_layers=NUM_LAYERS, hidden_size=16, num_heads=2
        )
        for i, name in enumerate(("base", "a", "b", "c"))
    }
    shutil.copytree(found["base"], root / "tok_base")
    found["tok_base"] = root / "tok_base"
    build_tokenizer().save_pretrained(str(root / "tok_base"))
    found["tok_a"] = make_random_model(
        root / "tok_a",
        seed=5,
        tokenizer=False,
        num_layers=NUM_LAYERS,
        hidden_size=16,
        num_heads=2,
        vocab_size=len(build_tokenizer()) + 1,
    )
    extended = build_tokenizer()
    extended.add_tokens(["<extra>"])
    extended.save_pretrained(str(root / "tok_a"))
    return {name: str(path) for name, path in found.items()}


def method_recipe(name: str, m: dict[str, str]) -> dict:
    """A valid recipe for any registered method, derived from its spec (not from a hand-kept table)."""
    from mergekit.merge_methods import get

    spec = get(name).spec
    contract = spec.contract
    use_base = contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)
    n_others = max(2, contract.min_non_base or 0, contract.min_inputs - int(use_base))  # two where allowed
    if contract.max_inputs:
        n_others = min(n_others, contract.max_inputs - int(use_base))
    if contract.max_non_base:
        n_others = min(n_others, contract.max_non_base)
    others = [m[k] for k in ("a", "b", "c")][:n_others]
    recipe: dict = {"merge_method": name, "dtype": "bfloat16"}
    per_model = [p for p in spec.parameters if p.scope != ParameterScope.SHARED and p.name in PER_MODEL_VALUES]
    shared = {
        p.name: SHARED_VALUES[p.name]
        for p in spec.parameters
        if p.scope == ParameterScope.SHARED and p.name in SHARED_VALUES
    }
    entries = [
        {"model": path, "parameters": {p.name: PER_MODEL_VALUES[p.name][i] for p in per_model}}
        for i, path in enumerate(others)
    ]
    if use_base:
        recipe["base_model"] = m["base"]
        entries.insert(0, {"model": m["base"]})
    if name == "passthrough":
        entries[0]["parameters"] = {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}
    recipe["models"] = [e if e.get("parameters") else {"model": e["model"]} for e in entries]
    if shared:
        recipe["parameters"] = shared
    return recipe


def variant_recipes(m: dict[str, str]) -> dict[str, dict]:
    base, a, b = m["base"], m["a"], m["b"]
    by_filter = [{"filter": "self_attn", "value": 0.9}, {"filter": "mlp", "value": 0.2}, {"value": 0.5}]
    ties = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": base},
            {"model": a, "parameters": {"weight": 0.7, "density": by_filter}},
            {"model": b, "parameters": {"weight": [0.2, 0.9, 0.4], "density": 0.6}},
        ],
        "parameters": {"normalize": False, "int8_mask": True},
    }
    return {
        "linear gradient + filters": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": a, "parameters": {"weight": [0.1, 0.9]}},
                {"model": b, "parameters": {"weight": by_filter}},
            ],
        },
        "ties filters + gradient, int8_mask": ties,
        "dare_ties rescale off, lambda": {
            **ties,
            "merge_method": "dare_ties",
            "parameters": {"rescale": False, "lambda": 0.8},
        },
        "slerp t gradient + filter": {
            "merge_method": "slerp",
            "base_model": base,
            "dtype": "float32",
            "models": [{"model": base}, {"model": a}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.7]}, {"value": 0.4}]},
        },
        "slices (per-layer-range sources)": {
            "merge_method": "linear",
            "dtype": "float32",
            "slices": [
                {
                    "sources": [
                        {"model": a, "layer_range": [0, 1], "parameters": {"weight": 0.3}},
                        {"model": b, "layer_range": [0, 1], "parameters": {"weight": 0.7}},
                    ]
                },
                {
                    "sources": [
                        {"model": a, "layer_range": [1, 2], "parameters": {"weight": 0.8}},
                        {"model": b, "layer_range": [1, 2], "parameters": {"weight": 0.2}},
                    ]
                },
            ],
        },
        "passthrough layer stack with scale filters": {
            "merge_method": "passthrough",
            "base_model": a,
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 2]}]},
                {
                    "sources": [
                        {
                            "model": b,
                            "layer_range": [1, 2],
                            "parameters": {"scale": [{"filter": "down_proj", "value": 0.8}, {"value": 1.0}]},
                        }
                    ]
                },
            ],
        },
        "out_dtype float16": {
            "merge_method": "linear",
            "dtype": "float32",
            "out_dtype": "float16",
            "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
        },
        "tokenizer_source base": {
            "merge_method": "linear",
            "dtype": "float32",
            "tokenizer_source": "base",
            "base_model": m["tok_base"],
            "models": [
                {"model": m["tok_base"], "parameters": {"weight": 0.5}},
                {"model": m["tok_a"], "parameters": {"weight": 0.5}},
            ],
        },
        "tokenizer_source union": {
            "merge_method": "linear",
            "dtype": "float32",
            "tokenizer_source": "union",
            "base_model": m["tok_base"],
            "models": [
                {"model": m["tok_base"], "parameters": {"weight": 0.5}},
                {"model": m["tok_a"], "parameters": {"weight": 0.5}},
            ],
        },
        "tokenizer_source a model": {
            "merge_method": "linear",
            "dtype": "float32",
            "tokenizer_source": m["tok_a"],
            "models": [
                {"model": m["tok_base"], "parameters": {"weight": 0.5}},
                {"model": m["tok_a"], "parameters": {"weight": 0.5}},
            ],
        },
        "tokenizer: union, pad_to_multiple_of 8": {
            "merge_method": "task_arithmetic",
            "dtype": "float32",
            "base_model": m["tok_base"],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
            "models": [{"model": m["tok_base"]}, {"model": m["tok_a"], "parameters": {"weight": 0.8}}],
        },
    }


def mergekit_tensors(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    """What ``mergekit-yaml RECIPE OUT --random-seed SEED`` writes, run in this process."""
    options = MergeOptions(random_seed=SEED, quiet=True, write_model_card=False, copy_tokenizer=False)
    options.apply_global_options()
    run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(out), options)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_conforms(recipe: dict, out: Path) -> None:
    expected = mergekit_tensors(recipe, out)
    config = MergeConfiguration.model_validate(recipe)
    merger = InMemoryMerger(config, random_seed=SEED)  # no dtype given: the one mergekit writes
    state = merger.merge(config).state_dict()
    assert set(state) - _tied_aliases(merger.model) == set(expected)
    wrong = [
        (name, str(state[name].dtype), str(t.dtype))
        for name, t in expected.items()
        if state[name].dtype != t.dtype or not torch.equal(state[name], t)
    ]
    assert not wrong, f"{len(wrong)} tensors differ from run_merge's, first: {wrong[:3]}"


def test_every_registered_method_is_covered():
    assert len(METHODS) >= 20 and {"arcee_fusion", "ramplus_tl", "model_stock", "passthrough"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_in_bfloat16_conforms_to_run_merge(method, models, tmp_path):
    assert_conforms(method_recipe(method, models), tmp_path / "out")


@pytest.mark.parametrize("case", list(variant_recipes({k: k for k in ("base", "a", "b", "tok_base", "tok_a")})))
def test_variant_conforms_to_run_merge(case, models, tmp_path):
    assert_conforms(variant_recipes(models)[case], tmp_path / "out")
