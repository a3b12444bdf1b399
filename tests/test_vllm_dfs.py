"""DFS on vLLM: the layer stack as a vLLM architecture, paths set in place, results equal to the hf layer stack.

Everything runs for real on the zoo in float32: vLLM's CPU build, the pool loaded once from the zoo's files,
the same fitness code on both backends, mergekit's folded checkpoint loaded in plain vLLM.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_vllm_backend import prompts_of  # noqa: E402 (the zoo prompts, tokenized)
from transformers import AutoConfig

from mergekit_evolve import runner
from mergekit_evolve.config import parse_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.fitness.evaluator import Fitness
from mergekit_evolve.fitness.generate import greedy_token_ids
from mergekit_evolve.fitness.runtime import runner_for
from mergekit_evolve.fitness.tasks import VllmSettings
from mergekit_evolve.fitness.vllm_engine import VllmLayerStack
from mergekit_evolve.merge.layer_pool import LayerPool, stack_checkpoint_tensors
from mergekit_evolve.search import executors
from mergekit_evolve.search.problems import make_problem
from mergekit_evolve.space.dfs import DFSPath
from mergekit_evolve.zoo.random_models import make_random_model

TASKS = ("script_math", "script", "math")
# model A's first three layers, then the math expert's last three: a passthrough frankenmerge
FRANKENMERGE = DFSPath(hops=[(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)], scales=[1.0] * 6)
# both experts, layers at two slots each, scales on most hops
SCALED = DFSPath(hops=[(0, 0), (0, 1), (0, 1), (1, 2), (1, 2), (0, 3)], scales=[1.0, 0.7, 1.3, 0.9, 1.6, 1.1])


def dfs_config(zoo, backend: str, space: str = "dfs", tasks=TASKS, **extra) -> dict:
    return {
        "space": space,
        "genome": {
            "models": [str(zoo.models["script"]), str(zoo.models["math"])],
            "base_model": str(zoo.models["base"]),
            "merge_method": "dare_ties",
            "layer_granularity": 2,
            "parameters": {"density": {"bounds": [0.0, 1.0], "init": 0.5}},
        },
        "dfs": {"repeats": 2, "scales": "matrix", "prescan": 2, "indicator_flips": 1.5},
        "fitness": {
            "backend": backend,
            "batch_size": 64,
            "tasks": [
                {"name": n, "data": str(zoo.tasks[n].fitness), "heldout": str(zoo.tasks[n].heldout)} for n in tasks
            ],
        },
        "optimizer": {"max_evals": 34, "seed": 0},
        "dtype": "float32",
        **extra,
    }


@pytest.fixture(scope="module")
def problems(zoo):
    """The same DFS space over the script and math experts on both backends (one vLLM engine for the module)."""
    hf = make_problem(parse_config(dfs_config(zoo, "hf")))
    vllm = make_problem(parse_config(dfs_config(zoo, "vllm")))
    yield hf, vllm
    vllm.close()


def generations(model, tokenizer, prompts) -> list[list[int]]:
    return greedy_token_ids(runner_for(model), prompts, tokenizer, 8, ["\n"], 64)


def search_paths(problem, n: int, random_start: bool) -> list[DFSPath]:
    """Distinct paths from the search itself: the block-path pre-scan and CMA-ES samples around model A's path,
    or CMA-ES from a random start (``optimizer.init: random``: longer paths that repeat layers)."""
    es = problem.new_optimizer(problem.x0(random=random_start), problem.config.optimizer, restart=int(random_start))
    paths: dict[str, DFSPath] = {}
    while len(paths) < n:
        genomes = es.ask()
        for genome in genomes:
            candidate = problem.decode(np.asarray(genome))
            paths.setdefault(candidate.key, candidate.path)
        es.tell(genomes, [float(np.sum(np.asarray(g) ** 2)) for g in genomes])  # any ranking: only the paths count
    return list(paths.values())


def test_paths_generate_the_same_tokens_as_the_hf_layer_stack(zoo, problems):
    hf, vllm = problems
    tokenizer = hf.tokenizer
    start = hf.decode(hf.x0()).path
    for path in (start, FRANKENMERGE):
        for task in TASKS:
            prompts = prompts_of(zoo, tokenizer, task)
            theirs = generations(hf.pool.model(path), tokenizer, prompts)
            assert generations(vllm.engine.set_path(path.hops, path.scales), tokenizer, prompts) == theirs
    prompts = prompts_of(zoo, tokenizer, "script_math")
    found = search_paths(hf, 11, random_start=False) + search_paths(hf, 11, random_start=True)
    assert any(len(set(p.hops)) < len(p.hops) for p in found)  # a layer at two slots (two KV caches)
    assert len({len(p.hops) for p in found}) >= 3
    assert any(s != 1.0 for p in found for s in p.scales)
    distinct = set()
    for path in found:
        theirs = generations(hf.pool.model(path), tokenizer, prompts)
        ours = generations(vllm.engine.set_path(path.hops, path.scales), tokenizer, prompts)
        assert ours == theirs, path.summary()
        distinct.add(tuple(map(tuple, theirs)))
    assert len(distinct) >= 10  # paths that really compute different things


def test_choice_and_perplexity_along_a_path_equal_the_hf_layer_stack(problems, tmp_path):
    hf, vllm = problems
    facts = [(a, b) for a in range(10) for b in range(10)][::3]
    choice = [
        {"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0} for a, b in facts
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choice))
    text = [{"prompt": f"{a}*{b}=", "answer": f"{a * b}\n"} for a, b in facts]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    tasks = Fitness(
        {
            "tasks": [
                {"name": "pick", "kind": "choice", "data": str(tmp_path / "c.jsonl")},
                {"name": "norm", "kind": "choice", "choice_norm": True, "data": str(tmp_path / "c.jsonl")},
                {"name": "ppl", "kind": "perplexity", "data": str(tmp_path / "p.jsonl")},
            ]
        },
        hf.tokenizer,
    )
    theirs = tasks.evaluate(hf.pool.model(SCALED))
    ours = tasks.evaluate(vllm.engine.set_path(SCALED.hops, SCALED.scales))
    for name in ("pick", "norm"):
        assert ours[name].correct == theirs[name].correct
    assert 0 < theirs["pick"].score < 1
    assert ours["ppl"].perplexity == pytest.approx(theirs["ppl"].perplexity, rel=1e-4)


def test_the_engine_holds_the_pool_once_with_one_kv_cache_per_slot(zoo, problems):
    hf, vllm = problems
    model = vllm.engine._model_runner().get_model()
    assert len(model.model.layers) == 8 and len(model.slots) == 16 == hf.space.num_slots  # M layers, T caches
    assert all(p.numel() <= 1 for p in model.slots.parameters())  # a slot is a KV cache, not a copy of a layer
    caches = vllm.engine.llm.llm_engine.vllm_config.compilation_config.static_forward_context
    assert sorted(caches) == sorted(f"slots.{t}.attn" for t in range(16))  # the pool layers' own: none
    names = [name for name, _ in stack_checkpoint_tensors(vllm.models, [4, 4], 0)]
    shell = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert len(names) == len(set(names)) == 8 * 9 + 3 and shell < set(names)  # each tensor read once
    with pytest.raises(ValueError, match="17 hops is longer than the engine's 16 slots"):
        vllm.engine.set_path([(0, 0)] * 17, [1.0] * 17)


def test_a_folded_path_loads_in_plain_vllm_with_the_same_generations(zoo, problems, tmp_path):
    """What a user serves: the path folded into a standard Llama checkpoint (scales in o_proj/down_proj, as
    ``mergekit-yaml best.yaml`` writes it), loaded by vLLM's own Llama, generates what the search scored."""
    import vllm as vllm_lib

    from mergekit_evolve.export.custom_code import save_folded_checkpoint

    hf, vllm = problems
    save_folded_checkpoint(hf.pool, SCALED, tmp_path / "folded")
    config = AutoConfig.from_pretrained(tmp_path / "folded")
    assert config.architectures == ["LlamaForCausalLM"] and config.num_hidden_layers == len(SCALED.hops)
    prompts = prompts_of(zoo, hf.tokenizer, "script_math")
    ours = generations(vllm.engine.set_path(SCALED.hops, SCALED.scales), hf.tokenizer, prompts)
    plain = vllm_lib.LLM(
        model=str(tmp_path / "folded"), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 26
    )
    params = vllm_lib.SamplingParams(temperature=0.0, max_tokens=8, stop=["\n"], stop_token_ids=[2])
    served = plain.generate([vllm_lib.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in served] == ours
    assert len({tuple(o) for o in ours}) >= 5  # varied answers, not one string


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_pools_give_the_hf_layer_stacks_log_probabilities(arch, tmp_path):
    """The other two families the layer stack supports (Qwen2: attention biases; Mistral: sliding window),
    random weights in float32, a path with repeats and scales: log-probabilities, not near-tied greedy picks."""
    paths = [
        make_random_model(tmp_path / f"{arch}{s}", arch=arch, seed=s, num_layers=3, hidden_size=128) for s in (0, 1)
    ]
    pool = LayerPool.from_pretrained(paths, dtype=torch.float32)
    engine = VllmLayerStack(
        [AutoConfig.from_pretrained(p) for p in paths],
        pool.tokenizer,
        VllmSettings(),
        torch.float32,
        "cpu",
        base_index=0,
        slots=12,
    )
    engine.load_weights(stack_checkpoint_tensors(paths, [3, 3], 0))
    path = DFSPath(hops=[(1, 0), (0, 1), (0, 1), (1, 2), (1, 2), (0, 0)], scales=[1.0, 0.7, 1.3, 0.9, 1.6, 1.1])
    sequences = [[1, 5, 9, 12, 7, 30, 22, 14, 3], [1, 3, 4, 5, 6, 40, 41], [1, 8, 8, 8, 9, 10]]
    pairs = [(seq[:3], seq[3:]) for seq in sequences]
    ours, _ = engine.set_path(path.hops, path.scales).continuation_logprobs(pairs)
    stack = pool.model(path)
    for (context, continuation), got in zip(pairs, ours):
        with torch.no_grad():
            logits = stack(torch.tensor([context + continuation]), use_cache=False).logits[0].float()
        expected = torch.log_softmax(logits, -1)[len(context) - 1 : -1].gather(1, torch.tensor(continuation)[:, None])
        torch.testing.assert_close(got, expected[:, 0], rtol=0, atol=1e-4)
    assert len(engine._model_runner().get_model().model.layers) == 6


def test_a_pool_vllm_cannot_hold_or_cache_is_one_line_before_anything_runs(zoo, tmp_path):
    wider = make_random_model(tmp_path / "wider", hidden_size=128, intermediate_size=384, num_layers=3)
    odd = dfs_config(zoo, "vllm") | {"dfs": {"models": [str(zoo.models["script"]), str(wider)]}}
    with pytest.raises(InputError, match=r"model 1 has intermediate_size = 384 where model A has 256; choose models"):
        runner.validate(parse_config(odd))
    small = dfs_config(zoo, "vllm")
    small["fitness"]["vllm"] = {"kv_cache_gb": 0.001}
    with pytest.raises(InputError, match=r"kv_cache_gb: paths of up to 16 hops keep one KV cache per hop, 0.00195 GiB"):
        runner.start(parse_config(small), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_ps_dfs_on_vllm_equals_transformers_and_resumes(zoo, tmp_path, monkeypatch):
    """Last in this file: closing a run's engines tears down vLLM's process-wide state that the module's engine
    uses (one engine at a time per process, as in a run).

    Both stages (PS on vLLM with merged weights loaded in place, then DFS with the PS model as model A, and
    the validation gate) give the transformers run's evaluations; an interrupted run resumes to the same."""
    budget = {"optimizer": {"max_evals": 12, "seed": 0, "popsize": 6}, "tasks": ["script_math"]}
    reference = runner.start(parse_config(dfs_config(zoo, "hf", "ps+dfs", **budget)), tmp_path / "hf", progress=False)
    stop = executors.LocalExecutor

    class StopInDFS(stop):  # our own executor, interrupted (as by Ctrl-C) in the DFS stage's second generation
        done = 0

        def map(self, jobs):
            for item in super().map(jobs):
                if self.problem.config.space == "dfs":
                    StopInDFS.done += 1
                    if StopInDFS.done == 8:
                        raise KeyboardInterrupt
                yield item

    monkeypatch.setattr(runner, "make_executor", lambda config, problem, score: StopInDFS(problem, score))
    with pytest.raises(KeyboardInterrupt):
        runner.start(parse_config(dfs_config(zoo, "vllm", "ps+dfs", **budget)), tmp_path / "vllm", progress=False)
    monkeypatch.undo()
    resumed = runner.resume(tmp_path / "vllm", progress=False)
    for stage in ("ps", "dfs"):
        ours, theirs = (
            [json.loads(x) for x in (tmp_path / b / stage / "evaluations.jsonl").read_text().splitlines()]
            for b in ("vllm", "hf")
        )
        assert [r["genome"] for r in ours] == [r["genome"] for r in theirs], stage
        assert [r["scores"] for r in ours] == [r["scores"] for r in theirs], stage
        assert len({r["fitness"] for r in theirs}) > 1
    assert resumed.best.heldout == reference.best.heldout
    assert resumed.validation == reference.validation
    assert (tmp_path / "vllm" / "ps" / "best.yaml").read_text() == (tmp_path / "hf" / "ps" / "best.yaml").read_text()
    recipe = (tmp_path / "vllm" / "best.yaml").read_text().replace(str(tmp_path / "vllm"), "RUN")
    assert recipe == (tmp_path / "hf" / "best.yaml").read_text().replace(str(tmp_path / "hf"), "RUN")
