"""What cheap fitness costs and what it keeps: forward tokens vs rank agreement with the full evaluation.

On the zoo's PS space (DARE-TIES of the script and math experts), a set of candidates is scored three
ways with the real code paths:
- full: every fitness row (the reference ranking);
- subsample: a fixed random fraction of the rows (the same part racing starts with), for several sizes;
- racing: ``search/racing.py`` over generations of ``--popsize`` candidates (the stages and bounds a
  run with ``optimizer.racing: true`` uses).
It prints tokens spent, the saving against full, Spearman's rho against full over all candidates, and
for racing how often each generation's true top-mu set was kept exact.

Two candidate sets: "cma" = the generations a real CMA-ES run asks (sigma0 = 1/6 around the default
start: neighbours, close in fitness) and "broad" = genomes drawn uniformly over the whole space.

The fitness set is larger than the demo's, like the paper's 1,069 MGSM rows: every script_math fact
(255) plus 745 rows of the script task; held-out rows are irrelevant here (nothing is selected).

It also times batched greedy generation against transformers' own ``generate`` on the same merged
model, prompts and batch size, and checks both produce the same tokens.

    python bench/fitness_cost.py [--candidates 48] [--popsize 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from mergekit_evolve.config import RacingConfig, parse_config
from mergekit_evolve.fitness import Fitness
from mergekit_evolve.fitness.runtime import ModelRunner, evaluation_mode
from mergekit_evolve.search.cmaes import new_es
from mergekit_evolve.search.executors import Job, evaluate_candidate, make_score
from mergekit_evolve.search.problems import PSProblem
from mergekit_evolve.search.racing import race
from mergekit_evolve.search.records import Outcome
from mergekit_evolve.zoo import build_zoo
from mergekit_evolve.zoo.data import Skills, all_facts, to_script, value

SUBSAMPLES = (0.5, 0.25, 0.125, 0.0625)
RACINGS = {
    "racing (default: z 2, keep mu)": RacingConfig(),
    "racing z 1": RacingConfig(z=1.0),
    "racing z 1, keep 2": RacingConfig(z=1.0, keep=2),
}


def write_tasks(folder: Path) -> list[dict]:
    """script_math over all 255 facts + 745 script rows = 1,000 fitness rows."""
    skills = Skills(seed=0)
    math_rows = [
        {"prompt": to_script(f"{a}{o}{b}", skills.map) + "=", "answer": str(value(a, o, b))} for a, o, b in all_facts()
    ]
    rng = random.Random(7)
    script_rows = []
    for _ in range(1000 - len(math_rows)):
        prompt, answer = skills.script_row(rng)
        script_rows.append({"prompt": prompt, "answer": answer})
    tasks = []
    for name, rows in (("script_math", math_rows), ("script", script_rows)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append({"name": name, "data": str(path), "max_new_tokens": 8})
    return tasks


def make_config(zoo, tasks: list[dict]) -> dict:
    return {
        "space": "ps",
        "genome": {
            "models": [str(zoo.models[n]) for n in zoo.experts],
            "base_model": str(zoo.models[zoo.base]),
            "merge_method": "dare_ties",
            "layer_granularity": 2,
        },
        "fitness": {"tasks": tasks, "batch_size": 64},
        "dtype": "float32",
    }


def cma_generations(problem, config, scorer, n: int, popsize: int) -> tuple[list, list]:
    """The generations a real CMA-ES run asks, told their full fitness (returned for reuse)."""
    es = new_es(problem.x0(), config.optimizer.model_copy(update={"popsize": popsize}))
    genomes, full = [], []
    while len(genomes) < n:
        asked = es.ask()
        results = [scorer(g) for g in asked]
        es.tell(asked, [-r.fitness for r in results])
        genomes += [np.asarray(g) for g in asked]
        full += results
    return genomes[:n], full[:n]


def broad_candidates(problem, n: int) -> list:
    rng = np.random.default_rng(0)
    return [rng.uniform(0, 1, problem.dim) for _ in range(n)]


class Scorer:
    """Scores genomes with the run's own score function; counts tokens."""

    def __init__(self, problem, fitness):
        self.problem, self.score = problem, make_score(fitness)

    def __call__(self, genome, part=None) -> Outcome:
        result = evaluate_candidate(self.problem, self.score, list(genome), part)
        if result.error:
            raise RuntimeError(result.error)
        return result


def evaluate_set(scorer: Scorer, fitness, genomes: list, popsize: int, full: list | None = None) -> dict:
    full = full or [scorer(g) for g in genomes]
    ref = [r.fitness for r in full]
    full_tokens = sum(r.tokens for r in full)
    rows = {"full": {"tokens": full_tokens, "saving": 1.0, "rho": 1.0}}
    for fraction in SUBSAMPLES:
        sub = [scorer(g, (0.0, fraction)) for g in genomes]
        est = [fitness.total(r.scores) for r in sub]
        tokens = sum(r.tokens for r in sub)
        rows[f"subsample {fraction:g}"] = {"tokens": tokens, "saving": full_tokens / tokens, "rho": _rho(ref, est)}
    for name, racing in RACINGS.items():
        rows[name] = racing_row(scorer, fitness, genomes, popsize, ref, full_tokens, racing)
    return {"candidates": len(genomes), "fitness_range": [min(ref), max(ref)], "rows": rows}


