"""Writing files and folders so that a reader, or a process killed at any instant, never sees half of one.

``atomic_write`` (``atomic_file`` for writers that take a path): a file goes to a hidden temporary name, is
written (fsynced) and is renamed over the target.
``staged_folder``: a folder is written under a hidden sibling name and swapped in only when complete; an old
folder at the target is removed only once the new one is in place, and a failure leaves the target as it
was (and no staging folder behind).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary name next to ``path`` to write; on success it is renamed over ``path``. On any
    failure (a full disk, SIGTERM) the target keeps its old content and no temporary file stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def hidden_sibling(target: Path, tag: str) -> Path:
    """A fresh hidden name next to ``target`` (same filesystem, so renames are atomic)."""
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"


def replace_folder(new: Path, target: Path) -> None:
    """Move the folder ``new`` to ``target``; an old ``target`` is deleted only after ``new`` is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    old = hidden_sibling(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``target`` to write into; on success it replaces ``target``."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(target, "partial")
    staging.mkdir()
    try:
        yield staging
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
