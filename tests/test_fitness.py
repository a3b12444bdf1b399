"""Fitness evaluators on real tiny random models.

Random models know nothing, so every expected score is built from the model's own outputs or from
log-probabilities computed here one row at a time, without padding, batching or a KV cache.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_evolve.errors import CandidateError, InputError
from mergekit_evolve.fitness import Fitness, FitnessConfig, TaskConfig, load_fitness_config
from mergekit_evolve.fitness.extract import extract, last_number, normalise_number
from mergekit_evolve.fitness.generate import cut_at_stop, greedy_token_ids
from mergekit_evolve.fitness.runtime import ModelRunner
from mergekit_evolve.merge.layer_pool import LayerPool
from mergekit_evolve.space.dfs import DFSPath
from mergekit_evolve.zoo.random_models import make_random_model

PROMPTS = ["1+2=", "abc", "hello world 12", "z", "9*9=81 and 3", "x:y", "?", "12345678901234567890", "q r"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # This seed's greedy continuations vary, and some hit EOS or other special tokens early.
    path = make_random_model(tmp_path_factory.mktemp("tiny"), num_layers=2, hidden_size=64, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def free(tiny):
    """Each prompt's reference greedy continuation (12 tokens or up to EOS), computed once."""
    model, tokenizer = tiny
    return {p: reference_greedy(model, tokenizer, p, 12) for p in PROMPTS}


def with_stop(tokenizer, run: list[int], stop: list[str]) -> list[int]:
    """Greedy decoding is prefix-consistent: a run with stop strings is the free run up to the
    first token after which the decoded text holds a stop string."""
    for k in range(1, len(run) + 1):
        if any(s in tokenizer.decode(run[:k], skip_special_tokens=True) for s in stop):
            return run[:k]
    return run


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """One row, no padding, no cache: recompute the whole sequence for every new token."""
    sequence = tokenizer(prompt)["input_ids"]
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
            generated.append(token)
            sequence.append(token)
            if token == tokenizer.eos_token_id:
                break
    return generated


