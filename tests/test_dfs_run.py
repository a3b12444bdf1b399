"""DFS and PS+DFS runs end to end: run directory, folded best.yaml, both export forms, resume."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from mergekit_evolve import runner
from mergekit_evolve.config import parse_config
from mergekit_evolve.export.final import export_run

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def rows(tmp: Path) -> Path:
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(10)))
    return path


def dfs_config(family, data: Path, space="dfs", function="fitness_fns:loglik", max_evals=12) -> dict:
    return {
        "space": space,
        "genome": {"models": [str(family["expert0"]), str(family["expert1"])], "merge_method": "linear"},
        "dfs": {"repeats": 2},
        "fitness": {
            "tasks": [{"name": "ll", "kind": "callable", "function": function, "data": str(data), "heldout": str(data)}]
        },
        "optimizer": {"max_evals": max_evals, "seed": 2},
        "dtype": "float32",
    }


def load_weights(folder: Path) -> dict:
    out = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def dfs_run(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("dfs")
    import sys

    sys.path.insert(0, str(TESTS))
    summary = runner.start(parse_config(dfs_config(family, rows(root))), root / "out", device="cpu", progress=False)
    return root / "out", summary


def test_dfs_run_writes_a_folded_recipe_and_a_standard_model(dfs_run, tmp_path):
    out, summary = dfs_run
    best = json.loads((out / "best.json").read_text())
    assert best["path"]["hops"] and len(best["path"]["scales"]) == len(best["path"]["hops"])
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe["merge_method"] == "passthrough" and recipe["base_model"] == best["path"]["models"][0]
    # mergekit-yaml on best.yaml gives exactly the model the run saved
    subprocess.run(["mergekit-yaml", str(out / "best.yaml"), str(tmp_path / "m")], check=True, capture_output=True)
    ours, theirs = load_weights(out / "model"), load_weights(tmp_path / "m")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = transformers.AutoConfig.from_pretrained(out / "model")
    assert config.model_type == "llama" and config.num_hidden_layers == len(best["path"]["hops"])


def test_standard_model_scores_what_the_search_scored(dfs_run):
    """The folded checkpoint, loaded by plain transformers, reproduces the best fitness."""
    import fitness_fns

    out, summary = dfs_run
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model", dtype="float32").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    data = [json.loads(line) for line in (out.parent / "rows.jsonl").read_text().splitlines()]
    assert fitness_fns.loglik(model, tokenizer, data, "fitness") == pytest.approx(summary.best.fitness, rel=1e-4)


def test_custom_export_reloads_with_remote_code_and_generates_the_same_tokens(dfs_run, tmp_path):
    out, _ = dfs_run
    custom = export_run(out, fmt="custom", out=tmp_path / "custom")
    standard = transformers.AutoModelForCausalLM.from_pretrained(out / "model", dtype="float32").eval()
    stack = transformers.AutoModelForCausalLM.from_pretrained(custom, trust_remote_code=True, dtype="float32").eval()
    prompt = torch.tensor([[1, 7, 40, 8, 43]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(stack.generate(prompt, **kwargs), standard.generate(prompt, **kwargs))


def test_ps_then_dfs_runs_both_stages_and_resumes_the_second(family, tmp_path, monkeypatch):
    import fitness_fns

    data = rows(tmp_path)
    reference = runner.start(
        parse_config(dfs_config(family, data, space="ps+dfs", max_evals=8)),
        tmp_path / "ref",
        device="cpu",
        progress=False,
    )
    fitness_fns.CALLS["n"] = 0
    monkeypatch.setenv("MKE_INTERRUPT_AT", "17")  # PS: 2 generations of 6 + held-out = 13 calls; stop inside DFS
    config = parse_config(dfs_config(family, data, space="ps+dfs", function="fitness_fns:interrupting", max_evals=8))
    with pytest.raises(KeyboardInterrupt):
        runner.start(config, tmp_path / "cut", device="cpu", progress=False)
    assert (tmp_path / "cut" / "ps" / "model").is_dir() and (tmp_path / "cut" / "dfs" / "evaluations.jsonl").exists()
    monkeypatch.delenv("MKE_INTERRUPT_AT")
    resumed = runner.resume(tmp_path / "cut", progress=False)
    assert resumed.stages["ps"].best.fitness == reference.stages["ps"].best.fitness
    assert resumed.best.fitness == reference.best.fitness
    # one summary for both stages
    assert reference.space == "ps+dfs" and reference.evaluations == 8 + 8
    assert reference.wall_seconds >= reference.stages["ps"].wall_seconds + reference.stages["dfs"].wall_seconds - 0.02
    best_path = json.loads((tmp_path / "ref" / "best.json").read_text())["path"]
    # this seeded run's DFS stage keeps the PS model (dfs.validation): best.yaml is the PS recipe itself
    assert best_path["hops"] == [[0, layer] for layer in range(4)] and set(best_path["scales"]) == {1.0}
    recipe = (tmp_path / "ref" / "best.yaml").read_text()
    assert "kept the PS model's own path" in recipe and "---" not in recipe
    assert yaml.safe_load(recipe) == yaml.safe_load((tmp_path / "ref" / "ps" / "best.yaml").read_text())
    dfs_path = json.loads((tmp_path / "cut" / "best.json").read_text())["path"]
    assert dfs_path["models"][0] == str(tmp_path / "cut" / "ps" / "model")  # the PS model is model A


def test_folded_zoo_model_matches_the_layer_stack(zoo):
    """On the trained zoo: the folded ordinary Llama gives the layer-stack's logits (float32)."""
    from mergekit_evolve.merge.layer_pool import LayerPool
    from mergekit_evolve.recipe.fold import fold_model
    from mergekit_evolve.space.dfs import DFSPath

    pool = LayerPool.from_pretrained([str(zoo.models["math"]), str(zoo.models["script"])], dtype="float32")
    path = DFSPath(
        hops=((1, 0), (0, 0), (0, 1), (1, 1), (1, 1), (0, 2), (0, 3)), scales=(1.0, 0.8, 1.3, 0.9, 1.1, 1.2, 0.7)
    )
    ids = torch.tensor([[1, 14, 17, 41, 22, 43], [1, 7, 40, 8, 43, 11]])
    with torch.inference_mode():
        stack = pool.model(path)(input_ids=ids).logits
        folded = fold_model(pool, path)(input_ids=ids).logits
    scale = stack.abs().max()
    assert (stack - folded).abs().max() / scale <= 1e-4


