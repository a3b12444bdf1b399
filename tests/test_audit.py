"""Security audit of what a run leaves behind, and of foreign code in source models.

1. A real ``mergekit-evo run`` (and ``push --dry-run``) in a fresh process whose HOME is a temp folder
   and whose environment holds a recognisable fake HF_TOKEN: no file of the run directory (nor of the
   folder that would be uploaded) contains the token or the HOME path, the recipe is plain YAML, and
   no pickle checkpoint is left except optimizer.pkl.
2. Source models whose config.json has an ``auto_map`` naming Python files that write a marker file
   when imported: nothing runs them (mergekit-evo has no trust_remote_code setting; it must never
   pass True); a known architecture merges as plain weights, an unknown one fails as bad input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergekit_evolve import runner
from mergekit_evolve.config import parse_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.zoo.random_models import make_random_model

TOKEN = "hf_AUDITfakeTOKENdoNotLeak0123456789zz"

# One interpreter for both commands (each fresh interpreter costs seconds of imports).
DRIVER = r"""
import sys
from mergekit_evolve.cli import main
config, out, pushed = sys.argv[1:]
main(["run", config, "--out", out, "--quiet"], standalone_mode=False)
main(["push", out, "--repo", "audit/evolved", "--dry-run", pushed], standalone_mode=False)
"""


def write_rows(path: Path, start: int) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(start, start + 8))
    )
    return path


def small_config(models: list[Path], data: Path, **extra) -> dict:
    return {
        "genome": {
            "models": [str(m) for m in models[1:]],
            "base_model": str(models[0]),
            "merge_method": "dare_ties",
            "layer_granularity": 0,
        },
        "fitness": {
            "tasks": [
                {
                    "name": "ppl",
                    "kind": "perplexity",
                    "data": str(write_rows(data / "fit.jsonl", 0)),
                    "heldout": str(write_rows(data / "heldout.jsonl", 50)),
                }
            ]
        },
        "optimizer": {"max_evals": 4, "popsize": 4, "seed": 0},
        "dtype": "float32",
        **extra,
    }


def test_run_directory_holds_no_token_no_home_path_and_no_pickled_weights(tmp_path):
    home, out, pushed = tmp_path / "home", tmp_path / "out", tmp_path / "pushed"
    home.mkdir()
    models = [make_random_model(tmp_path / "models" / f"m{i}", seed=i, num_layers=2, hidden_size=16) for i in range(3)]
    config = tmp_path / "evo.yaml"
    config.write_text(yaml.safe_dump(small_config(models, tmp_path)))
    assert not any(str(p).startswith(str(home)) for p in [*models, out, config])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "XDG_", "MERGEKIT_EVOLVE"))}
    env.update(HOME=str(home), HF_TOKEN=TOKEN, HUGGING_FACE_HUB_TOKEN=TOKEN, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(config), str(out), str(pushed)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    files = [p for root in (out, pushed) for p in sorted(root.rglob("*")) if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files if p.is_relative_to(out)}
    # every artifact is there, so the audit below covers it
    assert {
        "config.yaml",
        "run.json",
        "evaluations.jsonl",
        "optimizer.pkl",
        "best.yaml",
        "best.json",
        "summary.json",
        "model/config.json",
    } <= names, names
    assert any(n.startswith("model/") and n.endswith(".safetensors") for n in names)
    assert (pushed / "README.md").is_file()
    secrets = {"HF_TOKEN": TOKEN.encode(), "HOME": str(home).encode()}
    real_home = os.path.expanduser("~")
    if len(real_home) > 1:
        secrets["the caller's HOME"] = (real_home.rstrip("/") + "/").encode()
    leaks = [
        f"{what} in {p}"
        for p in files
        for what, secret in secrets.items()
        if secret in p.read_bytes() or secret in str(p).encode()
    ]
    leaks += [
        f"{what} in stdout/stderr" for what, secret in secrets.items() if secret.decode() in done.stdout + done.stderr
    ]
    assert leaks == []

    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert isinstance(recipe, dict) and recipe["merge_method"] == "dare_ties"
    pickles = [
        p.relative_to(tmp_path).as_posix() for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")
    ]
    assert pickles == ["out/optimizer.pkl"]


EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("imported " + __name__)
"""


def make_evil_model(path: Path, seed: int, marker: Path, model_type: str | None = None) -> Path:
    """A random checkpoint whose config.json / tokenizer_config.json point at code that leaves a marker."""
    make_random_model(path, seed=seed, num_layers=2, hidden_size=16)
    for name in ("evil_config", "evil_model", "evil_tokenizer"):
        (path / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    if model_type:
        config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    tok = path / "tokenizer_config.json"
    if tok.is_file():
        data = json.loads(tok.read_text())
        data["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
        tok.write_text(json.dumps(data))
    return path


def test_source_models_with_auto_map_code_never_run_it(tmp_path):
    marker = tmp_path / "REMOTE_CODE_RAN"
    models = [make_evil_model(tmp_path / "models" / f"m{i}", i, marker) for i in range(3)]
    config = parse_config(small_config(models, tmp_path))
    # a known architecture (llama): the search merges plain weights, the custom code is ignored
    summary = runner.start(config, tmp_path / "out", device="cpu", progress=False)
    assert summary.evaluations == 4 and summary.best.fitness is not None
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert not any((tmp_path / "out" / "model").glob("evil_*.py"))
    assert not marker.exists(), marker.read_text()

    # an architecture only the custom code knows: refused as bad input, before anything is written
    alien = [make_evil_model(tmp_path / "alien" / f"m{i}", i, marker, model_type="evil-arch") for i in range(3)]
    with pytest.raises(InputError, match=r"genome\.models\[0\]: cannot read the config"):
        runner.start(parse_config(small_config(alien, tmp_path)), tmp_path / "out2", device="cpu", progress=False)
    assert not (tmp_path / "out2").exists()
    assert not marker.exists(), marker.read_text()
