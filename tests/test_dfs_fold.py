"""Folding DFS scales into a standard checkpoint: in-memory fold, the passthrough recipe, the real mergekit CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from mergekit.config import ConditionalParameter, MergeConfiguration, evaluate_setting
from safetensors.torch import load_file

from mergekit_evolve.errors import InputError
from mergekit_evolve.merge.layer_pool import LayerPool
from mergekit_evolve.recipe.fold import check_foldable, fold_model, fold_recipe, fold_state_dict
from mergekit_evolve.space.dfs import DFSPath
from mergekit_evolve.zoo.random_models import make_random_model, random_config
from mergekit_evolve.zoo.tokenizer import save_tokenizer

PROMPT = torch.tensor([[1, 5, 9, 12, 7, 30, 22, 17]])
# Starts and ends on model B, repeats A1 and B2, scales != 1; B0-B1 (unit scale) and A1-A2 (unit scale) fold
# into one slice each.
PATH = DFSPath(
    hops=[(1, 0), (1, 1), (0, 1), (0, 1), (0, 2), (1, 2), (1, 2)],
    scales=[1.0, 1.0, 0.7, 1.3, 1.0, 0.9, 2.5],
)


def make_biased_llama(out: Path, seed: int, eps: float) -> Path:
    """A Llama with o_proj and down_proj biases (attention_bias, mlp_bias), biases and norms perturbed."""
    config = random_config("llama", num_layers=3, rms_norm_eps=eps)
    config.attention_bias = True
    config.mlp_bias = True
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def scale_embeddings(path: Path, factor: float) -> Path:
    """Give hidden states a realistic size (RMS ~ 1, like trained LLMs; random init gives ~0.02)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(factor)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("dfs_fold")
    out: dict[str, list[Path]] = {}
    for arch in ("llama", "mistral", "qwen2"):
        out[f"{arch}-eps0"] = [
            make_random_model(root / f"{arch}-eps0-{s}", arch=arch, seed=s, num_layers=3, rms_norm_eps=0.0)
            for s in (0, 1)
        ]
        out[f"{arch}-eps"] = [
            scale_embeddings(make_random_model(root / f"{arch}-eps-{s}", arch=arch, seed=s, num_layers=3), 50.0)
            for s in (0, 1)
        ]
    out["llama_bias-eps0"] = [make_biased_llama(root / f"bias{s}", s, 0.0) for s in (0, 1)]
    return out


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "llama_bias", "mistral", "qwen2"])
def test_fold_is_exact_with_zero_eps(arch, models):
    pool = LayerPool.from_pretrained(models[f"{arch}-eps0"])
    stack = logits_of(pool.model(PATH))
    folded = logits_of(fold_model(pool, PATH))
    assert (stack - folded).abs().max() <= 1e-6
    # the fold matters: the same layers stacked without scales or fold factors are far off
    plain = logits_of(fold_model(pool, DFSPath(hops=PATH.hops, scales=[1.0] * len(PATH))))
    assert (stack - plain).abs().max() > 1e-2 * stack.abs().max()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_fold_is_close_with_usual_eps(arch, models):
    pool = LayerPool.from_pretrained(models[f"{arch}-eps"])
    assert pool.base_model_config().rms_norm_eps == 1e-6
    stack = logits_of(pool.model(PATH))
    folded = logits_of(fold_model(pool, PATH))
    assert (stack - folded).abs().max() <= 1e-4 * stack.abs().max()


def test_recipe_shape(models):
    a, b = (str(p) for p in models["llama-eps0"])
    recipe = fold_recipe([a, b], PATH)
    MergeConfiguration.model_validate(recipe)
    assert recipe["merge_method"] == "passthrough" and recipe["base_model"] == a
    ranges = [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in recipe["slices"]]
    assert ranges == [(a, [0, 0]), (b, [0, 2]), (a, [1, 2]), (a, [1, 3]), (b, [2, 3]), (b, [2, 3]), (a, [0, 0])]
    third = recipe["slices"][2]["sources"][0]["parameters"]["scale"]
    assert third == [{"filter": "o_proj", "value": 1 / 0.7}, {"filter": "down_proj", "value": 1 / 0.7}, {"value": 1.0}]
    assert "parameters" not in recipe["slices"][1]["sources"][0]  # C = 1 for B0, B1
    own = fold_recipe([a, b], DFSPath(hops=[(0, 0), (0, 1), (0, 2)], scales=[1.0, 1.0, 1.0]))
    assert [s["sources"][0]["layer_range"] for s in own["slices"]] == [[0, 3]]  # model A itself: one slice


