"""Configuration of fitness tasks (pydantic, ``extra="forbid"``).

Type errors come from pydantic (``ValidationError``; ``load_fitness_config`` turns them into
``InputError``). Checks that need more than one field raise ``InputError`` directly, naming the task,
the field and the fix. Checks that need the file system (data files, importable callables) run when a
``Fitness`` is built, because relative paths resolve against the config file's folder only then.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergekit_evolve.errors import InputError

TaskKind = Literal["generate", "choice", "perplexity", "callable"]
Extraction = Literal["exact", "regex", "last_number"]


class TaskConfig(BaseModel):
    """One fitness task: a data file, how to prompt, how to score."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: TaskKind = "generate"
    data: Path  # fitness split (JSONL, JSON list or CSV); the only split selection ever sees
    heldout: Path | None = None  # scored for reports only, never for selection
    weight: float = 1.0
    limit: int | None = None  # first N fitness rows (after the optional shuffle and few-shot rows)
    shuffle: bool = False
    seed: int = 0  # seed of the shuffle
    num_fewshot: int = 0
    fewshot_data: Path | None = None  # few-shot pool; default: the first rows of `data` (then not scored)
    fewshot_separator: str = "\n\n"  # between few-shot examples and before the prompt
    prompt_field: str | None = "prompt"  # perplexity only: null scores whole `answer_field` texts
    answer_field: str = "answer"
    choices_field: str = "choices"
    label_field: str = "label"
    max_new_tokens: int = 16
    stop: list[str] = ["\n"]
    extract: Extraction = "exact"
    pattern: str | None = None  # extract: regex; the first capture group is the prediction
    choice_norm: bool = False  # choice: argmax of log-likelihood per character (lm-eval's acc_norm)
    perplexity_score: Literal["inverse", "log_likelihood"] = "inverse"
    apply_chat_template: bool = False
    function: str | None = None  # kind callable: "module:function", fn(model, tokenizer, rows, split)

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        for check in (_check_numbers, _check_extract, _check_kind_fields):
            check(self)
        return self

    def field_error(self, field: str, problem: str, fix: str) -> InputError:
        return InputError(f"tasks.{self.name}.{field}: {problem}; {fix}")


def _check_numbers(task: TaskConfig) -> None:
    if not task.name.strip():
        raise InputError("tasks.name: empty task name; give every task a name")
    if not task.weight > 0:
        raise task.field_error("weight", f"{task.weight} is not > 0", "use a positive weight")
    if task.limit is not None and task.limit < 1:
        raise task.field_error("limit", f"{task.limit} is < 1", "use a positive limit or null for all rows")
    if task.num_fewshot < 0:
        raise task.field_error("num_fewshot", f"{task.num_fewshot} is negative", "use 0 or more")
    if task.max_new_tokens < 1:
        raise task.field_error("max_new_tokens", f"{task.max_new_tokens} is < 1", "use 1 or more")
    if any(s == "" for s in task.stop):
        raise task.field_error("stop", "contains an empty string", "remove it (it would stop at once)")


def _check_extract(task: TaskConfig) -> None:
    if task.extract != "regex":
        if task.pattern is not None:
            raise task.field_error("pattern", "is only used with extract: regex", "remove it or set extract: regex")
        return
    if task.pattern is None:
        raise task.field_error(
            "pattern", "extract: regex needs a pattern", "add one with a capture group, e.g. 'answer is (\\d+)'"
        )
    try:
        compiled = re.compile(task.pattern)
    except re.error as exc:
        raise task.field_error("pattern", f"{task.pattern!r} is not a valid regex ({exc})", "fix the pattern") from None
    if compiled.groups < 1:
        raise task.field_error(
            "pattern",
            f"{task.pattern!r} has no capture group",
            "wrap the answer part in parentheses, e.g. 'answer is (\\d+)'",
        )


def _check_kind_fields(task: TaskConfig) -> None:
    if task.kind == "callable":
        if task.function is None or not re.fullmatch(r"[\w.]+:\w+", task.function):
            raise task.field_error(
                "function",
                f"kind callable needs 'module:function', got {task.function!r}",
                "e.g. function: my_tasks:score",
            )
        if task.num_fewshot:
            raise task.field_error(
                "num_fewshot", "is not used by kind callable", "set it to 0; the function builds its own prompts"
            )
        return
    if task.function is not None:
        raise task.field_error(
            "function", f"is only used with kind callable (this task is {task.kind})", "remove it or set kind: callable"
        )
    if task.prompt_field is None and task.kind != "perplexity":
        raise task.field_error(
            "prompt_field",
            f"null is only allowed for kind perplexity (this task is {task.kind})",
            "name the prompt field",
        )


class VllmSettings(BaseModel):
    """How the vLLM engine of ``backend: vllm`` is sized (one engine per worker; fitness/vllm_engine.py)."""

    model_config = ConfigDict(extra="forbid")

    dtype: str | None = None  # default: the dtype candidates are merged in (what mergekit-yaml writes)
    max_model_len: int | None = Field(default=None, ge=16)  # default: the model's context, at most 4096
    kv_cache_gb: float | None = Field(default=None, gt=0)  # KV cache size; default 1 on CPU, GPU: the share below
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)  # default: 90% of free GPU memory
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool | None = None  # default: True on CPU, False on CUDA (CUDA graphs)


class FitnessConfig(BaseModel):
    """All fitness tasks; the fitness of a candidate is their weighted mean score. ``backend`` says what runs
    the model: transformers (``hf``) or a vLLM engine (``vllm``). ``tasks`` may be left out when the config
    scores mergekit-evolve's lm-eval ``tasks:`` instead (the section then only picks the backend)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskConfig] | None = None
    batch_size: int = 32
    backend: Literal["hf", "vllm"] = "hf"
    vllm: VllmSettings = Field(default_factory=VllmSettings)

    @model_validator(mode="after")
    def _check(self) -> FitnessConfig:
        if self.tasks is not None and not self.tasks:
            raise InputError("fitness.tasks: no tasks; add at least one task")
        if self.batch_size < 1:
            raise InputError(f"fitness.batch_size: {self.batch_size} is < 1; use a positive batch size")
        seen: set[str] = set()
        for task in self.tasks or []:
            if task.name in seen:
                raise InputError(f"fitness.tasks: task name {task.name!r} is used twice; give every task its own name")
            seen.add(task.name)
        return self


def load_fitness_config(data: dict[str, Any] | FitnessConfig) -> FitnessConfig:
    """Validate a fitness config section; pydantic's errors become a one-line ``InputError``."""
    if isinstance(data, FitnessConfig):
        return data
    try:
        return FitnessConfig.model_validate(data)
    except ValidationError as exc:
        raise input_error_from(exc, prefix="fitness") from None


def input_error_from(exc: ValidationError, prefix: str) -> InputError:
    first = exc.errors()[0]
    where = ".".join([prefix, *(str(part) for part in first["loc"])])
    fix = "remove it" if first["type"] == "extra_forbidden" else "see the fitness section of the README"
    return InputError(f"{where}: {first['msg']}; {fix}")
