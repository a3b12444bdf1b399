"""What an M2N2 run's archive becomes on disk: archive.json (members, coverage of the fitness rows, split
points, the best model's lineage) and archive/NN.yaml (each member's mergekit recipe over the sources)."""

from __future__ import annotations

import numpy as np

from mergekit_evolve.recipe.ps import recipe_yaml
from mergekit_evolve.search.m2n2 import M2N2, ItemResults
from mergekit_evolve.search.records import Archive, ArchiveMember, Descent
from mergekit_evolve.search.rundir import RunDir


def write_archive(problem, run_dir: RunDir, strategy: M2N2, items: ItemResults, best_index: int) -> Archive:
    records = {r.index: r for r in run_dir.read_evaluations()}
    shared = strategy.shared_fitness() if strategy.archive else np.zeros(0)
    order = sorted(range(len(strategy.archive)), key=lambda i: (-shared[i], strategy.archive[i].index))
    scores = np.stack([m.scores for m in strategy.archive]) if strategy.archive else np.zeros((0, 0))
    alone = (scores > 0) & (scores.sum(axis=0) == scores)  # rows only this member answers
    members, recipes = [], {}
    seed = problem.config.merge_seed
    for n, i in enumerate(order):
        member, record = strategy.archive[i], records[strategy.archive[i].index]
        name = f"archive/{n:02d}.yaml"
        header = (
            f"Evolved by mergekit-evo (M2N2): archive member {n} (evaluation {member.index}), fitness "
            f"{record.fitness:.4f}, shared fitness {shared[i]:.4g}.\n"
            f"Build it: mergekit-yaml {name} OUT --random-seed {seed}"
        )
        recipes[name] = recipe_yaml(problem.decode(member.genome).recipe, header)
        members.append(
            ArchiveMember(
                **dict(record.position),
                fitness=record.fitness,
                shared_fitness=float(shared[i]),
                scores=record.scores,
                solved_alone=int(alone[i].sum()),
                recipe=name,
            )
        )
    archive = Archive(
        members=members,
        rows=dict(zip(items.tasks, items.rows)),
        covered=_per_task(items, scores.max(axis=0) if len(scores) else None),
        best_member_covers=_per_task(items, _best_scores(strategy, records)),
        positions=_position_names(problem),
        splits=[p.split for _, p in sorted(strategy.lineage.items()) if p is not None],
        lineage=lineage(strategy, best_index, [str(m) for m in problem.space.genome.models]),
    )
    run_dir.write_archive(archive, recipes)
    return archive


def _per_task(items: ItemResults, answered: np.ndarray | None) -> dict[str, int]:
    if answered is None:
        return {t: 0 for t in items.tasks}
    out, start = {}, 0
    for task, n in zip(items.tasks, items.rows):
        out[task] = int(answered[start : start + n].sum())
        start += n
    return out


def _best_scores(strategy: M2N2, records) -> np.ndarray | None:
    if not strategy.archive:
        return None
    best = max(strategy.archive, key=lambda m: (records[m.index].fitness, -m.index))
    return best.scores


def _position_names(problem) -> list[str]:
    """What split position p means: the place of each layer group (and the embeddings) in the model's order."""
    from mergekit_evolve.export.report import group_label

    space = problem.space
    groups = [group_label(space, g) for g in range(space.n_groups)]
    return (["embeddings, norm, lm_head"] if space.io_group is not None else []) + groups


def lineage(strategy: M2N2, index: int, sources: list[str]) -> list[Descent]:
    """``index`` and its ancestors, each once, breadth first: how the model was bred from the sources."""
    made_of = {**strategy.lineage, **strategy.pending()}
    out, todo, seen = [], [index], set()
    while todo:
        i = todo.pop(0)
        if i in seen or i not in made_of:
            continue
        seen.add(i)
        made = made_of[i]
        if made is None:
            out.append(Descent(index=i, source=sources[i] if i < len(sources) else None))
            continue
        out.append(Descent(index=i, parents=[made.a, made.b], split=made.split, w=round(made.w, 6)))
        todo += [made.a, made.b]
    return out
