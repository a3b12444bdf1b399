"""What the search benchmarks share: a run that is reused when finished with the same config, and a section
of a markdown file that a benchmark owns (``<!-- begin: NAME -->`` ... ``<!-- end: NAME -->``)."""

from __future__ import annotations

from pathlib import Path

from mergekit_evolve import runner
from mergekit_evolve.config import load_config, parse_config


def finished_run(config_dict: dict, out: Path) -> Path:
    """``out`` holding a finished run of this config: reused when it is there (an interrupted benchmark
    continues), else run (CPU, no saved model)."""
    config = parse_config(config_dict)
    done = (out / "summary.json").exists() and load_config(out / "config.yaml").model_dump() == config.model_dump()
    if not done:
        runner.start(config, out, device="cpu", force=True, progress=False, save_model=False)
    return out


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the section between ``<!-- begin: name -->`` and ``<!-- end: name -->``."""
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)
