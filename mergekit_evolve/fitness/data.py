"""Reading and checking task data (JSONL, JSON list or CSV) before any model runs.

Every problem becomes a one-line ``InputError`` that names the task, the field, the file position and the
fix, so bad data fails when the run starts instead of after the first merge.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_evolve.fitness.extract import last_number
from mergekit_evolve.fitness.tasks import TaskConfig

JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass
class Row:
    """A data row: the raw record plus where it came from (for error messages)."""

    values: dict[str, Any]
    where: str  # e.g. "line 4 of /data/x.jsonl"


@dataclass
class TaskRows:
    fitness: list[Row]
    heldout: list[Row] | None
    fewshot: list[Row]


def resolve(path: Path, base_dir: Path) -> Path:
    return path if path.is_absolute() else (base_dir / path)


def load_task_rows(task: TaskConfig, base_dir: Path) -> TaskRows:
    """All rows a task will ever use, checked; few-shot rows never come from the held-out split."""
    rows = read_checked(task, "data", resolve(task.data, base_dir))
    if task.shuffle:
        random.Random(task.seed).shuffle(rows)
    fewshot: list[Row] = []
    if task.num_fewshot:
        rows, fewshot = _split_off_fewshot(task, rows, base_dir)
    if task.limit is not None:
        rows = rows[: task.limit]
    heldout = None
    if task.heldout is not None:
        heldout = read_checked(task, "heldout", resolve(task.heldout, base_dir))
    return TaskRows(fitness=rows, heldout=heldout, fewshot=fewshot)


def _split_off_fewshot(task: TaskConfig, rows: list[Row], base_dir: Path) -> tuple[list[Row], list[Row]]:
    k = task.num_fewshot
    if task.fewshot_data is not None:
        pool = read_checked(task, "fewshot_data", resolve(task.fewshot_data, base_dir))
        if task.shuffle:
            random.Random(task.seed).shuffle(pool)
        if len(pool) < k:
            raise task.field_error(
                "num_fewshot",
                f"{k} few-shot examples asked, {task.fewshot_data} has {len(pool)} rows",
                "lower num_fewshot or add rows",
            )
        return rows, pool[:k]
    if len(rows) <= k:
        raise task.field_error(
            "num_fewshot",
            f"{k} few-shot examples come from the first rows of {task.data}, which has only {len(rows)} rows",
            "lower num_fewshot, add rows or give fewshot_data",
        )
    return rows[k:], rows[:k]


def read_checked(task: TaskConfig, field: str, path: Path) -> list[Row]:
    rows = read_rows(task, field, path)
    for row in rows:
        check_row(task, field, row)
    return rows


def read_rows(task: TaskConfig, field: str, path: Path) -> list[Row]:
    if not path.is_file():
        raise task.field_error(
            field, f"{path} does not exist", "fix the path (relative paths start at the config file's folder)"
        )
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _read_jsonl(task, field, path)
    elif suffix == ".json":
        rows = _read_json_list(task, field, path)
    elif suffix == ".csv":
        rows = _read_csv(task, field, path)
    else:
        raise task.field_error(
            field, f"{path} has an unknown format {suffix!r}", "use .jsonl, .json (a list of objects) or .csv"
        )
    if not rows:
        raise task.field_error(field, f"{path} has no rows", "add rows or point to the right file")
    return rows


def _read_jsonl(task: TaskConfig, field: str, path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"line {number} of {path}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise task.field_error(
                    field, f"{where} is not valid JSON ({exc.msg})", "fix that line (one JSON object per line)"
                ) from None
            rows.append(_as_row(task, field, value, where))
    return rows


def _read_json_list(task: TaskConfig, field: str, path: Path) -> list[Row]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise task.field_error(
            field, f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})", "fix the file"
        ) from None
    if not isinstance(value, list):
        raise task.field_error(
            field, f"{path} holds a JSON {type(value).__name__}, not a list of rows", "use a list of objects or JSONL"
        )
    return [_as_row(task, field, item, f"item {i} of {path}") for i, item in enumerate(value, start=1)]


def _read_csv(task: TaskConfig, field: str, path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for record in reader:
            where = f"line {reader.line_num} of {path}"
            if None in record:  # more cells than header names
                raise task.field_error(
                    field, f"{where} has more cells than the header", "quote cells that contain commas"
                )
            rows.append(Row(values=dict(record), where=where))
    return rows


def _as_row(task: TaskConfig, field: str, value: Any, where: str) -> Row:
    if not isinstance(value, dict):
        raise task.field_error(
            field, f"{where} is a JSON {type(value).__name__}, not an object", "write one object per row"
        )
    return Row(values=value, where=where)


# ---- per-kind row checks ---------------------------------------------------------------------


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def token_id_rows(task: TaskConfig, rows: list[Row]) -> bool:
    """True for a perplexity task whose rows hold token ids (lists of ints): it needs no tokenizer."""
    return (
        task.kind == "perplexity"
        and bool(rows)
        and all(isinstance(r.values.get(task.answer_field), list) for r in rows)
    )


def check_row(task: TaskConfig, field: str, row: Row) -> None:
    if task.kind == "callable":
        return  # the function decides what its rows mean
    if task.kind == "perplexity" and isinstance(row.values.get(task.answer_field), list):
        _check_token_id_row(task, field, row)
        return
    if task.prompt_field is not None:
        _text(task, field, row, task.prompt_field, "prompt_field", allow_empty=True)
    if task.kind == "generate":
        answer = _answer_text(task, field, row)
        if task.extract == "last_number" and last_number(answer) is None:
            raise task.field_error(
                field, f"{row.where}: answer {answer!r} has no number", "extract: last_number needs numeric answers"
            )
    elif task.kind == "perplexity":
        _text(task, field, row, task.answer_field, "answer_field", allow_empty=False)
    elif task.kind == "choice":
        choices = _choices(task, field, row)
        _label(task, field, row, len(choices))


def _check_token_id_row(task: TaskConfig, field: str, row: Row) -> None:
    """Perplexity on token ids: ``answer`` (and ``prompt``, if present) are lists of token ids."""
    answer = row.values[task.answer_field]
    prompt = row.values.get(task.prompt_field) if task.prompt_field is not None else None
    for name, value in ((task.answer_field, answer), (task.prompt_field, prompt)):
        if value is not None and not is_token_ids(value):
            raise task.field_error(
                field,
                f"{row.where}: field {name!r} is a list but not of token ids",
                "write non-negative integers, or text",
            )
    if len(answer) + len(prompt or []) < 2 or not answer:
        raise task.field_error(
            field,
            f"{row.where}: {task.answer_field!r} has no token to predict from another",
            "give at least two token ids in all",
        )
    if task.num_fewshot or task.apply_chat_template:
        raise task.field_error(
            field,
            f"{row.where}: token-id rows cannot take few-shot examples or a chat template",
            "use text rows, or set num_fewshot: 0 and apply_chat_template: false",
        )


def _require(task: TaskConfig, field: str, row: Row, name: str, setting: str) -> Any:
    if name not in row.values or row.values[name] is None:
        raise task.field_error(field, f"{row.where} has no field {name!r}", f"add it to every row or set {setting}")
    return row.values[name]


def _text(task: TaskConfig, field: str, row: Row, name: str, setting: str, allow_empty: bool) -> str:
    value = _require(task, field, row, name, setting)
    if not isinstance(value, str):
        raise task.field_error(
            field, f"{row.where}: field {name!r} is a {type(value).__name__}, not a string", "quote it"
        )
    if not allow_empty and not value:
        raise task.field_error(field, f"{row.where}: field {name!r} is empty", "remove the row or fill the field")
    return value


def answer_text(task: TaskConfig, values: dict[str, Any]) -> str:
    """The answer as text: JSON numbers (e.g. 42) are accepted and compared as written."""
    return str(values[task.answer_field])


def _answer_text(task: TaskConfig, field: str, row: Row) -> str:
    value = _require(task, field, row, task.answer_field, "answer_field")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise task.field_error(
            field, f"{row.where}: answer {value!r} is not text or a number", "write the answer as a string"
        )
    return answer_text(task, row.values)


def choice_list(task: TaskConfig, values: dict[str, Any]) -> list[str]:
    value = values[task.choices_field]
    return json.loads(value) if isinstance(value, str) else value  # CSV cells hold a JSON list


def _choices(task: TaskConfig, field: str, row: Row) -> list[str]:
    _require(task, field, row, task.choices_field, "choices_field")
    try:
        choices = choice_list(task, row.values)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise task.field_error(
            field,
            f"{row.where}: {task.choices_field!r} is not a list of non-empty strings",
            'write e.g. ["yes", "no"] (in CSV: a JSON list in one cell)',
        )
    if len(choices) < 2:
        raise task.field_error(
            field, f"{row.where}: {task.choices_field!r} has {len(choices)} choice", "give at least 2 choices"
        )
    return choices


def label_index(task: TaskConfig, values: dict[str, Any]) -> int:
    return int(values[task.label_field])


def _label(task: TaskConfig, field: str, row: Row, num_choices: int) -> None:
    value = _require(task, field, row, task.label_field, "label_field")
    valid = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.strip().isdigit()
    )
    if not valid:
        raise task.field_error(
            field, f"{row.where}: label {value!r} is not a choice index", f"use an integer from 0 to {num_choices - 1}"
        )
    label = label_index(task, row.values)
    if not 0 <= label < num_choices:
        raise task.field_error(
            field,
            f"{row.where}: label {label} is out of range for {num_choices} choices",
            f"use an integer from 0 to {num_choices - 1}",
        )
