"""``mergekit-evo push RUN_DIR --repo user/name``: publish an evolved merge on the Hugging Face Hub.

What is uploaded (``--dry-run DIR`` writes exactly this folder, plus ``DIR.push.json`` with the repo
id and privacy, and contacts nothing):

    README.md            the model card (``model_card.build_card``)
    report/*.png         the report's plots, linked from the card
    config.json, *.safetensors, tokenizer files, ...   the final model
                         (``--format standard``: RUN_DIR/model, or the DFS stage's model of a ps+dfs run;
                          ``--format custom``: the DFS layer-stack form with its modeling code)

The token comes from ``HF_TOKEN`` or the huggingface_hub login. It is only ever handed to
``HfApi`` (which sends it in the Authorization header): it is never written to the run directory, the
card or the dry-run folder, and error messages have it replaced by ``***``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from mergekit_evolve.atomic import atomic_write, staged_folder
from mergekit_evolve.errors import InputError
from mergekit_evolve.progress import step
from mergekit_evolve.search.rundir import RunDir

MAX_ERROR_CHARS = 400


class UploadPlan(BaseModel):
    """The repository to write and every file that goes into it (path in repo -> local file)."""

    repo_id: str
    private: bool
    fmt: str
    files: dict[str, Path]


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise InputError(
            f"--repo: {repo_id!r} is not of the form user/name (or org/name); e.g. --repo alice/my-evolved-merge"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(f"--repo: {err}; use letters, digits, '-', '_' and '.' in user/name") from None
    return repo_id


def resolve_token() -> str:
    """``HF_TOKEN``, else the token saved by ``hf auth login``."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        import huggingface_hub

        try:
            token = huggingface_hub.get_token()
        except Exception:  # e.g. a failed OIDC exchange: treat as "no token", say how to fix it
            token = None
    if not token:
        raise InputError(
            "push: no Hugging Face token found; set HF_TOKEN or run `hf auth login` (or use --dry-run DIR)"
        )
    return token


@contextmanager
def staged_upload(
    run_dir: str | Path,
    *,
    repo_id: str,
    private: bool = False,
    fmt: str = "standard",
    results: list[dict] | None = None,
    base_models: list[str] | None = None,
    device: str = "cpu",
    pick: str | None = None,
) -> Iterator[UploadPlan]:
    """Build everything to upload in a temporary folder (the run directory is only read)."""
    from mergekit_evolve.export.final import export_run, picked_point
    from mergekit_evolve.export.model_card import build_card
    from mergekit_evolve.export.report import render_report

    root = Path(run_dir).absolute()
    with tempfile.TemporaryDirectory(prefix="mergekit-evo-push-") as tmp:
        work = Path(tmp)
        _, images = render_report(root, work / "report")
        image_files = {f"report/{p.name}": p for _, p in images}
        card = build_card(
            root,
            repo_id=repo_id,
            fmt=fmt,
            results=results,
            base_models=base_models,
            images=[(caption, f"report/{p.name}") for caption, p in images],
            pick=picked_point(RunDir(root).final_stage(), pick, announce=False) if pick else None,
        )
        (work / "README.md").write_text(card)
        if pick:
            model_dir = export_run(root, fmt=fmt, out=work / "model", device=device, pick=pick)
        else:
            model_dir = _model_folder(root, RunDir(root).final_stage().model, fmt, work / "model", device)
        files = {**_model_files(model_dir), "README.md": work / "README.md", **image_files}
        yield UploadPlan(repo_id=repo_id, private=private, fmt=fmt, files=files)


def _model_folder(root: Path, saved: Path, fmt: str, scratch: Path, device: str) -> Path:
    from mergekit_evolve.export.custom_code import is_custom_code
    from mergekit_evolve.export.final import export_run

    if fmt == "standard" and (saved / "config.json").is_file() and not is_custom_code(saved):
        return saved
    # custom form, or a run saved without its model (--no-save-model): build it from the run's best
    with step(f"building the {fmt} checkpoint from {root / 'best.json'}"):
        return export_run(root, fmt=fmt, out=scratch, device=device)


