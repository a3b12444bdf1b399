"""The run configuration: one pydantic model for mergekit-evolve's format and our native additions.

mergekit-evolve configs (``genome:``, ``tasks:``, ``limit``, ``num_fewshot``, ``shuffle``,
``random_init``) validate unchanged. The native format adds, all optional:

    space: ps | dfs | ps+dfs
    genome:
      parameters:            # per merge parameter: bounds/init to search it, or a fixed value
        density: {bounds: [0.1, 1.0], init: 0.5}
        lambda: 1.0
      search: [weight, density]   # which parameters to evolve (default: per merge method)
    dfs: {repeats: 3, scales: matrix, ...}
    fitness: {tasks: [...], batch_size: 32}
    optimizer: {sigma0: 0.1667, popsize: null, max_evals: 100, seed: 0, ...}
    dtype: float32
    merge_seed: 0

``load_config`` turns every problem into one ``InputError`` line naming the field and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_evolve.errors import InputError
from mergekit_evolve.fitness.tasks import FitnessConfig

Scalar = bool | int | float | str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParameterSearch(Strict):
    """How one merge parameter is searched: its range and starting value (in parameter units)."""

    bounds: tuple[float, float]
    init: float | None = None

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.bounds
        if not lo < hi:
            raise ValueError(f"bounds [{lo}, {hi}] must have lower < upper")
        if self.init is not None and not lo <= self.init <= hi:
            raise ValueError(f"init {self.init} lies outside bounds [{lo}, {hi}]")
        return self


class GenomeConfig(Strict):
    """mergekit-evolve's ``genome:`` section, plus ``parameters`` and ``search``."""

    models: list[str] = Field(min_length=1)
    merge_method: str = "dare_ties"
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = Field(default=0, ge=0)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False
    # native additions
    parameters: dict[str, ParameterSearch | Scalar] = Field(default_factory=dict)
    search: list[str] | None = None
    # The paper tunes the embeddings, the final norm and lm_head too: give them parameters of their own
    # (one extra gene per searched parameter and model) instead of those of the first / last layer group.
    tune_embeddings: bool = False

    @field_validator("models", "base_model", mode="before")
    @classmethod
    def _model_references(cls, value: Any) -> Any:
        """mergekit-evolve takes mergekit model references: also ``{model: {path, revision}, lora: ...}``."""
        if isinstance(value, list):
            return [_model_reference(v) for v in value]
        return _model_reference(value)

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[str]) -> list[str]:
        if len(set(models)) != len(models):
            raise ValueError("models are listed twice; list each model once")
        return models


def _model_reference(value: Any) -> Any:
    """A mergekit ``ModelReference`` mapping -> its string form (``path@revision+lora``)."""
    if not isinstance(value, dict):
        return value
    from mergekit.common import ModelReference

    try:
        return str(ModelReference.model_validate(value))
    except ValidationError:
        raise ValueError(f"{value} is not a mergekit model reference; give a path or hub ID") from None


class LmEvalTask(Strict):
    """A mergekit-evolve ``tasks:`` entry (an lm-eval task or group); a bare string is its name."""

    name: str
    weight: float = 1.0
    metric: str = "acc,none"  # "METRIC,FILTER" as lm-eval reports it

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, (dict, LmEvalTask)):
            raise ValueError(f"{value!r} is not a task; give a task name or {{name: ..., weight: ..., metric: ...}}")
        return value