def reference_logprob(model, context: list[int], continuation: list[int]) -> torch.Tensor:
    """Log-probability of each continuation token, one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    return torch.stack([logprobs[len(context) - 1 + k, t] for k, t in enumerate(continuation)])


def ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in prompts]


# ---- generation ------------------------------------------------------------------------------


def test_batched_generation_equals_unbatched_greedy(tiny, free):
    model, tokenizer = tiny
    with torch.inference_mode():
        batched = greedy_token_ids(ModelRunner.wrap(model), ids(tokenizer, PROMPTS), tokenizer, 12, [], batch_size=4)
    assert batched == [free[p] for p in PROMPTS]
    assert any(run[-1] == tokenizer.eos_token_id and len(run) < 12 for run in batched)  # EOS ends rows early
    assert len({len(p) for p in PROMPTS}) > 4  # prompts of many lengths share batches: padding is exercised


def test_generation_matches_transformers_generate(tiny):
    model, tokenizer = tiny
    prompt_ids = ids(tokenizer, PROMPTS[:3])
    with torch.inference_mode():
        ours = greedy_token_ids(ModelRunner.wrap(model), prompt_ids, tokenizer, 6, [], batch_size=8)
        for row, prompt in zip(ours, prompt_ids):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
            assert out[0, len(prompt) :].tolist() == row


def test_layer_stack_model_generation_equals_recompute(tiny, tmp_path):
    """Our DFS model (a layer visited twice, per-hop cache slots, scales) through the same batched loop."""
    _, tokenizer = tiny
    sources = [make_random_model(tmp_path / f"s{seed}", num_layers=2, hidden_size=64, seed=seed) for seed in (0, 1)]
    model = LayerPool.from_pretrained(sources).model(
        DFSPath(hops=[(0, 0), (1, 1), (1, 1), (0, 1)], scales=[1.0, 0.8, 1.2, 1.0])
    )
    with torch.inference_mode():
        batched = greedy_token_ids(
            ModelRunner.wrap(model), ids(tokenizer, PROMPTS[:6]), tokenizer, 10, [], batch_size=4
        )
    assert batched == [reference_greedy(model, tokenizer, p, 10) for p in PROMPTS[:6]]


def test_stop_strings_and_max_new_tokens(tiny, free):
    model, tokenizer = tiny
    free = [free[p] for p in PROMPTS]
    free_texts = tokenizer.batch_decode(free, skip_special_tokens=True)
    # A stop character that the model writes in the middle of some continuations.
    counts: dict[str, int] = {}
    for text in free_texts:
        for ch in set(text[1:-1]):
            counts[ch] = counts.get(ch, 0) + 1
    stop = [max(sorted(counts), key=counts.get), "\n"]
    runner = ModelRunner.wrap(model)
    with torch.inference_mode():
        stopped = greedy_token_ids(runner, ids(tokenizer, PROMPTS), tokenizer, 12, stop, batch_size=3)
        short = greedy_token_ids(runner, ids(tokenizer, PROMPTS), tokenizer, 3, [], batch_size=3)
    assert stopped == [with_stop(tokenizer, run, stop) for run in free]
    assert sum(len(s) < len(f) for s, f in zip(stopped, free)) >= 2  # the stop string really cut rows
    assert short == [f[:3] for f in free]
    texts = tokenizer.batch_decode(stopped, skip_special_tokens=True)
    for text, free_text in zip(texts, free_texts):
        assert cut_at_stop(text, stop) == cut_at_stop(free_text, stop)
        assert stop[0] not in cut_at_stop(text, stop)


def test_batch_stops_decoding_once_every_row_stopped(tiny, free):
    model, tokenizer = tiny
    prompts = [p for p in PROMPTS if tokenizer.decode(free[p][:1], skip_special_tokens=True)]
    first = {tokenizer.decode(free[p][:1]) for p in prompts}
    assert len(prompts) >= 4 and len(first) >= 2
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            greedy_token_ids(ModelRunner.wrap(model), ids(tokenizer, prompts), tokenizer, 12, sorted(first), 8)
    finally:
        hook.remove()
    # Every row stops at its first character: one forward pass, not twelve.
    assert len(calls) == 1


def test_exact_match_accuracy_is_hand_computed(tiny, free, tmp_path):
    model, tokenizer = tiny
    own = [tokenizer.decode(free[p][:8], skip_special_tokens=True) for p in PROMPTS[:8]]
    rows = [{"prompt": p, "answer": o.strip() if i % 2 == 0 else "WRONG"} for i, (p, o) in enumerate(zip(PROMPTS, own))]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    config = FitnessConfig(tasks=[TaskConfig(name="gen", data=Path("gen.jsonl"), max_new_tokens=8)], batch_size=3)
    fitness = Fitness(config, tokenizer, base_dir=tmp_path)
    assert fitness.score(model) == {"gen": 0.5}
    prompt_tokens = sum(len(x) for x in ids(tokenizer, PROMPTS[:8]))
    generated = sum(len(free[p][:8]) for p in PROMPTS[:8])
    assert fitness.tokens_spent == prompt_tokens + generated


def test_fewshot_rows_are_prepended_and_not_scored(tiny, tmp_path):
    _, tokenizer = tiny
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    task = TaskConfig(name="fs", data=tmp_path / "d.jsonl", num_fewshot=2, fewshot_separator=" # ", limit=3)
    fitness = Fitness(FitnessConfig(tasks=[task]), tokenizer)
    assert fitness.num_rows() == {"fs": 3}
    prompt = fitness._tasks[0].examples["fitness"].prompt_ids[0]
    assert prompt == tokenizer("0+0=0 # 1+1=2 # 2+2=")["input_ids"]


def test_chat_template_wraps_the_prompt(tiny, tmp_path):
    _, tokenizer = tiny
    chat = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = (
        "<s>{% for m in messages %}q:{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} a:{% endif %}"
    )
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12", "answer": "3"}])
    task = TaskConfig(name="chat", data=tmp_path / "d.jsonl", apply_chat_template=True)
    fitness = Fitness(FitnessConfig(tasks=[task]), chat)
    assert (
        fitness._tasks[0].examples["fitness"].prompt_ids[0] == chat("<s>q:12 a:", add_special_tokens=False)["input_ids"]
    )


# ---- choice and perplexity -------------------------------------------------------------------


def test_choice_accuracy_is_hand_computed_argmax(tiny, tmp_path):
    model, tokenizer = tiny
    rows = [{"prompt": p, "choices": ["a", "bb", "c 1 2", "zz z"][: 2 + i % 3]} for i, p in enumerate(PROMPTS)]
    best, best_norm = [], []
    for row in rows:
        context = tokenizer(row["prompt"])["input_ids"]
        sums = [
            float(reference_logprob(model, context, tokenizer(c, add_special_tokens=False)["input_ids"]).sum())
            for c in row["choices"]
        ]
        best.append(max(range(len(sums)), key=sums.__getitem__))
        normed = [s / len(c) for s, c in zip(sums, row["choices"])]
        best_norm.append(max(range(len(normed)), key=normed.__getitem__))
    for i, row in enumerate(rows):  # right for even rows, wrong for odd rows
        row["label"] = best[i] if i % 2 == 0 else (best[i] + 1) % len(row["choices"])
    write_jsonl(tmp_path / "c.jsonl", rows)
    tasks = [
        TaskConfig(name="c", kind="choice", data=tmp_path / "c.jsonl"),
        TaskConfig(name="c_norm", kind="choice", data=tmp_path / "c.jsonl", choice_norm=True),
    ]
    scores = Fitness(FitnessConfig(tasks=tasks, batch_size=4), tokenizer).score(model)
    assert scores["c"] == 5 / 9
    expected_norm = sum(b == row["label"] for b, row in zip(best_norm, rows)) / len(rows)
    assert scores["c_norm"] == expected_norm
    assert best != best_norm  # the two metrics differ on this data, so both are really tested


def test_perplexity_is_exp_of_mean_nll(tiny, tmp_path):
    model, tokenizer = tiny
    rows = [
        {"prompt": p, "answer": a} for p, a in zip(PROMPTS, ["3", "def", " 34", "yx", "4", "z", "!?", "1", "s t u"])
    ]
    rows[5]["answer"] = "zz"
    rows[6]["answer"] = "ab"
    write_jsonl(tmp_path / "p.jsonl", rows)
    nll, count, whole_nll, whole_count = 0.0, 0, 0.0, 0
    for row in rows:
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        lp = reference_logprob(model, tokenizer(row["prompt"])["input_ids"], answer)
        nll, count = nll - float(lp.sum()), count + len(answer)
        whole = tokenizer(row["answer"])["input_ids"]  # BOS + text: every text token is scored
        lp = reference_logprob(model, whole[:1], whole[1:])
        whole_nll, whole_count = whole_nll - float(lp.sum()), whole_count + len(whole) - 1
    tasks = [
        TaskConfig(name="ppl", kind="perplexity", data=tmp_path / "p.jsonl"),
        TaskConfig(name="ll", kind="perplexity", data=tmp_path / "p.jsonl", perplexity_score="log_likelihood"),
        TaskConfig(name="whole", kind="perplexity", data=tmp_path / "p.jsonl", prompt_field=None),
    ]
    results = Fitness(FitnessConfig(tasks=tasks, batch_size=4), tokenizer).evaluate(model)
    ppl = math.exp(nll / count)
    assert results["ppl"].perplexity == pytest.approx(ppl, rel=1e-6)
    assert results["ppl"].score == pytest.approx(1 / ppl, rel=1e-6)
    assert results["ll"].score == pytest.approx(-nll / count, rel=1e-6)
    assert results["whole"].perplexity == pytest.approx(math.exp(whole_nll / whole_count), rel=1e-6)


def test_nan_model_is_a_candidate_error(tiny, tmp_path):
    model, tokenizer = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ab", "answer": "cd", "choices": ["x", "y"], "label": 0}])
    for kind in ("perplexity", "choice"):
        fitness = Fitness(FitnessConfig(tasks=[TaskConfig(name=kind, kind=kind, data=tmp_path / "p.jsonl")]), tokenizer)
        with pytest.raises(CandidateError):
            fitness.score(broken)


# ---- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is 42.", "42"),
        ("1,000 apples", "1000"),
        ("7.0", "7"),
        ("costs $2.50 each, 3 of them: 7.50", "7.5"),
        ("from -3 to -12", "-12"),
        ("1,2,3", "3"),
        ("12,345,678 total", "12345678"),
        ("no digits here", None),
        ("-0", "0"),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_number_normalisation_and_extractors():
    assert normalise_number("1,000") == normalise_number("1000.00") == "1000"
    assert extract("  42\n", "exact") == "42"
    pattern = re.compile(r"answer is(.+?)\.")
    assert extract("I think the answer is  abc. yes.", "regex", pattern) == "abc"
    assert extract("no match", "regex", pattern) is None
    assert extract("x = 3, y = 4", "last_number") == "4"


def test_last_number_task_scores_normalised_numbers(tiny, free, tmp_path):
    model, tokenizer = tiny
    own = [tokenizer.decode(free[p][:8], skip_special_tokens=True) for p in PROMPTS]
    numbered = [(p, last_number(o)) for p, o in zip(PROMPTS, own) if last_number(o) is not None]
    assert len(numbered) >= 2, "the seed should give some continuations with digits"
    rows = [{"prompt": p, "answer": f"#### {n}.0" if "." not in n else n} for p, n in numbered]
    rows.append({"prompt": PROMPTS[0], "answer": 123456789})  # a JSON number; no 9-digit number fits in 8 tokens
    write_jsonl(tmp_path / "n.jsonl", rows)
    task = TaskConfig(name="num", data=tmp_path / "n.jsonl", extract="last_number", max_new_tokens=8)
    assert Fitness(FitnessConfig(tasks=[task]), tokenizer).score(model) == {"num": len(numbered) / len(rows)}


# ---- callable, total, splits -----------------------------------------------------------------


def test_callable_task_gets_model_rows_and_split(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "my_tasks_fit.py").write_text(
        "def score(model, tokenizer, rows, split):\n"
        "    return model.config.num_hidden_layers * 100 + len(rows) + (0.5 if split == 'heldout' else 0.0)\n"
    )
    write_jsonl(tmp_path / "f.jsonl", [{"x": i} for i in range(5)])
    write_jsonl(tmp_path / "h.jsonl", [{"x": i} for i in range(3)])
    task = TaskConfig(
        name="cb",
        kind="callable",
        data=Path("f.jsonl"),
        heldout=Path("h.jsonl"),
        function="my_tasks_fit:score",
        limit=4,
    )
    fitness = Fitness(FitnessConfig(tasks=[task]), tokenizer, base_dir=tmp_path)
    assert fitness.score(model) == {"cb": 204.0}
    assert fitness.score(model, "heldout") == {"cb": 203.5}


def test_weighted_total(tiny, tmp_path):
    _, tokenizer = tiny
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    tasks = [
        TaskConfig(name="a", data=tmp_path / "d.jsonl", weight=3.0),
        TaskConfig(name="b", data=tmp_path / "d.jsonl"),
    ]
    fitness = Fitness(FitnessConfig(tasks=tasks), tokenizer)
    assert fitness.total({"a": 1.0, "b": 0.0}) == 0.75
    assert fitness.total({"b": 0.25}) == 0.25  # only the tasks present count
    with pytest.raises(ValueError):
        fitness.total({"c": 1.0})


def test_heldout_is_only_read_when_asked_for(tiny, tmp_path):
    model, tokenizer = tiny
    write_jsonl(tmp_path / "f.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS[:3]])
    write_jsonl(tmp_path / "h.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS[3:8]])
    tasks = [
        TaskConfig(name="with", data=tmp_path / "f.jsonl", heldout=tmp_path / "h.jsonl", max_new_tokens=4, stop=[]),
        TaskConfig(name="without", data=tmp_path / "f.jsonl", max_new_tokens=4, stop=[]),
    ]
    fitness = Fitness(FitnessConfig(tasks=tasks), tokenizer)
    (tmp_path / "h.jsonl").unlink()  # everything was read at construction
    results = fitness.evaluate(model)
    assert {r.rows for r in results.values()} == {3}
    fitness_tokens = fitness.tokens_spent
    prompt_tokens = sum(len(x) for x in ids(tokenizer, PROMPTS[:3]))
    assert prompt_tokens < results["with"].tokens <= prompt_tokens + 3 * 4
    assert fitness_tokens == 2 * results["with"].tokens
    heldout = fitness.evaluate(model, "heldout")
    assert list(heldout) == ["with"] and heldout["with"].rows == 5
    assert fitness.num_rows("heldout") == {"with": 5}


def test_shuffle_is_seeded_and_limit_applies_after_it(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "cb_rows.py").write_text("def first(model, tokenizer, rows, split):\n    return rows[0]['i']\n")
    write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(50)])
    scores = []
    for seed in (0, 0, 1):
        task = TaskConfig(
            name="s",
            kind="callable",
            data=tmp_path / "d.jsonl",
            function="cb_rows:first",
            shuffle=True,
            seed=seed,
            limit=5,
        )
        fitness = Fitness(FitnessConfig(tasks=[task]), tokenizer, base_dir=tmp_path)
        assert fitness.num_rows() == {"s": 5}
        scores.append(fitness.score(model)["s"])
    assert scores[0] == scores[1] != scores[2]


# ---- bad input -------------------------------------------------------------------------------

GOOD_ROW = {"prompt": "1+1=", "answer": "2"}
BAD_DATA = [
    # (file name, file text or None for no file, task settings, expected message parts)
    ("missing.jsonl", None, {}, ["tasks.t.data", "does not exist"]),
    ("empty.jsonl", "\n", {}, ["tasks.t.data", "has no rows"]),
    ("bad.jsonl", json.dumps(GOOD_ROW) + "\n{oops\n", {}, ["tasks.t.data", "line 2", "not valid JSON"]),
    ("list.jsonl", "[1, 2]\n", {}, ["line 1", "not an object"]),
    (
        "noanswer.jsonl",
        json.dumps(GOOD_ROW) + '\n{"prompt": "x"}\n',
        {},
        ["line 2", "no field 'answer'", "answer_field"],
    ),
    ("text.txt", "hello", {}, ["unknown format '.txt'"]),
    (
        "label.jsonl",
        '{"prompt": "x", "choices": ["a", "b"], "label": 2}\n',
        {"kind": "choice"},
        ["label 2 is out of range for 2 choices"],
    ),
    (
        "choices.jsonl",
        '{"prompt": "x", "choices": "a", "label": 0}\n',
        {"kind": "choice"},
        ["not a list of non-empty strings"],
    ),
    ("nonum.jsonl", '{"prompt": "x", "answer": "none"}\n', {"extract": "last_number"}, ["has no number"]),
    ("few.jsonl", json.dumps(GOOD_ROW) + "\n", {"num_fewshot": 1}, ["tasks.t.num_fewshot", "only 1 rows"]),
    (
        "ok.jsonl",
        json.dumps(GOOD_ROW) + "\n",
        {"kind": "callable", "function": "no_such_module_xyz:f"},
        ["tasks.t.function", "cannot import"],
    ),
    (
        "ok.jsonl",
        json.dumps(GOOD_ROW) + "\n",
        {"apply_chat_template": True},
        ["tasks.t.apply_chat_template", "no chat template"],
    ),
    ("bad.csv", "prompt,answer\n1+1=,2,3\n", {}, ["line 2", "more cells than the header"]),
]


@pytest.mark.parametrize(("name", "text", "settings", "parts"), BAD_DATA, ids=[p[-1][-1] for p in BAD_DATA])
def test_bad_data_fails_at_construction(tiny, tmp_path, name, text, settings, parts):
    _, tokenizer = tiny
    if text is not None:
        (tmp_path / name).write_text(text)
    config = {"tasks": [{"name": "t", "data": name, **settings}]}
    with pytest.raises(InputError) as info:
        Fitness(config, tokenizer, base_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and ";" in message
    for part in parts:
        assert part in message


BAD_CONFIG = [
    ({"name": "t", "data": "d.jsonl", "extract": "regex", "pattern": r"answer \d+"}, "has no capture group"),
    ({"name": "t", "data": "d.jsonl", "extract": "regex"}, "extract: regex needs a pattern"),
    ({"name": "t", "data": "d.jsonl", "pattern": "(x)"}, "only used with extract: regex"),
    ({"name": "t", "data": "d.jsonl", "weight": 0}, "tasks.t.weight"),
    ({"name": "t", "data": "d.jsonl", "kind": "callable"}, "needs 'module:function'"),
    ({"name": "t", "data": "d.jsonl", "prompt_field": None}, "only allowed for kind perplexity"),
    ({"name": "t", "data": "d.jsonl", "colour": "red"}, "fitness.tasks.0.colour: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("task", "part"), BAD_CONFIG, ids=[c[1] for c in BAD_CONFIG])
def test_bad_config_is_an_input_error(task, part):
    with pytest.raises(InputError, match=re.escape(part)):
        load_fitness_config({"tasks": [task]})


def test_duplicate_names_and_empty_tasks_are_input_errors():
    task = {"name": "t", "data": "d.jsonl"}
    with pytest.raises(InputError, match="used twice"):
        load_fitness_config({"tasks": [task, task]})
    with pytest.raises(InputError, match="no tasks"):
        load_fitness_config({"tasks": []})
