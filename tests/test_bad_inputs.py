"""The bad-input table: each case gives one line on stderr, exit code 2, and writes nothing.

The same table is in docs/bad-inputs.md (``python tests/test_bad_inputs.py`` prints it from real runs).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_evolve.cli import main
from mergekit_evolve.zoo.random_models import make_random_model

sys.path.insert(0, str(Path(__file__).parent))
from foreign_models import make_gpt2, make_llava  # noqa: E402

HERE = Path(__file__).parent


@dataclass
class Case:
    id: str
    what: str  # what the user did wrong
    expect: str  # a fragment of the one-line error
    edit: Callable[[dict, Env], object] = lambda cfg, env: None  # edits the config (returns replacement)
    args: Callable[[Env], list[str]] | None = None  # other CLI arguments than `run CONFIG --out OUT`
    raw: str | None = None  # config file text instead of YAML of the config


@dataclass
class Env:
    root: Path
    models: dict[str, Path] = field(default_factory=dict)
    rows: Path | None = None


def base_config(env: Env) -> dict:
    m = env.models
    return {
        "genome": {"models": [str(m["a"]), str(m["b"])], "merge_method": "dare_ties", "base_model": str(m["base"])},
        "fitness": {"tasks": [{"name": "t", "data": str(env.rows)}]},
        "optimizer": {"max_evals": 4},
    }


def setg(key, value):
    def edit(cfg, env):
        cfg["genome"][key] = value(env) if callable(value) else value

    return edit


def task_data(text: str):
    def edit(cfg, env):
        bad = env.root / "bad.jsonl"
        bad.write_text(text)
        cfg["fitness"]["tasks"][0]["data"] = str(bad)

    return edit


def template(method: str, a_parameters: dict, b_parameters: dict, base: bool = False):
    """An edit that replaces the config with a template recipe over models a and b (and base)."""

    def edit(cfg, env):
        recipe = {
            "merge_method": method,
            "models": [
                {"model": str(env.models["a"]), "parameters": a_parameters},
                {"model": str(env.models["b"]), "parameters": b_parameters},
            ],
            "fitness": cfg["fitness"],
        }
        return {**recipe, "base_model": str(env.models["base"])} if base else recipe

    return edit


CASES = [
    Case("yaml", "malformed YAML", "malformed YAML at line", raw="genome: [models\n  - a: b: c\n"),
    Case("not-mapping", "config is a list", "expected a YAML mapping", raw="- genome\n"),
    Case(
        "missing-config",
        "config file missing",
        "config file not found",
        args=lambda env: ["run", str(env.root / "nope.yaml"), "--out", str(env.root / "out")],
    ),
    Case("unknown-key", "unknown top-level key", "optimiser: unknown key", edit=lambda c, e: c.update(optimiser={})),
    Case(
        "unknown-genome-key",
        "unknown genome key",
        "genome.layer_granularty: unknown key",
        edit=setg("layer_granularty", 2),
    ),
    Case(
        "unknown-method",
        "unknown merge method",
        "genome.merge_method: unknown merge method 'dare_tie'",
        edit=setg("merge_method", "dare_tie"),
    ),
    Case(
        "no-base",
        "ties family without base_model",
        "genome.base_model: merge method ties needs a base model",
        edit=lambda c, e: c["genome"].update(merge_method="ties", base_model=None),
    ),
    Case(
        "slerp-3",
        "slerp with three models",
        "genome.models: slerp merges 2 models",
        edit=lambda c, e: c["genome"].update(merge_method="slerp"),
    ),
    Case(
        "granularity",
        "layer_granularity does not divide the layers",
        "genome.layer_granularity: 3 does not divide the 4 layers",
        edit=setg("layer_granularity", 3),
    ),
    Case(
        "bad-search",
        "search names a parameter the method lacks",
        "genome.search: dare_ties has no parameter 't'",
        edit=setg("search", ["t"]),
    ),
    Case(
        "bounds",
        "bounds with lower >= upper",
        "bounds [1.0, 0.5] must have lower < upper",
        edit=setg("parameters", {"density": {"bounds": [1.0, 0.5]}}),
    ),
    Case(
        "init",
        "init outside bounds",
        "init 2.0 lies outside bounds",
        edit=setg("parameters", {"density": {"bounds": [0.1, 1.0], "init": 2.0}}),
    ),
    Case(
        "negative-density",
        "a searched range outside what the parameter means",
        "genome.parameters.density.bounds: [-0.5, 1] leaves [0, 1], the values dare_ties's density takes",
        edit=setg("parameters", {"density": {"bounds": [-0.5, 1.0]}}),
    ),
    Case(
        "fixed-out-of-range",
        "a fixed value outside what the parameter means",
        "genome.parameters.lambda: -1 is outside >= 0, the values dare_ties's lambda takes",
        edit=setg("parameters", {"lambda": -1.0}),
    ),
    Case(
        "marker-range",
        "template marker range outside what the parameter means",
        "models[0].parameters.density.evolve: [-1, 0.5] leaves [0, 1], the values ties's density takes",
        edit=template(
            "ties", {"density": {"evolve": [-1.0, 0.5]}, "weight": 0.5}, {"density": 0.5, "weight": 0.5}, base=True
        ),
    ),
    Case(
        "template-fixed-range",
        "a template's fixed number outside what the parameter means",
        "models[1].parameters.density: 1.5 is outside [0, 1], the values ties's density takes",
        edit=template(
            "ties", {"density": {"evolve": [0.1, 0.9]}, "weight": 0.5}, {"density": 1.5, "weight": 0.5}, base=True
        ),
    ),
    Case(
        "marker-typo",
        "a misspelled template marker",
        "models[0].parameters.weight: unknown key 'evolv' (did you mean 'evolve'?)",
        edit=template("linear", {"weight": {"evolv": [0, 1]}}, {"weight": 0.5}),
    ),
    Case(
        "task-search-path",
        "a task_search_path folder that does not exist",
        "task_search_path[0]: ",
        edit=lambda c, e: c.update(tasks=[{"name": "my_task"}], task_search_path=[str(e.root / "no-such-folder")]),
    ),
    Case(
        "fixed-unknown",
        "fixed value for a parameter the method lacks",
        "genome.parameters.gamma: dare_ties has no such parameter",
        edit=setg("parameters", {"gamma": 0.1}),
    ),
    Case(
        "sigma",
        "parameter out of range (sigma0 <= 0)",
        "optimizer.sigma0: Input should be greater than 0",
        edit=lambda c, e: c["optimizer"].update(sigma0=-1),
    ),
    Case(
        "budget-config",
        "zero budget in the config",
        "optimizer.max_evals: Input should be greater than or equal to 1",
        edit=lambda c, e: c["optimizer"].update(max_evals=0),
    ),
    Case(
        "budget-cli",
        "negative budget on the command line",
        "--max-evals: -5 is out of range",
        args=lambda env: ["run", str(env.root / "cfg.yaml"), "--out", str(env.root / "out"), "--max-evals", "-5"],
    ),
    Case(
        "model-missing",
        "missing model path",
        "does not exist; give the path of a Hugging Face model folder",
        edit=lambda c, e: c["genome"]["models"].__setitem__(1, str(e.root / "no-such-model")),
    ),
    Case(
        "not-a-model",
        "model folder without config.json",
        "has no config.json",
        edit=lambda c, e: c["genome"]["models"].__setitem__(1, str(e.root)),
    ),
    Case(
        "hub-offline",
        "hub ID while offline",
        "cannot read the config of 'org-that/does-not-exist'",
        edit=lambda c, e: c["genome"]["models"].__setitem__(1, "org-that/does-not-exist"),
    ),
    Case(
        "depth",
        "layer counts differ (PS)",
        "genome.models: num_layers differs",
        edit=lambda c, e: c["genome"]["models"].__setitem__(1, str(e.models["deep"])),
    ),
    Case(
        "arch",
        "architectures differ",
        "genome.models: architecture differs",
        edit=lambda c, e: c["genome"]["models"].__setitem__(1, str(e.models["qwen"])),
    ),
    Case(
        "tokenizer",
        "tokenizer / vocabulary mismatch",
        "genome.models: vocabulary sizes differ",
        edit=lambda c, e: c["genome"]["models"].__setitem__(1, str(e.models["vocab"])),
    ),
    Case(
        "dfs-hidden",
        "hidden sizes differ in DFS",
        "dfs.models: hidden sizes differ",
        edit=lambda c, e: c.update(space="dfs", dfs={"models": [str(e.models["a"]), str(e.models["wide"])]}),
    ),
    Case(
        "dfs-base",
        "DFS base_index out of range",
        "dfs.base_index: 5 but only 2 models",
        edit=lambda c, e: c.update(space="dfs", dfs={"base_index": 5}),
    ),
    Case("no-fitness", "no fitness defined", "no fitness defined", edit=lambda c, e: c.pop("fitness") and None),
    Case(
        "data-missing",
        "fitness data file missing",
        "t",
        edit=lambda c, e: c["fitness"]["tasks"][0].update(data=str(e.root / "none.jsonl")),
    ),
    Case("data-empty", "empty dataset", "t", edit=task_data("")),
    Case(
        "data-malformed",
        "malformed JSONL row",
        "line 2",
        edit=task_data('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n'),
    ),
    Case("data-field", "row without the answer field", "answer", edit=task_data('{"prompt": "1+1="}\n')),
    Case(
        "both",
        "genome and template together",
        "give either a 'genome:' section or a mergekit recipe template",
        edit=lambda c, e: c.update(template={"merge_method": "linear"}),
    ),
    Case(
        "marker",
        "malformed template marker",
        "models[0].parameters.weight: evolve [1, 0] needs lo < hi",
        edit=template("linear", {"weight": {"evolve": [1, 0]}}, {"weight": 0.5}),
    ),
    Case(
        "out-not-dir",
        "output directory not writable",
        "--out: cannot write to",
        args=lambda env: ["run", str(env.root / "cfg.yaml"), "--out", str(env.rows / "sub")],
    ),
    Case(
        "out-exists",
        "existing non-empty output without resume/--force",
        "exists and is not empty; use `mergekit-evo resume",
        args=lambda env: ["run", str(env.root / "cfg.yaml"), "--out", str(env.models["a"])],
    ),
    Case(
        "resume-nothing",
        "resume of a folder that is no run",
        "not a mergekit-evo run directory",
        args=lambda env: ["resume", str(env.models["a"])],
    ),
    Case(
        "genome-length",
        "recipe --genome of the wrong length",
        "--genome: ",
        args=lambda env: ["recipe", str(env.root / "cfg.yaml"), "--genome", str(env.root / "g.json")],
    ),
    Case(
        "wandb-missing",
        "wandb logging asked for without the wandb extra",
        "needs the wandb extra",
        edit=lambda c, e: c.update(wandb={"project": "evo"}),
    ),
    Case(
        "pickle-weights",
        "a model with only pickle (*.bin) weights",
        "has only pickle weights",
        edit=lambda c, e: c["genome"]["models"].__setitem__(1, str(e.models["pickled"])),
    ),
    Case(
        "racing-stages",
        "racing stages that do not end at 1.0",
        "optimizer.racing.stages: [0.25, 0.5] must rise strictly",
        edit=lambda c, e: c["optimizer"].update(racing={"stages": [0.25, 0.5]}),
    ),
    Case(
        "racing-kind",
        "racing over a perplexity task",
        "optimizer.racing: task 't' is not an accuracy task",
        edit=lambda c, e: (c["optimizer"].update(racing=True), c["fitness"]["tasks"][0].update(kind="perplexity"))[-1],
    ),
    Case(
        "economy-racing",
        "economy subsampling together with racing",
        "optimizer.economy: auto scores whole generations on subsamples and cannot be combined with racing",
        edit=lambda c, e: c["optimizer"].update(racing=True, economy="auto"),
    ),
    Case(
        "economy-kind",
        "economy subsampling over a perplexity task",
        "optimizer.economy: auto needs accuracy tasks (kind generate or choice), and task 't' is not one",
        edit=lambda c, e: (c["optimizer"].update(economy="auto"), c["fitness"]["tasks"][0].update(kind="perplexity"))[
            -1
        ],
    ),
    Case(
        "device",
        "CUDA requested without a GPU",
        "--device: cuda requested but no CUDA GPU is visible",
        args=lambda env: ["run", str(env.root / "cfg.yaml"), "--out", str(env.root / "out"), "--device", "cuda"],
    ),
    Case(
        "no-tokenizer",
        "models without tokenizer files, a fitness that needs one",
        "tasks.t (kind generate) needs a tokenizer, but ",
        edit=lambda c, e: c["genome"].update(
            models=[str(e.models["notok0"]), str(e.models["notok1"])], merge_method="linear", base_model=None
        ),
    ),
    Case(
        "gpt2-no-tokenizer",
        "GPT-2 without tokenizer files (transformers would build a 1-token tokenizer)",
        "/gpt2 has no tokenizer files (tokenizer.json",
        edit=lambda c, e: c["genome"].update(
            models=[str(e.models["gpt2"]), str(e.models["gpt2b"])], merge_method="linear", base_model=None
        ),
    ),
    Case(
        "llava",
        "a model family our fitness cannot run (LLaVA)",
        "is a LlavaForConditionalGeneration (model_type 'llava'), which transformers cannot build as a causal "
        "language model",
        edit=lambda c, e: c["genome"].update(
            models=[str(e.models["llava"]), str(e.models["llava2"])], merge_method="linear", base_model=None
        ),
    ),
    Case(
        "dfs-arch",
        "DFS over a family the layer stack does not support",
        "DFS layer stacks support llama, mistral, qwen2",
        edit=lambda c, e: c.update(space="dfs", dfs={"models": [str(e.models["gpt2"]), str(e.models["gpt2b"])]}),
    ),
    Case(
        "marker-param",
        "template marker on a parameter the method does not take",
        "models[1].parameters.weight: arcee_fusion has no parameter 'weight'",
        edit=lambda c, e: {
            "merge_method": "arcee_fusion",
            "base_model": str(e.models["base"]),
            "models": [
                {"model": str(e.models["base"])},
                {"model": str(e.models["a"]), "parameters": {"weight": {"evolve": [0, 1]}}},
            ],
            "fitness": c["fitness"],
        },
    ),
    Case(
        "migrate-refused",
        "a mergekit-evolve option we have no equivalent of",
        "--load-in-4bit: ",
        args=lambda env: ["run", str(env.root / "cfg.yaml"), "--out", str(env.root / "out"), "--load-in-4bit"],
    ),
    Case(
        "objective-unknown",
        "an objective that is neither a fitness task nor tokens",
        "optimizer.objectives: unknown objective 'q'",
        edit=lambda c, e: c["optimizer"].update(objectives=["t", "q"]),
    ),
    Case(
        "objective-one",
        "one objective (a front needs two or three)",
        "objectives: 1 given; give two or three",
        edit=lambda c, e: c["optimizer"].update(objectives=["t"]),
    ),
    Case(
        "objective-twice",
        "the same objective twice",
        "objectives: 't' appears twice",
        edit=lambda c, e: c["optimizer"].update(objectives=["t", "t"]),
    ),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad")
    env = Env(root=root)
    env.models = {
        "base": make_random_model(root / "base", seed=0),
        "a": make_random_model(root / "a", seed=1),
        "b": make_random_model(root / "b", seed=2),
        "deep": make_random_model(root / "deep", seed=3, num_layers=6),
        "qwen": make_random_model(root / "qwen", arch="qwen2", seed=4),
        "vocab": make_random_model(root / "vocab", seed=5, vocab_size=80),
        "wide": make_random_model(root / "wide", seed=6, hidden_size=48),
        "notok0": make_random_model(root / "notok0", seed=7, tokenizer=False),
        "notok1": make_random_model(root / "notok1", seed=8, tokenizer=False),
        "gpt2": make_gpt2(root / "gpt2", seed=0),
        "gpt2b": make_gpt2(root / "gpt2b", seed=1),
        "llava": make_llava(root / "llava", seed=0),
        "llava2": make_llava(root / "llava2", seed=1),
    }
    pickled = root / "pickled"
    import shutil

    shutil.copytree(env.models["a"], pickled)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    env.models["pickled"] = pickled
    env.rows = root / "rows.jsonl"
    env.rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    (root / "g.json").write_text("[0.5, 0.5]")
    return env


def run_case(case: Case, env: Env):
    cfg = base_config(env)
    replaced = case.edit(cfg, env)
    cfg = replaced if isinstance(replaced, dict) else cfg
    config_file = env.root / "cfg.yaml"
    config_file.write_text(case.raw if case.raw is not None else yaml.safe_dump(cfg))
    args = case.args(env) if case.args else ["run", str(config_file), "--out", str(env.root / "out")]
    os.environ["HF_HUB_OFFLINE"] = "1"
    return CliRunner().invoke(main, args, catch_exceptions=False)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.name not in ("cfg.yaml", "bad.jsonl")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_exit_code_2(case: Case, env: Env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(env.root)
    result = run_case(case, env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.expect in lines[0]
    assert snapshot(env.root) == before and not list(tmp_path.iterdir())  # nothing written anywhere


def test_the_docs_table_lists_every_case():
    doc = (HERE.parent / "docs" / "bad-inputs.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in doc]
    assert not missing, f"docs/bad-inputs.md lacks {missing}; regenerate it with python tests/test_bad_inputs.py"
    assert len(CASES) >= 25


if __name__ == "__main__":  # print the docs table from real runs
    import tempfile

    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        factory = type("F", (), {"mktemp": lambda self, name: root})()
        environment = env.__wrapped__(factory)
        print("| case | what is wrong | what the user sees (exit code 2) |\n|---|---|---|")
        for case in CASES:
            result = run_case(case, environment)
            line = result.stderr.strip().replace(str(root), "…").replace("|", "\\|")
            print(f"| `{case.id}` | {case.what} | `{line}` |")
