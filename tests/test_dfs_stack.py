"""Layer pool and layer-stack model on real transformers models: numbers, per-hop KV cache, memory sharing."""

from __future__ import annotations

import pytest
import torch
import transformers

from mergekit_evolve.errors import InputError
from mergekit_evolve.merge.layer_pool import LayerPool
from mergekit_evolve.space.dfs import DFSPath, DFSSpace
from mergekit_evolve.zoo.random_models import make_random_model

ARCHS = ["llama", "mistral", "qwen2"]
PROMPT = torch.tensor([[1, 5, 9, 12, 7, 30, 22]])
# repeated layers (A1 twice, B2 twice), both models, non-unit scales
PATH = DFSPath(hops=[(1, 0), (0, 1), (0, 1), (1, 2), (1, 2), (0, 0)], scales=[1.0, 0.7, 1.3, 0.9, 1.6, 1.1])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list]:
    root = tmp_path_factory.mktemp("dfs_stack")
    return {
        arch: [make_random_model(root / f"{arch}{s}", arch=arch, seed=s, num_layers=3) for s in (0, 1)]
        for arch in ARCHS
    }


@pytest.fixture(scope="module")
def pools(sources) -> dict[str, LayerPool]:
    return {arch: LayerPool.from_pretrained(paths) for arch, paths in sources.items()}


def reference_logits(paths, path: DFSPath, ids: torch.Tensor) -> torch.Tensor:
    """The path computed by hand with freshly loaded transformers models (model A's embeddings and head)."""
    models = [transformers.AutoModelForCausalLM.from_pretrained(p).eval() for p in paths]
    a = models[0].model
    with torch.no_grad():
        hidden = a.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rotary = a.rotary_emb(hidden, positions)
        for (m, layer), scale in zip(path.hops, path.scales):
            hidden = models[m].model.layers[layer](
                hidden * scale, attention_mask=None, position_ids=positions, position_embeddings=rotary
            )
        return models[0].lm_head(a.norm(hidden))


def greedy_recompute(model, ids: torch.Tensor, steps: int, banned: list[int]) -> torch.Tensor:
    """Greedy decoding without any cache: the full sequence is recomputed for every token."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(seq, use_cache=False).logits[:, -1]
            logits[:, banned] = -float("inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_equals_hand_computed_path(arch, sources, pools):
    model = pools[arch].model(PATH)
    with torch.no_grad():
        logits = model(PROMPT, use_cache=False).logits
    expected = reference_logits(sources[arch], PATH, PROMPT)
    assert torch.allclose(logits, expected, atol=1e-6, rtol=0), (logits - expected).abs().max()
    # and the scales matter: the same hops with unit scales give other logits
    unit = pools[arch].model(DFSPath(hops=PATH.hops, scales=[1.0] * len(PATH)))
    with torch.no_grad():
        assert (unit(PROMPT).logits - expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_per_hop_cache_equals_recompute(arch, pools):
    model = pools[arch].model(PATH)
    banned = [0, 1, 2, 3]  # special tokens: keeps random models from stopping early at </s>
    with torch.no_grad():
        generated = model.generate(PROMPT, max_new_tokens=8, do_sample=False, suppress_tokens=banned)
    assert generated.shape[1] == PROMPT.shape[1] + 8
    assert torch.equal(generated, greedy_recompute(model, PROMPT, 8, banned))
    # step by step with an explicit cache: one slot per hop, logits equal to the recompute
    cache = transformers.DynamicCache(config=model.config)
    prefix = generated.shape[1] - 4
    with torch.no_grad():
        out = model(generated[:, :prefix], cache=cache, use_cache=True)
        for i in range(prefix, generated.shape[1]):
            out = model(generated[:, i : i + 1], cache=cache, use_cache=True)
        full = model(generated, use_cache=False).logits[:, -1]
    assert len(cache.layers) == len(PATH)
    assert torch.allclose(out.logits[:, -1], full, atol=1e-5, rtol=0)


def test_batched_left_padded_generation_matches_single(pools):
    pool = pools["llama"]
    model = pool.model(PATH)
    prompts = ["12+3=", "7="]
    kwargs = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[0, 1, 2, 3])
    with torch.no_grad():
        batch = model.generate(**pool.tokenizer(prompts, return_tensors="pt", padding=True), **kwargs)
        singles = [model.generate(**pool.tokenizer([p], return_tensors="pt"), **kwargs) for p in prompts]
    for row, single in zip(batch, singles):
        assert torch.equal(row[-5:], single[0, -5:])


def test_empty_path_is_embedding_norm_head(pools):
    pool = pools["llama"]
    model = pool.model(DFSPath(hops=[], scales=[]))
    with torch.no_grad():
        logits = model(PROMPT).logits
        expected = pool.lm_head(pool.norm(pool.embed_tokens(PROMPT)))
        assert torch.equal(logits, expected)
        assert model.generate(PROMPT, max_new_tokens=3, do_sample=False).shape[1] >= PROMPT.shape[1] + 1


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_stack_shares_pool_memory_for_3m_hops(pools):
    pool = pools["qwen2"]
    space = DFSSpace(pool.layer_counts, repeats=3)
    every_slot = space.x0()
    every_slot[: space.num_slots] = 1.0
    long_path = space.decode(every_slot)
    assert len(long_path) == 3 * sum(pool.layer_counts)
    pool_storages = _storages(pool.parameters())
    model = pool.model(long_path)
    stack_storages = _storages(list(model.parameters()) + list(model.buffers()))
    assert set(stack_storages) <= set(pool_storages)
    assert sum(stack_storages.values()) <= 1.1 * sum(pool_storages.values())
    # re-pointing keeps the very same object and tensors
    again = pool.model(PATH)
    assert again is model and _storages(again.parameters()) == _storages(model.parameters())
    assert again.config.num_hidden_layers == len(PATH)


def test_mixed_families_in_one_pool(sources):
    paths = [sources["llama"][0], sources["qwen2"][1]]
    pool = LayerPool.from_pretrained(paths)
    with torch.no_grad():
        logits = pool.model(PATH)(PROMPT).logits
    assert torch.allclose(logits, reference_logits(paths, PATH, PROMPT), atol=1e-6, rtol=0)


def test_pool_rejects_bad_sources(tmp_path, sources):
    wide = make_random_model(tmp_path / "wide", arch="llama", num_layers=2, hidden_size=64)
    with pytest.raises(InputError, match=r"sources\[1\].*hidden_size 64.*32"):
        LayerPool.from_pretrained([sources["llama"][0], wide])
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4)).save_pretrained(gpt2)
    with pytest.raises(InputError, match=r"sources\[1\].*'gpt2'.*llama"):
        LayerPool.from_pretrained([sources["llama"][0], gpt2])
    with pytest.raises(InputError, match="config.json"):
        LayerPool.from_pretrained([sources["llama"][0], tmp_path / "missing"])
    pool = LayerPool.from_pretrained(sources["llama"])
    with pytest.raises(InputError, match="not a layer"):
        pool.model(DFSPath(hops=[(1, 7)], scales=[1.0]))
