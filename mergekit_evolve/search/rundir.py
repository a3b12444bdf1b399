"""The run directory: the single source of truth of a run, safe to kill at any instant.

    config.yaml          resolved config (``mergekit-evo run`` accepts it as is)
    evaluations.jsonl    one line per evaluated candidate, appended and fsynced
    racing.jsonl         racing only: one line per candidate and stage (a resumed generation skips them)
    rescored.jsonl       economy only: the finalists' full-split scores (search/economy.py)
    optimizer.pkl        CMA-ES state + counters after the last completed generation
    best.yaml / best.json   best recipe so far (plain mergekit YAML) and its numbers
    model/               the merged best model (at the end)
    .lock                held (flock) by the process that runs the search

Every file except evaluations.jsonl is written to a temporary name and renamed into place, so a
reader (or a resumed run) sees either the old or the new version, never half of one. A torn last
line of a .jsonl file (killed mid-append) is dropped on load.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
from pathlib import Path
from typing import Any

from mergekit_evolve.errors import InputError


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None

    # -- layout ----------------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    evaluations = property(lambda self: self.path / "evaluations.jsonl")
    stages = property(lambda self: self.path / "racing.jsonl")
    rescored = property(lambda self: self.path / "rescored.jsonl")
    state = property(lambda self: self.path / "optimizer.pkl")
    best_yaml = property(lambda self: self.path / "best.yaml")
    best_json = property(lambda self: self.path / "best.json")
    model = property(lambda self: self.path / "model")
    summary = property(lambda self: self.path / "summary.json")

    # -- creation and locking ----------------------------------------------------------------------
    def prepare(self, *, fresh: bool, force: bool = False) -> None:
        """Create (or check) the folder and take its lock.

        ``fresh``: a new run. An existing non-empty folder is refused unless ``force`` (which wipes
        the run files) -- resuming must be asked for, never guessed.
        """
        # A folder holding only our lock or write probe (a run killed before it wrote anything) counts as empty.
        if fresh and self.path.exists() and any(not _ours_to_ignore(p.name) for p in self.path.iterdir()):
            if not force:
                raise InputError(
                    f"--out: {self.path} exists and is not empty; use `mergekit-evo resume {self.path}` "
                    "to continue that run, --force to overwrite it, or another --out"
                )
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

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def clear(self) -> None:
        import shutil

        for child in self.path.iterdir():
            if child.name == ".lock":
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    # -- evaluations ---------------------------------------------------------------------------
    def append_evaluation(self, record: dict[str, Any]) -> None:
        _append_jsonl(self.evaluations, record)

    def read_evaluations(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.evaluations)

    def append_stage(self, record: dict[str, Any]) -> None:
        _append_jsonl(self.stages, record)

    def read_stages(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.stages)

    def append_rescored(self, record: dict[str, Any]) -> None:
        _append_jsonl(self.rescored, record)

    def read_rescored(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.rescored)

    # -- optimiser state ---------------------------------------------------------------------------
    def save_state(self, state: Any) -> None:
        atomic_write(self.state, pickle.dumps(state))

    def load_state(self) -> Any | None:
        if not self.state.exists():
            return None
        return pickle.loads(self.state.read_bytes())

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _ours_to_ignore(name: str) -> bool:
    """Our lock and the write probe of a process killed at start: they do not make a folder non-empty."""
    return name == ".lock" or name.startswith(".write-test")


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good_bytes = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_bytes += len(line)
    if good_bytes != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records