def test_ps_dfs_recipe_builds_from_the_sources_alone_after_the_run_directory_moves(family, tmp_path):
    """best.yaml of a ps+dfs run: the PS recipe and the DFS path over its result, as one mergekit-multi recipe
    that names the sources only; built by mergekit's own CLI after the run folder (a name mergekit would split:
    `+`, `@`, spaces, unicode) has moved, it equals the run's model tensor for tensor."""
    data = rows(tmp_path)
    config = dfs_config(family, data, space="ps+dfs", function="fitness_fns:deeper", max_evals=8)
    config["dfs"]["validation"] = 0  # the DFS stage's best path, a longer one, is the result
    out = tmp_path / "runs" / "ps+dfs @ü evolved"
    runner.start(parse_config(config), out, device="cpu", progress=False)
    recipe = (out / "best.yaml").read_text()
    assert recipe.count("\n---\n") == 1 and "mergekit-multi best.yaml" in recipe
    assert str(out) not in recipe  # nothing points into the run directory
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    built = tmp_path / "built"
    subprocess.run(
        [
            "mergekit-multi",
            str(moved / "best.yaml"),
            "--intermediate-dir",
            str(tmp_path / "stages"),
            "--out-path",
            str(built),
            "--random-seed",
            "0",
        ],
        check=True,
        capture_output=True,
    )
    ours, theirs = load_weights(built), load_weights(moved / "dfs" / "model")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def arch_pair(root: Path, arch: str, **config) -> list[str]:
    from mergekit_evolve.zoo.random_models import make_random_model

    return [str(make_random_model(root / f"{arch}{s}", arch=arch, seed=s, num_layers=3, **config)) for s in (0, 1)]