def test_recipe_filters_scale_branch_outputs_and_their_biases(models):
    # mergekit's own filter evaluation on the recipe's scale setting (substring match, first match wins)
    a, b = (str(p) for p in models["llama-eps0"])
    setting = fold_recipe([a, b], PATH)["slices"][2]["sources"][0]["parameters"]["scale"]
    conditions = [ConditionalParameter(**c) for c in setting]
    factor = 1 / 0.7
    for name, expected in (
        ("model.layers.2.self_attn.o_proj.weight", factor),
        ("model.layers.2.self_attn.o_proj.bias", factor),
        ("model.layers.2.mlp.down_proj.bias", factor),
        ("model.layers.2.self_attn.q_proj.bias", 1.0),
        ("model.layers.2.mlp.up_proj.weight", 1.0),
        ("model.norm.weight", 1.0),
        ("model.embed_tokens.weight", 1.0),
    ):
        assert evaluate_setting(name, conditions, validate=float) == expected, name


def test_recipe_refuses_tensors_mergekit_would_drop(models):
    # mergekit 0.1.5's llama definition has no biases: a recipe would silently lose o_proj/down_proj biases
    with pytest.raises(InputError, match=r"sources\[0\].*bias.*--format custom"):
        fold_recipe(models["llama_bias-eps0"], PATH)


@pytest.fixture(scope="module", autouse=True)
def mergekit_cli(models, tmp_path_factory):
    """``mergekit-yaml fold.yaml OUT`` started at once: it runs (mostly interpreter start-up) in the background
    while the in-process tests of this module run; the CLI test waits for it."""
    work = tmp_path_factory.mktemp("mergekit_cli")
    recipe_file = work / "fold.yaml"
    recipe_file.write_text(yaml.safe_dump(fold_recipe(models["llama-eps0"], PATH)))
    beside_python = Path(sys.executable).parent / "mergekit-yaml"  # skips the pyenv shim's start-up
    command = [str(beside_python) if beside_python.exists() else shutil.which("mergekit-yaml")]
    with open(work / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([*command, str(recipe_file), str(work / "out")], stdout=stderr, stderr=stderr)
    yield process, work
    if process.poll() is None:
        process.kill()
        process.wait()


def test_mergekit_yaml_cli_equals_in_memory_fold(models, mergekit_cli):
    process, work = mergekit_cli
    assert process.wait(timeout=300) == 0, (work / "stderr.txt").read_text()[-2000:]
    out = work / "out"
    a, b = models["llama-eps0"]
    pool = LayerPool.from_pretrained([a, b])
    merged: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    ours = fold_state_dict(pool, PATH)
    assert sorted(merged) == sorted(ours)
    for name, tensor in ours.items():
        assert torch.equal(merged[name], tensor), name
    # embeddings, final norm and head are model A's, untouched (path starts and ends on model B)
    source_a = load_file(Path(a) / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], source_a[name]), name
    standard = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert standard.config.num_hidden_layers == len(PATH)
    assert (logits_of(standard) - logits_of(pool.model(PATH))).abs().max() <= 1e-6


def test_fold_refusals(models):
    a, b = models["llama-eps0"]
    with pytest.raises(InputError, match="no layer"):
        fold_recipe([a, b], DFSPath(hops=[], scales=[]))
    with pytest.raises(InputError, match="not > 0"):
        fold_recipe([a, b], DFSPath(hops=[(0, 0), (1, 1)], scales=[1.0, -0.5]))
    with pytest.raises(InputError, match=r"sources\[1\].*model_type.*--format custom"):
        fold_recipe([a, models["qwen2-eps0"][1]], PATH)
    for model_type, why in (("bert", "post-norm"), ("gemma2", "end in a norm"), ("gpt_neox", "no verified")):
        with pytest.raises(InputError, match=f"{why}.*--format custom"):
            check_foldable({"model_type": model_type})
    check_foldable(random_config("qwen2"))
