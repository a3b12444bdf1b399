"""The records of a run, as typed, frozen values: what one line of a run file or one JSON file holds.

    Outcome       scoring one candidate: fitness and per-task scores, or the error it failed with
    Evaluation    one line of evaluations.jsonl (and rescored.jsonl): where the candidate sits + its outcome
    StageResult   racing only: one line of racing.jsonl (a candidate's score on one part of the rows)
    ValidationEntry  dfs.validation only: one line of validation.jsonl
    Best          the best candidate so far (best.json adds the recipe or path it decodes to)
    Summary       summary.json: the finished search, its held-out scores and how they were obtained
    Front         front.json (optimizer.objectives): the non-dominated candidates, on fitness and held-out

Only ``search.rundir.RunDir`` reads and writes them; the JSON on disk is ``model_dump`` of these types, so
older run directories load as long as they hold these keys.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    always_written: ClassVar[tuple[str, ...]] = ()  # fields written even when None (readers test them)

    def to_json(self) -> dict[str, Any]:
        """The JSON on disk: fields that are None are left out at the top level (not inside nested values)."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if v is not None or k in self.always_written}


class RacingProgress(Record):
    """How far racing scored a candidate: the fraction of the rows, and the stage it was stopped at."""

    fraction: float
    stopped_at: int | None = None
    stages: int = 0


class RowResults(Record):
    """A subsampled evaluation's rows of one task and whether each was answered right ("1"/"0")."""

    rows: list[int]
    correct: str  # one character per row


class SubsampleResults(Record):
    """Economy subsampling: per task, the rows scored and their results; ``of``: the task's row count."""

    items: dict[str, RowResults]
    of: dict[str, int]


class Outcome(Record):
    """What building and scoring one candidate gave; ``fitness`` is None when it failed (``error``)."""

    fitness: float | None = None
    scores: dict[str, float] = {}
    error: str | None = None
    cached: bool = False  # an equal recipe was scored before: its result, not a new evaluation
    time: float | None = None  # unix time the evaluation started
    seconds: float = 0.0
    merge_seconds: float | None = None
    tokens: int = 0  # forward tokens spent
    generated: dict[str, float] | None = None  # generate tasks: mean answer tokens per row (objective ``tokens``)
    items: dict[str, str] | None = None  # optimizer.kind m2n2: per task, "1"/"0" per fitness row in row order
    racing: RacingProgress | None = None
    subsample: SubsampleResults | None = None
    rows: dict[str, int] | None = None  # racing stages: rows scored per task in this part
    worker: int | None = None  # Ray: the worker's process id
    always_written: ClassVar[tuple[str, ...]] = ("fitness", "error")

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def complete(self) -> bool:
        """Scored on every fitness row (not stopped early by racing, not on an economy subsample): safe
        to reuse for equal recipes and to become the best."""
        if self.subsample is not None:
            return False
        return self.racing is None or self.racing.stopped_at is None

    @classmethod
    def failure(cls, error: str, **fields: Any) -> Outcome:
        return cls(fitness=None, error=error, **fields)


class Position(Record):
    """Where a candidate sits in the run: its number, generation and place in it, genome and recipe key."""

    index: int
    generation: int
    candidate: int
    genome: list[float]
    key: str | None = None  # hash of the decoded recipe/path: equal keys score equally

    @property
    def position(self) -> Position:
        return Position(**{name: getattr(self, name) for name in Position.model_fields})


class Evaluation(Outcome, Position):
    """One evaluated candidate (a line of evaluations.jsonl; rescored.jsonl adds the economy estimate)."""

    estimate: float | None = None
    estimate_source: str | None = None

    @classmethod
    def of(cls, position: Position, outcome: Outcome, **extra: Any) -> Evaluation:
        return cls(**dict(position), **dict(outcome), **extra)

    def beats(self, best: Best | None) -> bool:
        """Better than ``best``; ties go to the earlier candidate, whatever order workers finished in."""
        if self.fitness is None or not self.complete:  # a raced-out estimate never becomes the best
            return False
        return best is None or (self.fitness, -self.index) > (best.fitness, -best.index)


class StageResult(Record):
    """Racing: one candidate's result on one stage (part of the rows), so a resumed generation skips it."""

    generation: int
    candidate: int
    stage: int
    result: Outcome


class Best(Position):
    fitness: float
    scores: dict[str, float] = {}

    @classmethod
    def of(cls, evaluation: Evaluation) -> Best:
        return cls(**dict(evaluation.position), fitness=evaluation.fitness, scores=evaluation.scores)


