"""genome.tune_embeddings: the embeddings, final norm and lm_head get genes of their own (as the paper)."""

from __future__ import annotations

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from mergekit_evolve.config import parse_config
from mergekit_evolve.recipe.ps import recipe_yaml
from mergekit_evolve.search.problems import PSProblem


def test_embedding_genes_set_the_embeddings_norm_and_head_apart_from_the_layers(family, tmp_path):
    config = parse_config(
        {
            "genome": {
                "models": [str(family["expert0"]), str(family["expert1"])],
                "merge_method": "linear",
                "layer_granularity": 2,
                "tune_embeddings": True,
            },
            "fitness": {"tasks": [{"name": "t", "data": str(tmp_path / "unused.jsonl")}]},
            "dtype": "float32",
        }
    )
    problem = PSProblem(config)
    genes = problem.space.genes
    assert problem.dim == 6 and [(g.group, g.model) for g in genes[4:]] == [(2, 0), (2, 1)]  # 2 groups x 2 models + io
    genome = np.full(problem.dim, 0.5)
    genome[4:] = [1.0, 0.0]  # embeddings / norm / head: expert0 only; layers: the mean of both
    candidate = problem.decode(genome)
    merged = problem.build(candidate).state_dict()
    e0, e1 = (load_file(family[f"expert{i}"] / "model.safetensors") for i in (0, 1))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], e0[name]), name
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        assert torch.allclose(merged[name], (e0[name] + e1[name]) / 2, atol=1e-6), name
    # Plain mergekit YAML: filter entries on the first slice (embeddings) and the last (norm, lm_head).
    slices = yaml.safe_load(recipe_yaml(candidate.recipe))["slices"]
    assert [e.get("filter") for e in slices[0]["sources"][0]["parameters"]["weight"]] == [
        "model.embed_tokens.weight",
        None,
    ]
    assert [e.get("filter") for e in slices[1]["sources"][1]["parameters"]["weight"]] == [
        "model.norm.weight",
        "lm_head.weight",
        None,
    ]