class DFSConfig(Strict):
    """Data-flow-space search settings (see ``mergekit_evolve.space.dfs``)."""

    models: list[str] | None = None  # default: genome.models (PS+DFS prepends the PS model)
    base_index: int = Field(default=0, ge=0)
    repeats: int = Field(default=3, ge=1)
    scales: Literal["matrix", "network"] = "matrix"
    network_hidden: int = Field(default=16, ge=1)
    # How the search explores paths (search/dfs_search.py). prescan: generations of block paths (runs of
    # consecutive layers, scales 1) evaluated before CMA-ES, which starts from the best of them; 0 = start
    # from model A's own path. indicator_flips: slots a CMA-ES sample flips on average at the start (the
    # indicators' own step; null = the scales' sigma0, as before). indicator_init: |indicator| of x0.
    prescan: int = Field(default=4, ge=0)
    indicator_flips: float | None = Field(default=1.5, gt=0)
    indicator_init: float = Field(default=0.5, gt=0)
    # space ps+dfs: the DFS stage's budget (default optimizer.max_evals, as the PS stage)
    max_evals: int | None = Field(default=None, ge=1)
    # Confirm the result on rows the search never selected on (search/validation.py). validation: the
    # fraction of each fitness task's rows held back from the DFS search; its best path replaces the start
    # path (model A's own layers: in ps+dfs the PS model) only when it beats it on those rows by more than
    # validation_z paired standard errors (1.645: one-sided 95%). null: 0.3 for the DFS stage of ps+dfs
    # when every fitness task scores accuracy (kind generate or choice), else 0 (off).
    validation: float | None = Field(default=None, ge=0, lt=1)
    validation_z: float = Field(default=1.645, ge=0)


class RacingConfig(Strict):
    """``optimizer.racing``: off unless present; ``racing: true`` takes these defaults."""

    stages: list[float] = [0.125, 0.25, 0.5, 1.0]  # cumulative fractions of the fitness rows
    z: float = Field(default=2.0, gt=0)  # width of the confidence bounds, in standard errors
    keep: int | None = Field(default=None, ge=1)  # ranks that must be exact; default CMA-ES's mu

    @model_validator(mode="after")
    def _check_stages(self) -> RacingConfig:
        s = self.stages
        if not s or s[-1] != 1.0 or any(not a < b for a, b in zip([0.0, *s], s)):
            raise InputError(
                f"optimizer.racing.stages: {s} must rise strictly from above 0 to exactly 1.0; e.g. [0.125, 0.25, "
                "0.5, 1.0]"
            )
        return self


class M2N2Config(Strict):
    """``optimizer.kind: m2n2`` (search/m2n2.py): the archive and the two mechanisms the paper ablates."""

    archive_size: int = Field(default=15, ge=2)  # the paper's LLM setting
    alpha: float = Field(default=1.0, ge=0)  # strength of competition (0: no fitness sharing, a plain GA)
    attraction: bool = True  # false: parent B uniformly at random
    split_points: bool = True  # false: one mixing ratio for the whole model