class BestResult(Best):
    """The search's best with its held-out scores (in summary.json)."""

    heldout: dict[str, float] | None = None
    heldout_total: float | None = None


class Summary(Record):
    """summary.json: a finished search (a ps+dfs run: the DFS stage's, with both stages in ``stages``)."""

    space: str
    best: BestResult
    evaluations: int
    generations: int
    failures: int
    wall_seconds: float
    selected_on: list[dict[str, Any]] = []
    history: list[tuple[int, int, float | None]] = []  # (generation, evaluations, best fitness)
    fitness_source: dict[str, str] = {}
    tokens: int = 0
    stop_reason: str = "max_evals"
    economy: dict[str, Any] | None = None
    validation: ValidationDecision | None = None  # dfs.validation (search/validation.py)
    stages: dict[str, Summary] | None = None
    front_size: int | None = None  # optimizer.objectives: points in front.json


class FrontPoint(Position):
    """One non-dominated candidate of a multi-objective run."""

    fitness: float  # the weighted fitness (what best.yaml is chosen by)
    values: dict[str, float]  # each objective on the fitness split (scores; tokens per answer)
    heldout: dict[str, float] | None = None  # the same on the held-out split (None: a task has none)
    heldout_front: bool | None = None  # also non-dominated among the front's points on held-out
    recipe: str | None = None  # front/NN.yaml (None: a DFS path that does not fold)
    path: dict[str, Any] | None = None  # DFS: the path, as best.json keeps it


class ReferencePoint(Record):
    """Something the front is drawn against: a source model, or the search's start recipe."""

    label: str
    values: dict[str, float] | None
    heldout: dict[str, float] | None = None


class Front(Record):
    """front.json: the Pareto front of a multi-objective run (``optimizer.objectives``), best first objective first."""

    objectives: list[str]
    higher_is_better: list[bool]
    reference: list[float]  # the hypervolume's reference point, in the objectives' own units
    hypervolume: float  # of the front on the fitness split
    heldout_hypervolume: float | None = None
    points: list[FrontPoint]
    references: list[ReferencePoint] = []  # the sources and the start, on the same objectives


class ArchiveMember(Position):
    """A member of M2N2's final archive."""

    fitness: float  # the weighted fitness (fitness split)
    shared_fitness: float  # its share of the rows, as M2N2 ranks it
    scores: dict[str, float]
    solved_alone: int  # fitness rows no other member answers
    recipe: str  # archive/NN.yaml


class Descent(Record):
    """One step of a lineage: a candidate and how it was made (``source``: it is that source model)."""

    index: int
    source: str | None = None
    parents: list[int] | None = None  # evaluation indices of parent A and parent B
    split: int | None = None  # before this position (0 = embeddings, 1.. = layer groups) the ratio is w
    w: float | None = None


class Archive(Record):
    """archive.json: M2N2's final archive, its coverage of the fitness rows, and how the best was made."""

    members: list[ArchiveMember]  # by shared fitness, highest first
    rows: dict[str, int]  # fitness rows per task
    covered: dict[str, int]  # rows at least one member answers
    best_member_covers: dict[str, int]  # rows the best member (by weighted fitness) answers
    positions: list[str]  # what each split position is (embeddings, layer groups)
    splits: list[int]  # the split position of every child, in evaluation order
    lineage: list[Descent]  # the run's best, then its parents' lineages (each candidate once)


class BestFile(Best):
    """best.json: the best candidate and what it decodes to (PS: the recipe; DFS: the path)."""

    recipe: dict[str, Any] | None = None
    path: dict[str, Any] | None = None


class RunInfo(Record):
    """run.json: how the run was started, so ``resume`` continues it the same way."""

    device: str = "auto"
    save_model: bool = True
    version: str | None = None


class Contender(Record):
    """One side of the DFS validation comparison: its record and its score on the held-back rows."""

    record: Best
    validation: float


class ValidationDecision(Record):
    """dfs.validation: the search's best against the start path on rows the search never selected on."""

    rows: dict[str, int]
    start: Contender
    search_best: Contender
    difference: float
    standard_error: float
    z: float
    kept: Literal["start", "search_best"]


class ValidationEntry(Record):
    """One line of validation.jsonl: a contender's per-row results ("1"/"0" per row), or the decision."""

    role: Literal["start", "search_best"] | None = None
    record: Best | None = None
    correct: dict[str, str] | None = None
    decision: ValidationDecision | None = None


Summary.model_rebuild()  # its ``validation`` field names a type defined after it
