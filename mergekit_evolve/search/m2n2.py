"""M2N2 (Abrantes, Lange, Tang: "Competition and Attraction Improve Model Fusion", GECCO 2025, arXiv 2508.16204)
over mergekit recipes, behind the ask/tell surface of search/strategies.py.

An archive of models competes per item: each fitness row is a resource shared among the members that
answer it, so a member's fitness is ``f_i = sum_j c_j s_ij / (z_j^alpha + eps)`` with ``z_j = sum_k s_kj``
over the archive (and the candidate); specialists that answer what others cannot survive. Parent A is drawn
in proportion to ``f``; parent B by attraction, in proportion to ``sum_j c_j max(s_Bj - s_Aj, 0) / (z_j^alpha +
eps)`` (strong where A is weak). A child mixes the two at a random split point with a random ratio ``w``:
positions before the split get ``w A + (1 - w) B``, the others ``(1 - w) A + w B``. The child replaces the
archive member of lowest fitness (computed with the child) unless that member is the child itself.

Where this follows the paper and where it differs, and why:

* The archive starts from the source models (the paper's seeds), and until it is full every child comes
  from two members drawn uniformly (the paper: "the seed models merge randomly amongst themselves").
* Members are linear recipes over the sources: the genome is mergekit ``linear`` weights per layer group and
  source (``genome.merge_method: linear``, weights in [0, 1]). Mixing two members **linearly** keeps every
  child a linear combination of the sources, so each member is one mergekit recipe that ``mergekit-yaml``
  builds from the original sources (and the merge stays in memory, as for CMA-ES). The paper mixes the
  flattened parameters by SLERP, whose result is not a linear combination of the sources.
* Split points fall between layer groups (``genome.layer_granularity``; 1 = between any two layers), in
  the model's order: embeddings (with the final norm and lm_head when ``tune_embeddings``) first, then the
  layers. The paper splits its flattened parameter vector anywhere.
* No mutation (the paper uses none for its LLMs). ``c_j`` is the weight of item j's task (the paper: 1).
* ``popsize`` children are asked at once from the same archive (1 = the paper's one child per step); they
  join it one after another, in the order asked, so the result does not depend on which worker finished first.

The strategy's state (archive, lineage, generator) is pickled with the run after every generation, so a
resumed run asks the same children.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mergekit_evolve.errors import InputError, RunFailedError

EPS = 1e-8


@dataclass(frozen=True)
class Parentage:
    """How a child was made: its parents (evaluation indices), the split position and the mixing ratio."""

    a: int
    b: int
    split: int
    w: float


@dataclass
class Member:
    index: int  # evaluation index (evaluations.jsonl)
    genome: np.ndarray
    scores: np.ndarray  # per item, in [0, 1]


@dataclass
class M2N2:
    seeds: list[np.ndarray]  # the sources as genomes (one-hot weights)
    positions: np.ndarray  # per gene: its place in the model's order (split points fall between places)
    item_weights: np.ndarray  # c_j
    archive_size: int = 15
    alpha: float = 1.0
    attraction: bool = True
    split_points: bool = True
    popsize: int = 1
    seed: int = 0
    told = "items"  # what the loop tells it: each candidate's per-item results (search/loop.py)
    sigma = None
    archive: list[Member] = field(default_factory=list)
    lineage: dict[int, Parentage | None] = field(default_factory=dict)  # index -> parents (None: a source)
    evaluated: int = 0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self._asked: list[Parentage | None] = []
        self.n_positions = int(self.positions.max()) + 1

    # -- ask ---------------------------------------------------------------------------------------
    def ask(self) -> list[np.ndarray]:
        if self.evaluated == 0:  # the first generation: the sources themselves
            self._asked = [None] * len(self.seeds)
            return [s.copy() for s in self.seeds]
        if len(self.archive) < 2:
            raise RunFailedError(
                f"m2n2: {len(self.archive)} of the {len(self.seeds)} sources could be scored; mixing needs two"
            )
        children, self._asked = [], []
        fitness, weights = self.shared_fitness(), self._resource_weights()
        for _ in range(self.popsize):
            a, b = self._parents(fitness, weights)
            split = int(self.rng.integers(0, self.n_positions)) if self.split_points else self.n_positions
            w = float(self.rng.uniform(0.0, 1.0))
            children.append(self.mix(self.archive[a].genome, self.archive[b].genome, split, w))
            self._asked.append(Parentage(self.archive[a].index, self.archive[b].index, split, w))
        return children

    def mix(self, a: np.ndarray, b: np.ndarray, split: int, w: float) -> np.ndarray:
        """Before the split ``w a + (1 - w) b``, from it on ``(1 - w) a + w b`` (every gene of one place alike)."""
        before = self.positions < split
        return np.where(before, w * a + (1 - w) * b, (1 - w) * a + w * b)

    def _parents(self, fitness: np.ndarray, weights: np.ndarray) -> tuple[int, int]:
        n = len(self.archive)
        if n < self.archive_size:  # filling the archive: two members at random
            a, b = self.rng.choice(n, size=2, replace=False)
            return int(a), int(b)
        a = int(self.rng.choice(n, p=_normalized(fitness)))
        gain = self.attraction_to(a, weights) if self.attraction else np.ones(n)
        gain[a] = 0.0
        b = int(self.rng.choice(n, p=_normalized(gain)))
        return a, b

    def attraction_to(self, a: int, weights: np.ndarray | None = None) -> np.ndarray:
        """How much each member would add to member ``a``: the shared worth of the items it answers and ``a``
        does not, ``sum_j c_j max(s_bj - s_aj, 0) / (z_j^alpha + eps)``."""
        weights = self._resource_weights() if weights is None else weights
        scores = np.stack([m.scores for m in self.archive])
        return (np.maximum(scores - scores[a], 0.0) * weights).sum(axis=1)

    # -- fitness sharing ---------------------------------------------------------------------------
    def _resource_weights(self, extra: np.ndarray | None = None) -> np.ndarray:
        """``c_j / (z_j^alpha + eps)``: what answering item j is worth to a member of this archive (+ ``extra``)."""
        rows = [m.scores for m in self.archive] + ([extra] if extra is not None else [])
        z = np.stack(rows).sum(axis=0)
        return self.item_weights / (z**self.alpha + EPS)

    def shared_fitness(self, extra: np.ndarray | None = None) -> np.ndarray:
        """Each member's shared fitness (and ``extra``'s, last, when given)."""
        rows = [m.scores for m in self.archive] + ([extra] if extra is not None else [])
        return (np.stack(rows) * self._resource_weights(extra)).sum(axis=1)

    # -- tell --------------------------------------------------------------------------------------
    def tell(self, genomes, values) -> None:
        """``values``: each candidate's per-item scores (None when it failed), in the order asked."""
        for genome, scores, parentage in zip(genomes, values, self._asked):
            index = self.evaluated
            self.evaluated += 1
            self.lineage[index] = parentage
            if scores is None:
                continue  # a failed child never joins
            self._offer(Member(index, np.asarray(genome, dtype=np.float64), np.asarray(scores, dtype=np.float64)))
        self._asked = []

    def _offer(self, child: Member) -> None:
        if len(self.archive) < self.archive_size:
            self.archive.append(child)
            return
        fitness = self.shared_fitness(child.scores)
        worst = int(np.argmin(fitness))  # ties: the earlier member (as natural_niches' argmin)
        if worst < len(self.archive):
            self.archive[worst] = child

    def pending(self) -> dict[int, Parentage | None]:
        """How the candidates asked but not told were made (a last generation the budget cut short)."""
        return {self.evaluated + j: p for j, p in enumerate(self._asked)}

    def stop(self) -> dict:
        return {}


