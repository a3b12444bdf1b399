"""lm-eval tasks on the resident model equal what lm_eval itself reports for the saved model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import transformers
import yaml
from click.testing import CliRunner

pytest.importorskip("lm_eval")

from mergekit_evolve import runner  # noqa: E402
from mergekit_evolve.cli import main  # noqa: E402
from mergekit_evolve.config import parse_config  # noqa: E402
from mergekit_evolve.errors import InputError  # noqa: E402
from mergekit_evolve.fitness.lm_eval_tasks import LmEvalFitness  # noqa: E402


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local multiple-choice lm-eval task over a local JSONL file (no downloads)."""
    root = tmp_path_factory.mktemp("tasks")
    rows = [
        {"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0}
        for a in range(1, 6)
        for b in range(1, 5)
    ]
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tiny_sums.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "tiny_sums",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(root / "sums.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{question}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    return root


def lm_eval_config(family, task_dir, **extra) -> dict:
    return {
        "genome": {"models": [str(family["expert0"]), str(family["expert1"])], "merge_method": "linear"},
        "tasks": [{"name": "tiny_sums", "metric": "acc,none"}],
        "task_search_path": [str(task_dir)],
        "optimizer": {"max_evals": 4},
        "dtype": "float32",
        **extra,
    }


def test_score_on_the_resident_model_equals_the_lm_eval_cli(family, task_dir, tmp_path, monkeypatch):
    config = parse_config(lm_eval_config(family, task_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(family["expert0"])
    model = transformers.AutoModelForCausalLM.from_pretrained(family["expert0"], dtype="float32").eval()
    ours = LmEvalFitness(config, tokenizer).score(model)["tiny_sums"]
    out = tmp_path / "lm_eval_out"
    # lm-eval's own command line, run in this process (a subprocess would pay ~15 s of imports again).
    from lm_eval.__main__ import HarnessCLI

    argv = [
        "--model",
        "hf",
        "--model_args",
        f"pretrained={family['expert0']},dtype=float32",
        "--tasks",
        "tiny_sums",
        "--include_path",
        str(task_dir),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", ["lm_eval", *argv])
    cli = HarnessCLI()
    cli.execute(cli.parse_args())
    reported = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["tiny_sums"]["acc,none"]
    assert ours == pytest.approx(reported, abs=1e-12)


def test_a_search_with_lm_eval_tasks_runs_in_memory(family, task_dir, tmp_path):
    summary = runner.start(
        parse_config(lm_eval_config(family, task_dir)), tmp_path / "out", device="cpu", progress=False, save_model=False
    )
    assert summary.evaluations >= 4 and 0.0 <= summary.best.fitness <= 1.0
    assert summary.selected_on == [{"lm_eval_task": "tiny_sums", "metric": "acc,none", "limit": None}]


def test_unknown_lm_eval_task_is_a_clear_error(family, task_dir):
    config = parse_config({**lm_eval_config(family, task_dir), "tasks": [{"name": "no_such_task"}]})
    with pytest.raises(InputError, match="unknown lm-eval task 'no_such_task'"):
        LmEvalFitness(config, None)


def test_benchmark_named_selection_tasks_are_refused_unless_allowed(family, task_dir, tmp_path):
    config = parse_config({**lm_eval_config(family, task_dir), "tasks": [{"name": "gsm8k"}]})
    with pytest.raises(InputError, match="looks like the gsm8k benchmark"):
        runner.validate(config)
    allowed = parse_config(
        {
            **lm_eval_config(family, task_dir),
            "tasks": [{"name": "tiny_sums"}],
            "allow_benchmark_tasks": True,
            "fitness": {
                "tasks": [{"name": "mmlu_copy", "data": str(task_dir / "sums.jsonl"), "answer_field": "question"}]
            },
        }
    )
    from mergekit_evolve.fitness.guard import check_selection_tasks

    check_selection_tasks(allowed)  # the explicit flag lets it through


# -- mergekit-evolve configs, unchanged ------------------------------------------------------------


def test_every_field_of_a_mergekit_evolve_config_is_accepted_with_its_meaning():
    from mergekit.evo.config import EvolMergeConfiguration
    from mergekit.evo.genome import ModelGenomeDefinition

    genome = {
        "models": ["org/a", {"model": {"path": "org/b", "revision": "v2"}}],
        "merge_method": "dare_ties",
        "base_model": "org/base",
        "tokenizer_source": "base",
        "layer_granularity": 4,
        "normalize": False,
        "allow_negative_weights": True,
        "filters": ["self_attn", "mlp"],
        "smooth": True,
    }
    data = {
        "genome": genome,
        "tasks": ["short_form", {"name": "full", "weight": 2.0, "metric": "exact_match,none"}],
        "limit": 50,
        "num_fewshot": 3,
        "shuffle": True,
        "random_init": True,
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
    }
    # the test covers every field of mergekit-evolve 0.1.5's config model, and mergekit-evolve accepts it
    assert set(EvolMergeConfiguration.model_fields) == set(data)
    assert set(ModelGenomeDefinition.model_fields) == set(genome)
    theirs = EvolMergeConfiguration.model_validate(data)
    config = parse_config(data)
    g = config.genome
    assert g.models == ["org/a", "org/b@v2"] and g.base_model == "org/base" and g.tokenizer_source == "base"
    assert (g.merge_method, g.layer_granularity, g.normalize, g.allow_negative_weights, g.filters, g.smooth) == (
        "dare_ties",
        4,
        False,
        True,
        ["self_attn", "mlp"],
        True,
    )
    assert [(t.name, t.weight, t.metric) for t in config.tasks] == [(t.name, t.weight, t.metric) for t in theirs.tasks]
    assert (config.limit, config.num_fewshot, config.shuffle) == (50, 3, True)
    assert config.optimizer.init == "random"  # random_init: a random initial genome
    assert (config.apply_chat_template, config.fewshot_as_multiturn) == (False, False)


def test_a_task_entry_that_is_neither_a_name_nor_a_mapping_is_one_clear_line(family):
    config = {
        "genome": {"models": [str(family["expert0"]), str(family["expert1"])], "merge_method": "linear"},
        "tasks": [3],
    }
    with pytest.raises(InputError, match=r"^config: tasks.0: 3 is not a task; give a task name or \{name: ..."):
        parse_config(config)


@pytest.fixture(scope="module")
def zoo_task_dir(zoo, tmp_path_factory) -> Path:
    """mergekit-evolve's kind of local task: generate_until over the zoo's script_math fitness rows."""
    root = tmp_path_factory.mktemp("zoo_tasks")
    (root / "zoo_sm.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "zoo_script_math",
                "dataset_path": "json",
                "test_split": "test",
                "output_type": "generate_until",
                "dataset_kwargs": {"data_files": {"test": str(zoo.tasks["script_math"].fitness)}},
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    return root


def mergekit_evolve_yaml(zoo, task_dir, tmp_path, **extra) -> Path:
    """A config as mergekit-evolve runs it (plus our task_search_path and a small budget)."""
    data = {
        "genome": {"models": [str(zoo.models["script"]), str(zoo.models["math"])], "merge_method": "linear"},
        "tasks": ["zoo_script_math"],
        "limit": 20,
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
        "task_search_path": [str(task_dir)],
        "optimizer": {"max_evals": 2, "popsize": 2},
        **extra,
    }
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_wrong_metric_exits_2_with_one_line_before_the_run_directory_exists(zoo, zoo_task_dir, tmp_path):
    # mergekit-evolve's default metric, acc,none, on a generate_until task
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(mergekit_evolve_yaml(zoo, zoo_task_dir, tmp_path)),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: tasks.zoo_script_math.metric: 'acc,none' is not reported by this lm-eval generate_until task; "
        "use one of ['exact_match,none']"
    ]
    assert not out.exists()


def test_a_mergekit_evolve_config_runs_unchanged_and_quietly(zoo, zoo_task_dir, tmp_path, capfd):
    config = mergekit_evolve_yaml(
        zoo, zoo_task_dir, tmp_path, tasks=[{"name": "zoo_script_math", "metric": "exact_match,none"}]
    )
    with pytest.raises(SystemExit) as done:
        main(["run", str(config), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet", "--no-save-model"])
    assert done.value.code in (0, None)
    out, err = capfd.readouterr()
    assert out.startswith("best fitness ") and len(out.splitlines()) == 1
    assert err == ""  # no lm-eval warnings, progress bars or git probing


def test_without_quiet_lm_eval_prints_one_line_per_task(zoo, zoo_task_dir, tmp_path, capfd):
    config = parse_config(
        yaml.safe_load(
            mergekit_evolve_yaml(
                zoo, zoo_task_dir, tmp_path, tasks=[{"name": "zoo_script_math", "metric": "exact_match,none"}]
            ).read_text()
        )
    )
    runner.validate(config, "cpu", progress=True)
    assert capfd.readouterr().err.splitlines() == [
        "[mergekit-evo] lm-eval task zoo_script_math (fitness): 100 documents, first 20 each, generate_until, metric "
        "exact_match,none"
    ]


def test_one_lm_eval_task_index_per_process_and_only_the_search_path_when_it_suffices(zoo_task_dir):
    from mergekit_evolve.fitness.lm_eval_tasks import task_manager

    local = task_manager([str(zoo_task_dir)], ["zoo_script_math"])
    assert local is task_manager([str(zoo_task_dir)], ["zoo_script_math"])
    assert local.all_tasks == ["zoo_script_math"]  # lm-eval's ~14,700 built-in tasks were not indexed


# -- scores equal lm-eval's own, for every request type and with few-shot ---------------------------


def _task_yaml(root: Path, name: str, data: Path, **fields) -> None:
    (root / f"{name}.yaml").write_text(
        yaml.safe_dump(
            {
                "task": name,
                "dataset_path": "json",
                "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(data), "train": str(data.with_name("train.jsonl"))}},
                **fields,
            }
        )
    )


@pytest.fixture(scope="module")
def kinds_dir(zoo, tmp_path_factory) -> Path:
    return write_kinds_tasks(tmp_path_factory.mktemp("kinds"))


def write_kinds_tasks(root: Path) -> Path:
    """Local tasks over zoo-like arithmetic rows: one per lm-eval request type, two with few-shot."""
    import random

    rng = random.Random(0)
    facts = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(facts)
    rows = [
        {
            "prompt": f"{a}+{b}=",
            "answer": str(a + b),
            "choices": [str(a + b), str(a + b + 1), str(abs(a - b))],
            "label": 0,
        }
        for a, b in facts
    ]
    for row in rows:  # the right answer is not always first
        k = rng.randrange(3)
        row["choices"][0], row["choices"][k] = row["choices"][k], row["choices"][0]
        row["label"] = k
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    data = root / "test.jsonl"
    gen = {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    _task_yaml(root, "k_gen", data, **gen)
    _task_yaml(
        root,
        "k_gen_fewshot",
        data,
        **gen,
        num_fewshot=2,
        fewshot_split="train",
        target_delimiter="",
        fewshot_delimiter="\n",
    )
    _task_yaml(
        root,
        "k_loglik",
        data,
        output_type="loglikelihood",
        doc_to_text="{{prompt}}",
        doc_to_target="{{answer}}",
        target_delimiter="",
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    )
    _task_yaml(
        root,
        "k_choice_fewshot",
        data,
        output_type="multiple_choice",
        doc_to_text="{{prompt}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
        target_delimiter="",
        num_fewshot=1,
        fewshot_split="train",
        fewshot_delimiter="\n",
        metric_list=[
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    )
    acc = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    _task_yaml(
        root,
        "k_g_loglik",
        data,
        output_type="loglikelihood",
        doc_to_text="{{prompt}}",
        doc_to_target="{{answer}}",
        target_delimiter="",
        metric_list=acc,
    )
    _task_yaml(
        root,
        "k_g_choice",
        data,
        output_type="multiple_choice",
        doc_to_text="{{prompt}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
        metric_list=acc,
    )
    _task_yaml(
        root,
        "k_ppl",
        data,
        output_type="loglikelihood",
        doc_to_text="{{prompt}}",
        doc_to_target="{{answer}}",
        metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}, *acc],
    )
    (root / "k_group.yaml").write_text(
        yaml.safe_dump(
            {
                "group": "k_group",
                "task": ["k_g_loglik", "k_g_choice"],
                "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
            }
        )
    )
    return root


KINDS = {
    "k_gen": "exact_match,none",
    "k_gen_fewshot": "exact_match,none",
    "k_loglik": "acc,none",
    "k_choice_fewshot": "acc_norm,none",
    "k_group": "acc,none",
}


def test_scores_equal_lm_eval_simple_evaluate_for_every_request_type_and_a_group(zoo, kinds_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mergekit_evolve.fitness.lm_eval_tasks import quiet_lm_eval

    model_path = zoo.models["math"]
    config = parse_config(
        {
            "genome": {"models": [str(zoo.models["script"]), str(model_path)], "merge_method": "linear"},
            "tasks": [{"name": n, "metric": m} for n, m in KINDS.items()],
            "limit": 30,
            "task_search_path": [str(kinds_dir)],
        }
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype="float32").eval()
    ours = LmEvalFitness(config, tokenizer, batch_size=7).score(model)
    with quiet_lm_eval():
        theirs = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_path},dtype=float32",
            tasks=list(KINDS),
            limit=30,
            device="cpu",
            batch_size=4,
            task_manager=TaskManager(include_path=str(kinds_dir), include_defaults=False),
            bootstrap_iters=0,
            log_samples=False,
        )["results"]
    assert ours == {name: theirs[name][metric] for name, metric in KINDS.items()}
    assert len(set(ours.values())) > 1 and 0 < max(ours.values())  # the tasks tell candidates apart


def test_a_task_over_documents_without_the_field_it_reads_is_one_line(zoo, tmp_path):
    """lm-eval reads a missing field's name as the literal target: every candidate would score 0, silently."""
    rows = [{"prompt": f"{a}+{a}=", "target": str(2 * a)} for a in range(10)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    _task_yaml(
        tmp_path,
        "no_answer",
        tmp_path / "test.jsonl",
        output_type="generate_until",
        doc_to_text="{{prompt}}",
        doc_to_target="answer",  # a field name: lm-eval's literal text "answer" when the documents lack it
        generation_kwargs={"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    config = parse_config(
        {
            "genome": {"models": [str(zoo.models["script"]), str(zoo.models["math"])], "merge_method": "linear"},
            "tasks": [{"name": "no_answer", "metric": "exact_match,none"}],
            "task_search_path": [str(tmp_path)],
        }
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo.models["script"])
    with pytest.raises(
        InputError,
        match=r"tasks.no_answer: its doc_to_target reads 'answer', which its documents do "
        r"not have \(their fields: prompt, target\)",
    ):
        LmEvalFitness(config, tokenizer)


def test_a_lower_is_better_metric_is_refused_before_any_candidate(zoo, kinds_dir):
    config = parse_config(
        {
            "genome": {"models": [str(zoo.models["script"]), str(zoo.models["math"])], "merge_method": "linear"},
            "tasks": [{"name": "k_ppl", "metric": "perplexity,none"}],
            "task_search_path": [str(kinds_dir)],
        }
    )
    with pytest.raises(
        InputError,
        match=r"^tasks.k_ppl.metric: 'perplexity,none' is lower-is-better and fitness is "
        r"maximised; use a higher-is-better metric of \['acc,none'\]$",
    ):
        LmEvalFitness(config, None)


def test_parts_of_the_documents_add_up_to_the_whole_for_racing(zoo, kinds_dir):
    config = parse_config(
        {
            "genome": {"models": [str(zoo.models["script"]), str(zoo.models["math"])], "merge_method": "linear"},
            "tasks": [{"name": "k_gen", "metric": "exact_match,none"}, {"name": "k_loglik", "metric": "acc,none"}],
            "task_search_path": [str(kinds_dir)],
        }
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo.models["math"])
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo.models["math"], dtype="float32").eval()
    fitness = LmEvalFitness(config, tokenizer)
    assert fitness.raceable() == [] and fitness.num_rows() == {"k_gen": 40, "k_loglik": 40}
    whole = fitness.evaluate(model)
    parts = [fitness.evaluate(model, part=p) for p in [(0.0, 0.25), (0.25, 1.0)]]
    for name, result in whole.items():
        assert [p[name].rows for p in parts] == [10, 30]
        assert sum(p[name].score * p[name].rows for p in parts) == pytest.approx(result.score * result.rows, abs=1e-12)


def test_a_racing_search_runs_with_lm_eval_tasks(zoo, kinds_dir, tmp_path):
    config = parse_config(
        {
            "genome": {"models": [str(zoo.models["script"]), str(zoo.models["math"])], "merge_method": "linear"},
            "tasks": [{"name": "k_loglik", "metric": "acc,none"}],
            "task_search_path": [str(kinds_dir)],
            "optimizer": {"max_evals": 8, "popsize": 4, "racing": True},
            "dtype": "float32",
        }
    )
    summary = runner.start(config, tmp_path / "run", device="cpu", progress=False, save_model=False)
    stages = [json.loads(line) for line in (tmp_path / "run" / "racing.jsonl").read_text().splitlines()]
    assert summary.evaluations == 8 and len(stages) >= 8  # every candidate raced its first part at least
