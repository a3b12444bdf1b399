"""Custom-code checkpoints (reload with trust_remote_code in a fresh process), EvoMistral layout, folded export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file

from mergekit_evolve.errors import InputError
from mergekit_evolve.export.custom_code import load_evomistral, save_custom_checkpoint, save_folded_checkpoint
from mergekit_evolve.merge.layer_pool import LayerPool
from mergekit_evolve.recipe.fold import fold_model
from mergekit_evolve.space.dfs import DFSPath
from mergekit_evolve.zoo.random_models import make_random_model

PROMPT = [[1, 5, 9, 12, 7, 30]]
BANNED = [0, 1, 2, 3]  # special tokens: random models would otherwise stop at </s> at once
MIXED = DFSPath(hops=[(1, 2), (0, 1), (1, 0), (1, 0), (1, 2)], scales=[1.0, 0.8, 1.25, 0.9, 1.5])
B_ONLY = DFSPath(hops=[(1, 2), (1, 0), (1, 0)], scales=[1.0, 0.7, 1.3])  # model A donates only embeddings/head


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> LayerPool:
    root = tmp_path_factory.mktemp("dfs_export")
    paths = [make_random_model(root / f"q{s}", arch="qwen2", seed=s, num_layers=4) for s in (0, 1)]
    return LayerPool.from_pretrained(paths)


def generate(model, prompt=PROMPT) -> tuple[list[list[int]], torch.Tensor]:
    ids = torch.tensor(prompt)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, suppress_tokens=BANNED)
        logits = model(ids, use_cache=False).logits
    return tokens.tolist(), logits


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, torch, transformers
    results = {}
    for directory in sys.argv[1:]:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
        ids = torch.tensor(%s)
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False, suppress_tokens=%s)
            logits = model(ids, use_cache=False).logits
        results[directory] = {"module": type(model).__module__, "tokens": tokens.tolist(),
                              "logits": logits.flatten().tolist()}
    print(json.dumps(results))
    """
) % (PROMPT, BANNED)


@pytest.fixture(scope="module", autouse=True)
def fresh_process(pool, tmp_path_factory):
    """Saves two custom checkpoints and starts a fresh interpreter that loads them with trust_remote_code; it
    runs in the background while the other tests of this module run."""
    work = tmp_path_factory.mktemp("custom_ckpt")
    expected = {}
    for name, path in (("mixed", MIXED), ("b_only", B_ONLY)):
        out = save_custom_checkpoint(pool, path, work / name)
        expected[str(out)] = (path, *generate(pool.model(path)))
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules")}
    with open(work / "stdout.txt", "w") as stdout, open(work / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", FRESH_PROCESS, *expected], stdout=stdout, stderr=stderr, cwd=work, env=env
        )
    yield process, work, expected
    if process.poll() is None:
        process.kill()
        process.wait()


def test_custom_checkpoint_reloads_in_fresh_process(fresh_process):
    process, work, expected = fresh_process
    for directory, (path, _, _) in expected.items():
        config = json.loads((work / directory / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_layerstack.LayerStackForCausalLM"
        files = set(os.listdir(directory))
        assert {"configuration_layerstack.py", "modeling_layerstack.py", "tokenizer.json"} <= files
        stored_layers = {k.split(".")[2] for k in load_file(work / directory / "model.safetensors") if ".layers." in k}
        assert len(stored_layers) == len(set(path.hops))  # only the layers the path uses
    config = json.loads((work / "b_only" / "config.json").read_text())
    assert config["source_layer_ids"] == [[], [0, 2]] and config["path"] == [[1, 1], [1, 0], [1, 0]]
    assert process.wait(timeout=300) == 0, (work / "stderr.txt").read_text()[-3000:]
    results = json.loads((work / "stdout.txt").read_text().strip().splitlines()[-1])
    for directory, (_, tokens, logits) in expected.items():
        assert results[directory]["module"].startswith("transformers_modules.")  # the copied code, not ours
        assert results[directory]["tokens"] == tokens
        assert torch.equal(torch.tensor(results[directory]["logits"]), logits.flatten())


def test_custom_checkpoint_refuses_non_empty_dir(pool, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        save_custom_checkpoint(pool, MIXED, tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging folder left behind


def test_folded_checkpoint_reloads_as_standard_model(pool, tmp_path):
    out = save_folded_checkpoint(pool, MIXED, tmp_path / "std")
    standard = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(standard).__name__ == "Qwen2ForCausalLM" and standard.config.num_hidden_layers == len(MIXED)
    assert len(standard.config.layer_types) == len(MIXED)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = standard(ids).logits
        assert torch.equal(logits, fold_model(pool, MIXED)(ids).logits)
        assert (logits - pool.model(MIXED)(ids).logits).abs().max() <= 1e-4 * logits.abs().max() + 1e-4


def test_evomistral_layout_loads(tmp_path):
    checkpoint = make_random_model(tmp_path / "evo", arch="mistral", seed=3, num_layers=3)
    values = json.loads((checkpoint / "config.json").read_text())
    layers, scales = [0, 1, 1, 2, 0], [1.0, 0.8, 1.2, 1.0, 0.5]
    values.update(
        model_type="evomistral",
        architectures=["EvoMistralForCausalLM"],
        num_hops=len(layers),
        input_layers=layers,
        input_scales=scales,
        auto_map={"AutoModelForCausalLM": "modeling_evomistral.EvoMistralForCausalLM"},
    )
    (checkpoint / "config.json").write_text(json.dumps(values))
    evo = load_evomistral(checkpoint)
    assert evo.config.path == [[0, i] for i in layers] and evo.config.scales == scales
    # the same path over the plain Mistral weights, by hand
    plain = {k: v for k, v in values.items() if k not in ("num_hops", "input_layers", "input_scales", "auto_map")}
    plain.update(model_type="mistral", architectures=["MistralForCausalLM"])
    mistral = transformers.MistralForCausalLM.from_pretrained(checkpoint, config=transformers.MistralConfig(**plain))
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        hidden = mistral.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rotary = mistral.model.rotary_emb(hidden, positions)
        for layer, scale in zip(layers, scales):
            hidden = mistral.model.layers[layer](
                hidden * scale, attention_mask=None, position_ids=positions, position_embeddings=rotary
            )
        expected = mistral.lm_head(mistral.model.norm(hidden))
        assert torch.allclose(evo(ids).logits, expected, atol=1e-6, rtol=0)
    assert len(generate(evo)[0][0]) == len(PROMPT[0]) + 8
    with pytest.raises(InputError, match="input_layers"):
        load_evomistral(make_random_model(tmp_path / "plain", arch="mistral", num_layers=1))