def _model_files(model_dir: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")) and rel != "README.md":
            files[rel] = path  # mergekit's README.md is replaced by our card
    return files


def write_dry_run(plan: UploadPlan, dest: str | Path, endpoint: str | None = None) -> tuple[Path, Path]:
    """Copy the planned files to ``dest`` (exactly the repository content) and describe the push in
    ``dest.push.json``; written under temporary names and renamed, so no half folder is left."""
    dest = Path(dest).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"--dry-run: {dest} exists and is not an empty folder; choose a new folder")
    with staged_folder(dest) as staging:
        for rel, src in plan.files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staging / rel)
    info = dest.with_name(f"{dest.name}.push.json")
    description = {
        "repo_id": plan.repo_id,
        "private": plan.private,
        "format": plan.fmt,
        "endpoint": endpoint or _default_endpoint(),
        "files": sorted(plan.files),
    }
    atomic_write(info, json.dumps(description, indent=2) + "\n")
    return dest, info


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def upload(plan: UploadPlan, *, token: str, endpoint: str | None = None) -> dict:
    """create_repo (exist_ok) + one commit with every file. Errors come back as one redacted line."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.is_offline_mode():
        raise InputError(
            "push: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; unset it to push, or use --dry-run DIR"
        )
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(src)) for rel, src in plan.files.items()]
        commit = api.create_commit(
            plan.repo_id,
            operations=operations,
            repo_type="model",
            commit_message="Upload evolved merge (mergekit-evo)",
        )
    except Exception as err:  # HTTP, network, card validation: the message may echo the token
        raise InputError(f"push: uploading to {plan.repo_id} failed: {redact(_describe(err), token)}") from None
    return {"url": str(url), "commit": commit.oid, "files": sorted(plan.files)}


def _describe(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + " ..."
    return f"{type(err).__name__}: {text}"


def redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def load_results(path: Path | None, run_dir: Path) -> list[dict] | None:
    """Rows for the card's comparison table: --results, else RUN_DIR/results.json, else the parent's
    results.json when it lists this run (``mergekit-evo demo`` writes DEMO_OUT/results.json)."""
    from mergekit_evolve.export.model_card import row_runs

    root = Path(run_dir).absolute()
    if path is not None:
        return _read_results(Path(path))
    if (root / "results.json").is_file():
        return _read_results(root / "results.json")
    parent = root.parent / "results.json"
    if parent.is_file():
        rows = _read_results(parent)
        if any(root in row_runs(r) for r in rows):
            return rows
    return None


def _read_results(path: Path) -> list[dict]:
    """Rows from any results file our commands write: the report of ``mergekit-evo demo`` and
    ``bench/paper_table.py`` ({rows: [...]}, scores per seed), a run's summary.json, or a plain list of
    rows {name, heldout: {task: score}, run_dir?}."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(
            f"--results: cannot read {path} ({err}); pass the results.json written by mergekit-evo demo"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = [_demo_row(row, path.parent) if isinstance(row, dict) else row for row in data["rows"]]
    elif isinstance(data, dict) and isinstance(data.get("best"), dict):  # summary.json of a run
        data = [
            {
                "name": f"{path.parent.name} (evolved)",
                "heldout": data["best"].get("heldout") or {},
                "run_dir": str(path.parent),
            }
        ]
    if not isinstance(data, list) or not all(isinstance(r, dict) and "name" in r for r in data):
        raise InputError(
            f"--results: {path} is not a results file of mergekit-evo; pass the results.json of mergekit-evo demo "
            "(or bench/paper_table.py), a run's summary.json, or a JSON list of rows with 'name' and 'heldout'"
        )
    return data


def _demo_row(row: dict, folder: Path) -> dict:
    """A demo row (one score per seed, run folders relative to the demo's folder) as a card row."""
    heldout = {
        task: sum(v) / len(v) if isinstance(v, list) and v else v for task, v in (row.get("heldout") or {}).items()
    }
    seeds = max((len(v) for v in (row.get("heldout") or {}).values() if isinstance(v, list)), default=1)
    name = row["name"] + (f" (mean of {seeds} seeds)" if seeds > 1 else "") if "name" in row else None
    runs = [str((folder / d).absolute()) for d in row.get("run_dirs") or []]
    return {**row, "name": name, "heldout": heldout, "run_dirs": runs}


def push_run(
    run_dir: str | Path,
    *,
    repo_id: str,
    private: bool = False,
    fmt: str = "standard",
    dry_run: Path | None = None,
    endpoint: str | None = None,
    results: Path | None = None,
    base_models: list[str] | None = None,
    device: str = "cpu",
    pick: str | None = None,
) -> dict:
    """Publish a run's best (or with ``pick`` the front point those weights choose; with ``dry_run``,
    write what would be published)."""
    check_repo_id(repo_id)
    token = None if dry_run is not None else resolve_token()  # fail fast, before any heavy import
    root = Path(run_dir).absolute()
    if not RunDir(root).final_stage().best_json.is_file():
        from mergekit_evolve.export.report import runs_inside

        raise InputError(
            f"RUN_DIR: {root} has no best.json; push a finished mergekit-evo run directory{runs_inside(root)}"
        )
    rows = load_results(results, root)
    with staged_upload(
        root,
        repo_id=repo_id,
        private=private,
        fmt=fmt,
        results=rows,
        base_models=list(base_models or []) or None,
        device=device,
        pick=pick,
    ) as plan:
        if dry_run is not None:
            folder, info = write_dry_run(plan, dry_run, endpoint)
            return {"dry_run": str(folder), "description": str(info), "files": sorted(plan.files)}
        return upload(plan, token=token, endpoint=endpoint)
