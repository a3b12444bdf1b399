"""What a multi-objective run's front becomes on disk, and how a user picks one point of it.

``write_front``: front.json (every non-dominated candidate with its objectives on the fitness split and on
held-out) and front/NN.yaml (each point's plain mergekit recipe; DFS: the folded passthrough recipe where
the path folds). ``pick``: the point that a weighting of the objectives chooses (``export --pick``).
"""

from __future__ import annotations

import numpy as np

from mergekit_evolve.errors import InputError
from mergekit_evolve.export.artifacts import fold_blocker, path_record, recipe_of
from mergekit_evolve.progress import step
from mergekit_evolve.recipe.ps import recipe_yaml
from mergekit_evolve.search.objectives import Objectives, nondominated, pareto_front
from mergekit_evolve.search.problems import PSCandidate
from mergekit_evolve.search.records import Front, FrontPoint, ReferencePoint
from mergekit_evolve.search.rundir import RunDir


def write_front(problem, run_dir: RunDir, fitness, objectives: Objectives, progress: bool = True) -> Front:
    """Score each front point on the held-out split (where every objective has one), score the start
    recipe and the sources as references, and write the front."""
    records = pareto_front(run_dir.read_evaluations(), objectives)
    has_heldout = all(name in fitness.num_rows("heldout") for name in objectives.names if name != "tokens")
    points, recipes = [], {}
    what = f"scoring the {len(records)} front points on the held-out split and the sources on both splits"
    with step(what, progress):
        references = [_start_reference(problem, fitness, objectives, has_heldout)]
        for n, record in enumerate(records):
            candidate = problem.decode(np.asarray(record.genome))
            values = objectives.values(record.scores, record.generated)
            heldout = _split_values(problem.build(candidate), fitness, objectives, "heldout") if has_heldout else None
            name = f"front/{n:02d}.yaml"
            text = _recipe_text(problem, candidate, record.index, n, values)
            if text is not None:
                recipes[name] = text
            points.append(
                FrontPoint(
                    **dict(record.position),
                    fitness=record.fitness,
                    values=values,
                    heldout=heldout,
                    recipe=name if text is not None else None,
                    path=None if isinstance(candidate, PSCandidate) else path_record(problem, candidate),
                )
            )
        references += [_source_reference(problem, ref, fitness, objectives, has_heldout) for ref in _sources(problem)]
    points = _mark_heldout_front(points, objectives)
    front = Front(
        objectives=list(objectives.names),
        higher_is_better=[objectives.higher_is_better(n) for n in objectives.names],
        reference=objectives.reference_values(),
        hypervolume=objectives.hypervolume(p.values for p in points),
        heldout_hypervolume=objectives.hypervolume(p.heldout for p in points if p.heldout) if has_heldout else None,
        points=points,
        references=references,
    )
    run_dir.write_front(front, recipes)
    return front


def _split_values(model, fitness, objectives: Objectives, split: str) -> dict[str, float] | None:
    results = fitness.evaluate(model, split)
    scores = {name: r.score for name, r in results.items()}
    generated = {name: r.generated / r.rows for name, r in results.items() if r.generated is not None}
    return objectives.values(scores, generated)


def _start_reference(problem, fitness, objectives: Objectives, has_heldout: bool) -> ReferencePoint:
    """The configured start (x0: mergekit-evolve's default recipe, or model A's own path for DFS)."""
    model = problem.build(problem.decode(problem.x0()))
    values = _split_values(model, fitness, objectives, "fitness")
    heldout = _split_values(model, fitness, objectives, "heldout") if has_heldout else None
    return ReferencePoint(label="start", values=values, heldout=heldout)


def _sources(problem) -> list[str]:
    from mergekit_evolve.config import source_models

    if hasattr(problem, "models"):  # DFS: the collection
        return list(problem.models)
    base = problem.config.genome.base_model if problem.config.genome is not None else None
    return list(dict.fromkeys([*([base] if base else []), *source_models(problem.config)]))


def _source_reference(problem, ref: str, fitness, objectives: Objectives, has_heldout: bool) -> ReferencePoint:
    """A source model as it is, scored with transformers in the search's dtype (a failure leaves it off the plot)."""
    import transformers

    from mergekit_evolve.export.report import display_names

    label = display_names([ref])[0]
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=problem.dtype).to(problem.device)
        values = _split_values(model, fitness, objectives, "fitness")
        heldout = _split_values(model, fitness, objectives, "heldout") if has_heldout else None
    except Exception as err:  # a reference is decoration; the front stands without it
        from mergekit_evolve.progress import note

        note(f"front: could not score source {label} ({type(err).__name__}: {str(err)[:120]}); left off the plot")
        return ReferencePoint(label=label, values=None)
    return ReferencePoint(label=label, values=values, heldout=heldout)


def _mark_heldout_front(points: list[FrontPoint], objectives: Objectives) -> list[FrontPoint]:
    """Which points stay non-dominated among the front's points when scored on held-out."""
    scored = [i for i, p in enumerate(points) if p.heldout is not None]
    kept = {scored[i] for i in nondominated([objectives.to_losses(points[i].heldout) for i in scored])}
    return [
        p.model_copy(update={"heldout_front": i in kept if p.heldout is not None else None})
        for i, p in enumerate(points)
    ]


def _recipe_text(problem, candidate, index: int, n: int, values: dict[str, float]) -> str | None:
    if not isinstance(candidate, PSCandidate) and fold_blocker(problem, candidate):
        return None  # front.json keeps the path
    where = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
    seed = f" --random-seed {problem.config.merge_seed}" if isinstance(candidate, PSCandidate) else ""
    header = (
        f"Evolved by mergekit-evo: point {n} of the Pareto front ({where} on the fitness split; evaluation {index}).\n"
        f"Build it: mergekit-yaml front/{n:02d}.yaml OUT{seed}"
    )
    return recipe_yaml(recipe_of(problem, candidate), header)


def parse_weights(text: str, objectives: list[str]) -> dict[str, float]:
    """``"script_math=0.7,script=0.3"`` -> weights per objective (objectives left out weigh 0)."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in objectives:
            raise InputError(
                f"--pick: {part!r} is not OBJECTIVE=WEIGHT over this run's objectives ({', '.join(objectives)}); "
                'e.g. --pick "' + ",".join(f"{o}=0.5" for o in objectives[:2]) + '"'
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise InputError(f"--pick: weight {value!r} of {name} is not a number") from None
        if weights[name] < 0:
            raise InputError(f"--pick: weight of {name} is negative ({value}); weights are >= 0")
    if not weights or sum(weights.values()) == 0:
        raise InputError('--pick: give at least one positive weight, e.g. --pick "' + objectives[0] + '=1"')
    return weights


def pick(front: Front, weights: dict[str, float]) -> FrontPoint:
    """The front point with the highest weighted sum of its objectives on the fitness split, each objective
    scaled to [0, 1] over the front (best = 1, so tokens and scores weigh alike); ties: the lower index."""

    ranges = {
        name: (min(p.values[name] for p in front.points), max(p.values[name] for p in front.points))
        for name in front.objectives
    }

    def utility(point: FrontPoint) -> float:
        total = 0.0
        for name, better in zip(front.objectives, front.higher_is_better):
            lo, hi = ranges[name]
            scaled = 1.0 if hi == lo else (point.values[name] - lo) / (hi - lo)
            total += weights.get(name, 0.0) * (scaled if better else 1.0 - scaled)
        return total

    return max(front.points, key=lambda p: (utility(p), -p.index))