def deeper_dfs(models: list[str], data: Path) -> dict:
    """A DFS run whose fitness prefers longer paths: its best changes the depth."""
    task = {"name": "ll", "kind": "callable", "function": "fitness_fns:deeper", "data": str(data)}
    return {
        "space": "dfs",
        "genome": {"models": models, "merge_method": "linear"},
        "dfs": {"repeats": 2, "prescan": 2},
        "fitness": {"tasks": [task]},
        "optimizer": {"max_evals": 8, "seed": 2},
        "dtype": "float32",
    }


def test_qwen2_path_of_another_depth_says_mergekit_cannot_build_it_and_export_does(tmp_path):
    from click.testing import CliRunner

    from mergekit_evolve.cli import main

    out = tmp_path / "run"
    runner.start(parse_config(deeper_dfs(arch_pair(tmp_path, "qwen2"), rows(tmp_path))), out, progress=False)
    hops = json.loads((out / "best.json").read_text())["path"]["hops"]
    assert len(hops) != 3
    recipe = (out / "best.yaml").read_text()
    assert "mergekit-yaml cannot build this recipe: mergekit 0.1.5 keeps model A's layer_types (3 entries)" in recipe
    assert f"mergekit-evo export {out} --format standard --out OUT" in recipe
    done = CliRunner().invoke(main, ["export", str(out), "--format", "standard", "--out", str(tmp_path / "std")])
    assert done.exit_code == 0, done.output
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "std")
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == len(hops)


def test_llama_with_attention_bias_is_the_custom_form_everywhere_and_says_so(tmp_path):
    from click.testing import CliRunner

    from mergekit_evolve.cli import main

    models = arch_pair(tmp_path, "llama")
    for model in models:  # attention biases that mergekit's llama architecture does not carry
        config = json.loads((Path(model) / "config.json").read_text())
        weights = load_weights(Path(model))
        config["attention_bias"] = True
        for i in range(3):
            for proj, size in (("q", 32), ("k", 32), ("v", 32), ("o", 32)):
                weights[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.randn(size) * 0.1
        (Path(model) / "config.json").write_text(json.dumps(config))
        from safetensors.torch import save_file

        save_file(weights, str(Path(model) / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["run", str(write_yaml(tmp_path, deeper_dfs(models, rows(tmp_path)))), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert not (out / "best.yaml").exists()
    assert (
        "no mergekit recipe" in result.output
        and "layer-stack form (load it with trust_remote_code=True)" in result.output
    )
    refused = CliRunner().invoke(main, ["export", str(out), "--format", "standard", "--out", str(tmp_path / "std")])
    assert refused.exit_code == 2 and refused.stderr.count("--format custom") == 1, refused.stderr
    pushed = CliRunner().invoke(main, ["push", str(out), "--repo", "me/evo", "--dry-run", str(tmp_path / "dry")])
    assert pushed.exit_code == 2 and "--format standard:" in pushed.stderr, pushed.output
    assert not (tmp_path / "dry").exists()


def write_yaml(root: Path, config: dict) -> Path:
    path = root / "evo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_mistral_path_of_another_depth_builds_with_mergekit_yaml_from_a_long_folder_name(tmp_path):
    """Mistral (sliding window) keeps no per-layer list, so mergekit's CLI builds the folded path of another
    depth; the run folder has a long name with a `+`: best.yaml still names the sources as mergekit reads them."""
    out = tmp_path / ("mistral+dfs-" + "x" * 150)
    runner.start(parse_config(deeper_dfs(arch_pair(tmp_path, "mistral"), rows(tmp_path))), out, progress=False)
    hops = json.loads((out / "best.json").read_text())["path"]["hops"]
    assert (
        len(hops) != 3
        and "Build the standard checkpoint: mergekit-yaml best.yaml OUT" in (out / "best.yaml").read_text()
    )
    subprocess.run(["mergekit-yaml", str(out / "best.yaml"), str(tmp_path / "built")], check=True, capture_output=True)
    ours, theirs = load_weights(tmp_path / "built"), load_weights(out / "model")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