class OptimizerConfig(Strict):
    sigma0: float = Field(default=1 / 6, gt=0)
    popsize: int | None = Field(default=None, ge=1)  # >= 2 but for m2n2 (children per step; 1 = the paper)
    max_evals: int = Field(default=100, ge=1)
    seed: int = Field(default=0, ge=0)
    init: Literal["default", "random"] = "default"
    diagonal: bool = False  # separable CMA-ES: for genomes of thousands of dimensions
    restarts: int = Field(default=0, ge=0)  # IPOP restarts (population doubled) when CMA-ES converges
    max_failures: int | None = Field(default=None, ge=0)  # default: half the budget
    racing: RacingConfig | None = None  # stop hopeless candidates early (search/racing.py); true = defaults
    # Fewer forward tokens to the same result (search/economy.py): off | subsample | stop | auto (both)
    economy: Literal["off", "subsample", "stop", "auto"] = "off"
    # Multi-objective search (search/objectives.py): two or three fitness task names and/or ``tokens`` (mean
    # generated tokens per item, lower is better); the run also returns a Pareto front (front.json).
    objectives: list[str] | None = None
    # The worst value worth keeping per objective (the hypervolume's reference point); default: a score of 0
    # for tasks (accuracies), the longest answer (max_new_tokens) for tokens. Set it for scores below 0.
    reference: dict[str, float] | None = None
    # The search strategy (search/strategies.py): auto = cmaes for one objective, como-cmaes for several.
    kind: Literal["auto", "cmaes", "como-cmaes", "nsga2", "m2n2"] = "auto"
    kernels: int | None = Field(default=None, ge=2)  # como-cmaes: CMA-ES kernels (front points); default 5
    m2n2: M2N2Config = Field(default_factory=lambda: M2N2Config())  # kind: m2n2 (search/m2n2.py)

    @model_validator(mode="after")
    def _check_objectives(self) -> OptimizerConfig:
        objectives, kind = self.objectives, self.kind
        if objectives is not None:
            if not 2 <= len(objectives) <= 3:
                raise ValueError(
                    f"objectives: {len(objectives)} given; give two or three (task names or tokens), or remove "
                    "objectives for a single weighted fitness"
                )
            twice = sorted({name for name in objectives if objectives.count(name) > 1})
            if twice:
                raise ValueError(f"objectives: {twice[0]!r} appears twice; each objective must be a different one")
            for setting, name in ((self.racing, "racing"), (self.economy != "off", f"economy: {self.economy}")):
                if setting:
                    raise ValueError(
                        f"objectives: {name} ranks candidates by one number and cannot serve a multi-objective "
                        f"search; remove {name.split(':')[0]}"
                    )
        unknown = sorted(set(self.reference or {}) - set(objectives or []))
        if unknown:
            raise ValueError(f"reference: {unknown[0]!r} is not one of the objectives; name objectives only")
        multi = kind in ("como-cmaes", "nsga2")
        if multi and objectives is None:
            raise ValueError(f"kind: {kind} is multi-objective; add objectives: [task_a, task_b] (or tokens)")
        if kind == "cmaes" and objectives is not None:
            raise ValueError("kind: cmaes optimizes one weighted fitness; with objectives use como-cmaes or nsga2")
        if kind == "m2n2":
            for setting, name in (
                (objectives, "objectives"),
                (self.racing, "racing"),
                (self.economy != "off", f"economy: {self.economy}"),
                (self.restarts, "restarts"),
            ):
                if setting:
                    raise ValueError(
                        f"kind: m2n2 keeps an archive scored on every fitness row with one weighted fitness; "
                        f"remove {name.split(':')[0]}"
                    )
        if self.popsize == 1 and self.strategy != "m2n2":
            raise ValueError(
                f"popsize: {self.strategy} needs at least 2 candidates per generation; use popsize: 2 or more"
            )
        if self.kernels is not None and self.strategy != "como-cmaes":
            raise ValueError("kernels: only como-cmaes has kernels; remove it or set kind: como-cmaes")
        return self

    @property
    def strategy(self) -> str:
        """The strategy that runs: ``kind``, with auto resolved by the number of objectives."""
        if self.kind != "auto":
            return self.kind
        return "como-cmaes" if self.objectives else "cmaes"

    @field_validator("economy", mode="before")
    @classmethod
    def _economy_shorthand(cls, value: Any) -> Any:
        return "off" if value is False else "auto" if value is True else value  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _check_economy(self) -> OptimizerConfig:
        if self.racing is not None and self.economy in ("subsample", "auto"):
            raise InputError(
                f"optimizer.economy: {self.economy} scores whole generations on subsamples and cannot be combined "
                "with racing; remove racing or use economy: stop"
            )
        return self

    # The budget in whole generations: max_evals = popsize * generations (the paper's DFS: 128 x 100).
    generations: int | None = Field(default=None, ge=1)

    @field_validator("racing", mode="before")
    @classmethod
    def _racing_shorthand(cls, value: Any) -> Any:
        return {} if value is True else None if value is False else value

    @model_validator(mode="after")
    def _budget_in_generations(self) -> OptimizerConfig:
        if self.generations is None:
            return self
        if self.popsize is None:
            raise ValueError(
                "generations needs popsize too (the budget is popsize x generations); e.g. popsize: 128, "
                "generations: 100"
            )
        budget = self.popsize * self.generations
        if "max_evals" in self.model_fields_set and self.max_evals != budget:
            raise ValueError(
                f"max_evals {self.max_evals} contradicts popsize x generations = {budget}; give one of the two"
            )
        self.max_evals = budget
        return self


