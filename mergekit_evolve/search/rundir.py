"""The run directory: the single source of truth of a run, safe to kill at any instant.

    config.yaml          resolved config (``mergekit-evo run`` accepts it as is)
    run.json             how the run was started (device, whether to save the model)
    evaluations.jsonl    one line per evaluated candidate, appended and fsynced
    racing.jsonl         racing only: one line per candidate and stage (a resumed generation skips them)
    rescored.jsonl       economy only: the finalists' full-split scores (search/economy.py)
    validation.jsonl     dfs.validation only: the start path and the search's best on held-back rows
    optimizer.pkl        CMA-ES state + counters after the last completed generation
    best.yaml / best.json   best recipe so far (plain mergekit YAML) and its numbers
    front.json, front/   optimizer.objectives only: the Pareto front and one recipe per point (NN.yaml)
    archive.json, archive/   optimizer.kind m2n2 only: the final archive and one recipe per member
    summary.json         the finished search
    model/               the merged best model (at the end)
    .lock                held (flock) by the process that runs the search

A ``ps+dfs`` run keeps each stage as a complete run directory of its own in ``ps/`` and ``dfs/``; the
DFS stage's best is the run's result (``final_stage``), and best.yaml / best.json / summary.json are
copied up to the top.

Every file except the .jsonl files is written to a temporary name and renamed into place, so a reader
(or a resumed run) sees either the old or the new version, never half of one. A torn last line of a
.jsonl file (killed mid-append) is ignored by every reader and cut off by the process that takes the
lock, before it appends again. Records are the typed values of ``search.records``.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from mergekit_evolve.atomic import atomic_write
from mergekit_evolve.errors import InputError
from mergekit_evolve.search.records import (
    Archive,
    BestFile,
    Evaluation,
    Front,
    Record,
    RunInfo,
    StageResult,
    Summary,
    ValidationEntry,
)

STAGES = ("ps", "dfs")  # the stages of a ps+dfs run, in order
R = TypeVar("R", bound=BaseModel)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None

    # -- layout ----------------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    info = property(lambda self: self.path / "run.json")
    evaluations = property(lambda self: self.path / "evaluations.jsonl")
    racing = property(lambda self: self.path / "racing.jsonl")
    rescored = property(lambda self: self.path / "rescored.jsonl")
    validation = property(lambda self: self.path / "validation.jsonl")
    state = property(lambda self: self.path / "optimizer.pkl")
    best_yaml = property(lambda self: self.path / "best.yaml")
    best_json = property(lambda self: self.path / "best.json")
    model = property(lambda self: self.path / "model")
    summary = property(lambda self: self.path / "summary.json")
    front_json = property(lambda self: self.path / "front.json")
    front_dir = property(lambda self: self.path / "front")
    archive_json = property(lambda self: self.path / "archive.json")
    archive_dir = property(lambda self: self.path / "archive")

    def is_run(self) -> bool:
        return self.config.is_file()

    # -- the stages of a ps+dfs run ----------------------------------------------------------------
    def stage(self, name: str) -> RunDir:
        """The run directory of one stage of a ps+dfs run (created on first use)."""
        if name not in STAGES:
            raise ValueError(f"internal: unknown stage {name!r}")
        stage = RunDir(self.path / name)
        stage.path.mkdir(exist_ok=True)
        return stage

    def staged(self) -> list[RunDir]:
        """The stages this folder holds (``[ps, dfs]`` for a ps+dfs run), or none."""
        return [RunDir(self.path / name) for name in STAGES if (self.path / name / "config.yaml").is_file()]

    def final_stage(self) -> RunDir:
        """The run directory whose best is the run's result (``dfs/`` of a ps+dfs run, else this one)."""
        stages = self.staged()
        return stages[-1] if stages else self

    def publish_final(self, summary: Summary, recipe_yaml: str | None) -> None:
        """A ps+dfs run: the final stage's best.json, the run's recipe (None: it has none) and the summary."""
        final = self.final_stage()
        if final.best_json.exists():
            shutil.copyfile(final.best_json, self.best_json)
        if recipe_yaml is not None:
            atomic_write(self.best_yaml, recipe_yaml)
        else:
            self.best_yaml.unlink(missing_ok=True)  # never a recipe of another result
        self.write_summary(summary)

    # -- creation and locking ----------------------------------------------------------------------
    def check_fresh(self, force: bool = False) -> None:
        """A new run may start here: the folder is absent or empty, or ``force`` lets it be wiped."""
        # A folder holding only our lock or write probe (a run killed before it wrote anything) counts as empty.
        if self.path.exists() and any(not _ours_to_ignore(p.name) for p in self.path.iterdir()) and not force:
            raise InputError(
                f"--out: {self.path} exists and is not empty; use `mergekit-evo resume {self.path}` "
                "to continue that run, --force to overwrite it, or another --out"
            )

    def prepare(self, *, fresh: bool, force: bool = False) -> None:
        """Create (or check) the folder and take its lock.

        ``fresh``: a new run. An existing non-empty folder is refused unless ``force`` (which wipes
        the run files) -- resuming must be asked for, never guessed.
        """
        if fresh:
            self.check_fresh(force)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise InputError(f"--out: cannot write to {self.path} ({err.strerror}); choose a writable folder") from None
        self.lock()
        if fresh and force:
            self.clear()

    def lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"{self.path}: another mergekit-evo process is running in this run directory; "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        for stale in [*self.path.glob(".*.tmp*"), *self.path.glob(".write-test*")]:  # left by a killed process
            stale.unlink(missing_ok=True)
        self.repair()

    def repair(self) -> None:
        """Cut a torn last line (a process killed mid-append) off every run file, before appending."""
        for path in (self.evaluations, self.racing, self.rescored, self.validation):
            good = _complete_prefix(path)
            if good is not None:
                with open(path, "r+b") as f:
                    f.truncate(good)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def clear(self) -> None:
        for child in self.path.iterdir():
            if child.name == ".lock":
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    # -- records -----------------------------------------------------------------------------------
    def append_evaluation(self, record: Evaluation) -> None:
        _append_jsonl(self.evaluations, record)

    def read_evaluations(self) -> list[Evaluation]:
        """In the order they were recorded (completion order); ``index`` gives the CMA-ES order."""
        return read_jsonl(self.evaluations, Evaluation)

    def append_stage(self, record: StageResult) -> None:
        _append_jsonl(self.racing, record)

    def read_stages(self) -> list[StageResult]:
        return read_jsonl(self.racing, StageResult)

    def append_rescored(self, record: Evaluation) -> None:
        _append_jsonl(self.rescored, record)

    def read_rescored(self) -> list[Evaluation]:
        return read_jsonl(self.rescored, Evaluation)

    def append_validation(self, entry: ValidationEntry) -> None:
        _append_jsonl(self.validation, entry)

    def read_validation(self) -> list[ValidationEntry]:
        return read_jsonl(self.validation, ValidationEntry)

    def write_best(self, best: BestFile, recipe_yaml: str | None) -> None:
        """best.json, and best.yaml when the best has a mergekit recipe (a DFS path that does not fold has none)."""
        self._write_record(self.best_json, best)
        if recipe_yaml is not None:
            atomic_write(self.best_yaml, recipe_yaml)

    def read_best(self) -> BestFile | None:
        return _read_record(self.best_json, BestFile)

    def read_best_yaml(self) -> str | None:
        return self.best_yaml.read_text() if self.best_yaml.is_file() else None

    def write_front(self, front: Front, recipes: dict[str, str]) -> None:
        """front/ (one recipe per point, named as ``front.points[i].recipe``), then front.json."""
        self._write_with_recipes(self.front_json, self.front_dir, front, recipes)

    def read_front(self) -> Front | None:
        return _read_record(self.front_json, Front)

    def write_archive(self, archive: Archive, recipes: dict[str, str]) -> None:
        """archive/ (one recipe per member), then archive.json."""
        self._write_with_recipes(self.archive_json, self.archive_dir, archive, recipes)

    def read_archive(self) -> Archive | None:
        return _read_record(self.archive_json, Archive)

    def _write_with_recipes(self, path: Path, folder: Path, record: Record, recipes: dict[str, str]) -> None:
        """The recipes first, then the record that names them: a reader that finds the record finds every
        recipe it names; recipes of an earlier version are removed."""
        folder.mkdir(exist_ok=True)
        for name, text in recipes.items():
            atomic_write(self.path / name, text)
        keep = {self.path / name for name in recipes}
        for old in folder.glob("*.yaml"):
            if old not in keep:
                old.unlink()
        self._write_record(path, record)

    def write_summary(self, summary: Summary) -> None:
        self._write_record(self.summary, summary)

    def read_summary(self) -> Summary | None:
        return _read_record(self.summary, Summary)

    def write_info(self, info: RunInfo) -> None:
        self._write_record(self.info, info)

    def read_info(self) -> RunInfo:
        return _read_record(self.info, RunInfo) or RunInfo()

    def write_config(self, config_yaml: str) -> None:
        atomic_write(self.config, config_yaml)

    # -- optimiser state ---------------------------------------------------------------------------
    def save_state(self, state: Any) -> None:
        atomic_write(self.state, pickle.dumps(state))

    def load_state(self) -> Any | None:
        if not self.state.exists():
            return None
        return pickle.loads(self.state.read_bytes())

    def _write_record(self, path: Path, record: Record) -> None:
        atomic_write(path, json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")


def _ours_to_ignore(name: str) -> bool:
    """Our lock and the write probe of a process killed at start: they do not make a folder non-empty."""
    return name == ".lock" or name.startswith(".write-test")


def _append_jsonl(path: Path, record: Record) -> None:
    line = json.dumps(record.to_json(), sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _complete_lines(raw: bytes) -> tuple[list[bytes], int]:
    """The complete JSON lines at the start of ``raw`` and their length in bytes."""
    lines, good = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        lines.append(line)
        good += len(line)
    return lines, good


def _complete_prefix(path: Path) -> int | None:
    """Bytes to keep when ``path`` ends in a torn line; None when there is nothing to cut."""
    if not path.exists():
        return None
    raw = path.read_bytes()
    good = _complete_lines(raw)[1]
    return good if good != len(raw) else None


def read_jsonl(path: Path, kind: type[R]) -> list[R]:
    """Every complete record of a run file, typed; a torn last line (killed mid-write) is left out."""
    if not path.exists():
        return []
    lines = _complete_lines(path.read_bytes())[0]
    return [kind.model_validate_json(line) for line in lines]


def _read_record(path: Path, kind: type[R]) -> R | None:
    return kind.model_validate_json(path.read_bytes()) if path.is_file() else None