def racing_row(scorer, fitness, genomes, popsize, ref, full_tokens, racing: RacingConfig) -> dict:
    est, tokens, exact_top = [0.0] * len(genomes), 0, []
    mu = popsize // 2
    for start in range(0, len(genomes), popsize):
        jobs = [
            Job(generation=0, candidate=i, index=i, genome=list(genomes[i]))
            for i in range(start, min(start + popsize, len(genomes)))
        ]

        def evaluate(staged):
            for job in staged:
                yield job, scorer(job.genome, job.part)

        for job, result in race(jobs, evaluate, racing, mu, fitness.weights(), fitness.num_rows()):
            est[job.candidate] = result.fitness
            tokens += result.tokens
        true_top = sorted(range(start, start + len(jobs)), key=lambda i: -ref[i])[:mu]
        exact_top.append(all(abs(est[i] - ref[i]) < 1e-12 for i in true_top))
    return {
        "tokens": tokens,
        "saving": full_tokens / tokens,
        "rho": _rho(ref, est),
        "top_mu_exact": sum(exact_top) / len(exact_top),
    }


def _rho(a, b) -> float:
    value_ = spearmanr(a, b).statistic
    return float(value_) if value_ == value_ else 0.0


def generation_throughput(problem, fitness, genome, batch: int = 64, new_tokens: int = 8) -> dict:
    """Ours (greedy_generate) vs transformers' generate on the same merged model, prompts, batch."""
    from mergekit_evolve.fitness.generate import greedy_token_ids

    model = problem.build(problem.decode(np.asarray(genome)))
    tokenizer = problem.tokenizer
    task = fitness._tasks[1]  # the script task: 745 prompts
    prompts = task.examples["fitness"].prompt_ids[: batch * 8]
    with evaluation_mode(model):
        runner = ModelRunner.wrap(model)
        greedy_token_ids(runner, prompts[:batch], tokenizer, new_tokens, [], batch)  # warm-up
        start = time.perf_counter()
        ours = greedy_token_ids(runner, prompts, tokenizer, new_tokens, [], batch)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = hf_generate(model, tokenizer, prompts, batch, new_tokens)
        hf_s = time.perf_counter() - start
    tokens = sum(len(p) + len(g) for p, g in zip(prompts, ours))
    same = sum(a == b for a, b in zip(ours, theirs)) / len(prompts)
    return {
        "prompts": len(prompts),
        "batch": batch,
        "ours_tokens_per_s": tokens / ours_s,
        "hf_tokens_per_s": tokens / hf_s,
        "ratio": hf_s / ours_s,
        "same_tokens": same,
    }


def hf_generate(model, tokenizer, prompts, batch, new_tokens) -> list[list[int]]:
    """The hand-written baseline: left-pad each batch, ``model.generate`` greedy, cut at EOS."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # same batching as ours
    results: dict[int, list[int]] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(idx):
            tokens = gen[row, width:].tolist()
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            results[i] = tokens
    return [results[i] for i in range(len(prompts))]


def print_report(report: dict) -> None:
    for name, block in report["sets"].items():
        lo, hi = block["fitness_range"]
        print(f"\n### candidates: {name} ({block['candidates']}, full fitness {lo:.3f}-{hi:.3f})\n")
        print("| evaluation | forward tokens | saving | Spearman rho vs full | top-mu exact |")
        print("|---|---|---|---|---|")
        for row_name, row in block["rows"].items():
            top = f"{row['top_mu_exact']:.2f}" if "top_mu_exact" in row else ""
            print(f"| {row_name} | {row['tokens']:,} | {row['saving']:.1f}x | {row['rho']:.3f} | {top} |")
    g = report["generation"]
    print(f"\n### batched greedy generation ({g['prompts']} prompts, batch {g['batch']})\n")
    print(
        f"ours {g['ours_tokens_per_s']:,.0f} tok/s, transformers generate {g['hf_tokens_per_s']:,.0f} tok/s: "
        f"ours is {g['ratio']:.2f}x its throughput (target >= 0.8x); same tokens on {g['same_tokens']:.0%} of prompts"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=48)
    parser.add_argument("--popsize", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    zoo = build_zoo()
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(make_config(zoo, write_tasks(Path(tmp))))
        problem = PSProblem(config, "cpu")
        fitness = Fitness(config.fitness, problem.tokenizer)
        scorer = Scorer(problem, fitness)
        started = time.perf_counter()
        cma_genomes, cma_full = cma_generations(problem, config, scorer, args.candidates, args.popsize)
        sets = {
            "cma": evaluate_set(scorer, fitness, cma_genomes, args.popsize, cma_full),
            "broad": evaluate_set(scorer, fitness, broad_candidates(problem, args.candidates), args.popsize),
        }
        report = {
            "sets": sets,
            "generation": generation_throughput(problem, fitness, problem.x0()),
            "fitness_rows": fitness.num_rows(),
            "popsize": args.popsize,
            "racing": RacingConfig().model_dump(),
        }
        report["seconds"] = round(time.perf_counter() - started, 1)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