class ExecutorConfig(Strict):
    """Where candidates are evaluated. ``ray``: one worker per GPU (or CPU slot), needs the ray extra."""

    kind: Literal["local", "ray"] = "local"
    workers: int | None = Field(default=None, ge=1)  # default: GPUs (cuda) or CPUs of the cluster
    address: str | None = None  # a `ray start` cluster; default $RAY_ADDRESS or a local cluster
    threads_per_worker: int | None = Field(default=None, ge=1)


class WandbConfig(Strict):
    """Optional Weights & Biases logging (extra ``wandb``); off unless this section is present."""

    project: str
    entity: str | None = None
    name: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None


class EvolveConfig(Strict):
    space: Literal["ps", "dfs", "ps+dfs"] = "ps"
    genome: GenomeConfig | None = None
    template: dict[str, Any] | None = None  # a mergekit YAML with {evolve: [lo, hi]} markers
    dfs: DFSConfig = Field(default_factory=DFSConfig)
    fitness: FitnessConfig | None = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    wandb: WandbConfig | None = None
    dtype: str | None = None  # default: bfloat16 on CUDA, else the sources' dtype
    merge_seed: int = Field(default=0, ge=0)  # mergekit's --random-seed for DARE-style methods
    merge_fast_path: bool = True  # precomputed state for sparsifying methods (mergekit_evolve.merge.fastpath)
    # mergekit-evolve's lm-eval fitness fields
    tasks: list[LmEvalTask] | None = None
    heldout_tasks: list[LmEvalTask] | None = None  # lm-eval tasks scored for the report only
    task_search_path: list[str] | None = None  # folders of local lm-eval task YAMLs
    # lm-eval prompt format, as in mergekit-evolve (which defaults both to true). null: true when the
    # tokenizer has a chat template, false otherwise (where mergekit-evolve would fail).
    apply_chat_template: bool | None = None
    fewshot_as_multiturn: bool | None = None  # null: follows apply_chat_template
    allow_benchmark_tasks: bool = False  # see mergekit_evolve.fitness.guard
    allow_pickle_weights: bool = False  # load *.bin pickle checkpoints (they can run code); safetensors only by default
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    shuffle: bool = False
    random_init: bool = False

    @model_validator(mode="after")
    def _check(self):
        if (self.genome is None) == (self.template is None):
            raise ValueError(
                "give either a 'genome:' section or a mergekit recipe template (merge_method: ... with "
                "{evolve: [lo, hi]} markers), not both or neither"
            )
        if self.template is not None and self.space == "dfs":
            raise ValueError("space: a template recipe is a parameter-space search; use space: ps or ps+dfs")
        if self.builtin_fitness is None and not self.tasks:
            raise ValueError(
                "no fitness defined; add a 'fitness: {tasks: [...]}' section "
                "(or mergekit-evolve's 'tasks:' list of lm-eval tasks)"
            )
        if self.random_init:
            self.optimizer.init = "random"
        if self.optimizer.objectives:
            check_objectives(self)
        if self.space != "ps" and self.dfs.validation and not accuracy_fitness(self):
            raise InputError(
                f"dfs.validation: {self.dfs.validation} confirms the DFS result row by row, which needs built-in "
                "accuracy tasks (fitness.tasks of kind generate or choice); set dfs.validation: 0"
            )
        return self

    @property
    def builtin_fitness(self) -> FitnessConfig | None:
        """The built-in fitness tasks (``fitness.tasks``), or None when lm-eval's ``tasks:`` score the run."""
        return self.fitness if self.fitness is not None and self.fitness.tasks else None

    @property
    def backend(self) -> str:
        """What runs candidates for the fitness: ``hf`` (transformers) or ``vllm``."""
        return self.fitness.backend if self.fitness is not None else "hf"

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=False)
        return yaml.safe_dump(data, sort_keys=False)


def task_names(config: EvolveConfig) -> list[str]:
    """The names of the fitness tasks (built-in ``fitness.tasks`` or lm-eval's ``tasks:``)."""
    builtin = config.builtin_fitness
    return [t.name for t in (builtin.tasks if builtin is not None else config.tasks or [])]