@dataclass(frozen=True)
class ItemResults:
    """How a candidate's per-item results become M2N2's score vector: the tasks in fitness order, each row
    weighted by its task's weight (``c_j``)."""

    tasks: tuple[str, ...]
    rows: tuple[int, ...]
    task_weights: tuple[float, ...]

    @classmethod
    def of(cls, fitness) -> ItemResults:
        rows, weights = fitness.num_rows("fitness"), fitness.weights()
        return cls(tuple(rows), tuple(rows.values()), tuple(weights[t] for t in rows))

    @property
    def item_weights(self) -> np.ndarray:
        return np.concatenate([np.full(n, w) for n, w in zip(self.rows, self.task_weights)])

    def scores(self, record) -> np.ndarray | None:
        """The record's 0/1 per item, or None when it failed or was not scored on every row."""
        items = record.items
        if record.failed or not items or any(len(items.get(t, "")) != n for t, n in zip(self.tasks, self.rows)):
            return None
        return np.array([c == "1" for t in self.tasks for c in items[t]], dtype=np.float64)


def _normalized(weights: np.ndarray) -> np.ndarray:
    total = float(weights.sum())
    if total <= 0:
        uniform = np.ones_like(weights)
        return uniform / uniform.sum()
    return weights / total


def m2n2_for(problem, opt, item_weights: np.ndarray) -> M2N2:
    """The strategy over a PS problem whose genome is ``linear`` weights in [0, 1] (``check_m2n2``)."""
    space = problem.space
    positions = np.array([_position(space, gene.group) for gene in space.genes])
    seeds = [
        np.array([1.0 if gene.model == m else 0.0 for gene in space.genes]) for m in range(len(space.genome.models))
    ]
    settings = opt.m2n2
    return M2N2(
        seeds=seeds,
        positions=positions,
        item_weights=np.asarray(item_weights, dtype=np.float64),
        archive_size=settings.archive_size,
        alpha=settings.alpha,
        attraction=settings.attraction,
        split_points=settings.split_points,
        popsize=opt.popsize or 1,
        seed=opt.seed,
    )


def _position(space, group: int) -> int:
    """The model's order: the embeddings (io group) first, then the layer groups."""
    if space.io_group is None:
        return group
    return 0 if group == space.io_group else group + 1


def check_m2n2(config, problem) -> None:
    """M2N2 mixes linear recipes over the sources and shares per-item results: say what is missing, in one line."""
    from mergekit_evolve.config import accuracy_fitness

    genome = config.genome
    if config.space != "ps" or genome is None:
        raise InputError(
            "optimizer.kind: m2n2 searches linear recipes over genome.models; use space: ps with a genome: section"
        )
    if genome.merge_method != "linear":
        raise InputError(
            f"optimizer.kind: m2n2 mixes linear merges of the sources (children stay mergekit recipes); set "
            f"genome.merge_method: linear (got {genome.merge_method})"
        )
    if len(genome.models) < 2:
        raise InputError("optimizer.kind: m2n2 needs at least two genome.models to mix")
    bounds = problem.space.bounds("weight")
    if tuple(bounds) != (0.0, 1.0) or problem.space.search != ["weight"]:
        raise InputError(
            "optimizer.kind: m2n2 evolves each source's weight in [0, 1] and nothing else; remove "
            "genome.parameters.weight bounds other than [0, 1] and genome.search"
        )
    if not accuracy_fitness(config):
        raise InputError(
            "optimizer.kind: m2n2 shares each fitness row among the models that answer it, which needs built-in "
            "accuracy tasks (fitness.tasks of kind generate or choice)"
        )