def check_objectives(config: EvolveConfig) -> None:
    """Each objective a fitness task or ``tokens`` (which needs a built-in generate task to count)."""
    names = task_names(config)
    if config.space == "ps+dfs":
        raise InputError(
            "optimizer.objectives: space ps+dfs builds its DFS stage on one PS model; search a front with "
            "space: ps or space: dfs"
        )
    for objective in config.optimizer.objectives:
        if objective == "tokens":
            builtin = config.builtin_fitness
            if builtin is None or not any(t.kind == "generate" for t in builtin.tasks):
                raise InputError(
                    "optimizer.objectives: tokens counts the tokens a generate task's answers take; add a "
                    "fitness task of kind generate or remove tokens"
                )
        elif objective not in names:
            close = difflib.get_close_matches(objective, names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(
                f"optimizer.objectives: unknown objective {objective!r}{hint}; use fitness task names "
                f"({', '.join(names)}) or tokens"
            )


def accuracy_fitness(config: EvolveConfig) -> bool:
    """Built-in fitness tasks that all score accuracy row by row (what ``dfs.validation`` compares)."""
    from mergekit_evolve.fitness.evaluator import RACING_KINDS

    builtin = config.builtin_fitness
    return builtin is not None and all(task.kind in RACING_KINDS for task in builtin.tasks)


def _known_keys() -> set[str]:
    """Every key our config sections take, and a mergekit recipe's (a template sits at the top level)."""
    keys, todo = set(MERGEKIT_RECIPE_KEYS), [Strict]
    while todo:
        cls = todo.pop()
        keys |= set(getattr(cls, "model_fields", {}))
        todo += cls.__subclasses__()
    return keys


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # pydantic adds union-branch labels such as "function-after[_check(), ParameterSearch]": drop them
    parts = [str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p[:1].isupper()))]
    where = ".".join(parts) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), sorted(_known_keys()), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        msg = f"unknown key{hint}; remove it or check its spelling (see the README's config reference)"
    elif first["type"] == "missing":
        msg = "is required; add it"
    return f"{where}: {msg}"


# The top-level keys of a mergekit recipe (mergekit's MergeConfiguration), for spelling hints.
MERGEKIT_RECIPE_KEYS = (
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "out_dtype",
    "modules",
)

# Keys of ours that may sit next to a mergekit recipe template; everything else is the template.
TEMPLATE_SIDE_KEYS = {
    "space",
    "dfs",
    "fitness",
    "optimizer",
    "executor",
    "wandb",
    "heldout_tasks",
    "task_search_path",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "allow_benchmark_tasks",
    "allow_pickle_weights",
    "merge_seed",
    "merge_fast_path",
    "tasks",
    "limit",
    "num_fewshot",
    "shuffle",
    "random_init",
}


def split_template(data: dict) -> dict:
    """A mergekit YAML + our sections -> {template: <the mergekit part>, <our sections>}."""
    if "merge_method" not in data or "genome" in data or "template" in data:
        return data
    ours = {k: v for k, v in data.items() if k in TEMPLATE_SIDE_KEYS}
    template = {k: v for k, v in data.items() if k not in TEMPLATE_SIDE_KEYS}
    return {**ours, "template": template}


def parse_config(data: Any, base_dir: Path | None = None, source: str = "config") -> EvolveConfig:
    """Validate a config dict; relative data and model paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a YAML mapping with a 'genome:' section, got {type(data).__name__}")
    data = split_template(data)
    try:
        config = EvolveConfig.model_validate(data)
    except ValidationError as err:
        raise InputError(f"{source}: {_format_validation_error(err)}") from None
    return resolve_paths(config, base_dir or Path.cwd())


def check_task_search_path(paths: list[str], field: str) -> None:
    """Each folder of local lm-eval tasks must exist (else lm-eval reports only an unknown task name)."""
    for i, path in enumerate(paths):
        if not Path(path).is_dir():
            what = "is a file, not a folder" if Path(path).exists() else "does not exist"
            raise InputError(f"{field}[{i}]: {path} {what}; give the folder that holds your lm-eval task YAML files")


ZOO_PREFIX = "zoo:"


def _resolve_zoo(ref: str, field: str) -> str:
    """``zoo:NAME`` -> a zoo model; ``zoo:TASK/fitness`` or ``zoo:TASK/heldout`` -> a zoo data split.

    The seed-0 zoo ships with the package (mergekit_evolve/zoo/shipped): nothing is built.
    """
    from mergekit_evolve.zoo import build_zoo

    zoo = build_zoo()
    name, _, split = ref.removeprefix(ZOO_PREFIX).partition("/")
    if split:
        if name not in zoo.tasks or split not in ("fitness", "heldout"):
            raise InputError(
                f"{field}: {ref!r} is not a zoo data split; use zoo:TASK/fitness or zoo:TASK/heldout with TASK in "
                f"{sorted(zoo.tasks)}"
            )
        return str(getattr(zoo.tasks[name], split))
    if name not in zoo.models:
        raise InputError(f"{field}: {ref!r} is not a zoo model; use one of {['zoo:' + m for m in zoo.models]}")
    return str(zoo.models[name])


def _resolve_model(ref: str, base_dir: Path) -> str:
    """Local paths become absolute (mergekit's card step needs that offline); hub IDs stay."""
    if ref.startswith(ZOO_PREFIX):
        return _resolve_zoo(ref, "models")
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    if candidate.exists() or ref.startswith((".", "/", "~")):
        return str(candidate.resolve())
    return ref


def resolve_paths(config: EvolveConfig, base_dir: Path) -> EvolveConfig:
    data = config.model_dump(mode="python")
    genome = data["genome"]
    if genome is not None:
        genome["models"] = [_resolve_model(m, base_dir) for m in genome["models"]]
        for key in ("base_model", "tokenizer_source"):
            if genome.get(key) and genome[key] not in ("base", "union"):
                genome[key] = _resolve_model(genome[key], base_dir)
    if data["template"] is not None:
        data["template"] = _resolve_template_models(data["template"], base_dir)
    if data.get("task_search_path"):
        data["task_search_path"] = [str((base_dir / p).resolve()) for p in data["task_search_path"]]
        check_task_search_path(data["task_search_path"], "task_search_path")
    if data["dfs"].get("models"):
        data["dfs"]["models"] = [_resolve_model(m, base_dir) for m in data["dfs"]["models"]]
    if data.get("fitness"):
        for task in data["fitness"]["tasks"] or []:
            for key in ("data", "heldout", "fewshot_data"):
                if task.get(key) is not None and str(task[key]).startswith(ZOO_PREFIX):
                    task[key] = _resolve_zoo(str(task[key]), f"fitness.tasks.{task['name']}.{key}")
                elif task.get(key) is not None and not Path(task[key]).is_absolute():
                    task[key] = str((base_dir / task[key]).resolve())
    return EvolveConfig.model_validate(data)


def _resolve_template_models(node: Any, base_dir: Path) -> Any:
    if isinstance(node, dict):
        return {
            k: _resolve_model(v, base_dir)
            if k in ("model", "base_model") and isinstance(v, str)
            else _resolve_template_models(v, base_dir)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_resolve_template_models(v, base_dir) for v in node]
    return node


def source_models(config: EvolveConfig) -> list[str]:
    """The models a PS search merges (genome models, or those a template references)."""
    if config.genome is not None:
        return list(config.genome.models)
    from mergekit_evolve.space.template import TemplateSpace

    return TemplateSpace(config.template).referenced_models()


def load_config(path: str | Path) -> EvolveConfig:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found; pass the path of a YAML config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}; fix the syntax") from None
    return parse_config(data, base_dir=path.parent.absolute(), source=str(path))


def load_any_config(path: str | Path, overrides: dict[str, Any]) -> EvolveConfig:
    """Load a config file and apply CLI overrides (``optimizer.max_evals`` etc.)."""
    config = load_config(path)
    if not overrides:
        return config
    data = config.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:  # e.g. fitness.backend on a config scored by lm-eval tasks
                node[key] = {}
            node = node[key]
        node[leaf] = value
    return parse_config(data, source=str(path))
