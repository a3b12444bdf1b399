"""``mergekit-evo push`` against a small Hub stand-in on 127.0.0.1, and ``--dry-run``.

The stand-in implements the endpoints huggingface_hub's ``create_repo`` + ``create_commit`` call
(repos/create, validate-yaml, preupload, commit) and records every request. It answers "regular"
upload mode for every file, so files travel inline in the commit (no LFS/xet). Only loopback traffic.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mergekit_evolve import runner
from mergekit_evolve.config import parse_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.export.hub import UploadPlan, push_run, upload

TESTS = Path(__file__).parent
TOKEN = "hf_testSECRETtoken0123456789abcdef"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_BODY = 64 * 2**20


# -- the Hub stand-in ------------------------------------------------------------------------------
class FakeHub:
    """A threaded HTTP server that records requests; ``reject`` answers 401 and echoes the token."""

    def __init__(self, reject: bool = False):
        self.requests: list[dict] = []
        self.reject = reject
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # idle keep-alive connections end on their own

            def do_GET(self):
                hub.handle(self)

            do_POST = do_PUT = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(min(length, MAX_BODY))
        path = request.path.split("?")[0]
        self.requests.append(
            {
                "method": request.command,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )
        status, answer = self.answer(request.command, path, body, request.headers.get("Authorization", ""))
        data = json.dumps(answer).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def answer(self, method: str, path: str, body: bytes, auth: str) -> tuple[int, dict]:
        if self.reject:  # a careless server that echoes what it was sent
            return 401, {"error": f"Invalid credentials in Authorization header: {auth}"}
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            return 200, {"url": f"{self.url}/{payload['organization']}/{payload['name']}"}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)/(preupload|commit)/(\w+)", path)
        if method == "POST" and match and match.group(2) == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if method == "POST" and match:
            return 200, {"commitUrl": f"{self.url}/{match.group(1)}/commit/{'1' * 40}", "commitOid": "1" * 40}
        return 404, {"error": f"not implemented in the test hub: {method} {path}"}

    def commit_files(self) -> dict[str, bytes]:
        """Path -> content of every file in the (single) commit."""
        commits = [r for r in self.requests if "/commit/" in r["path"]]
        assert len(commits) == 1
        files = {}
        for line in commits[0]["body"].splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return files


# -- finished runs ---------------------------------------------------------------------------------
def write_rows(path: Path, n: int = 10) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i % 4}=", "answer": str(i + i % 4)}) + "\n" for i in range(n)))
    return path


def run_config(family, data: Path, space: str) -> dict:
    return {
        "space": space,
        "genome": {
            "models": [str(family["expert0"]), str(family["expert1"])],
            "merge_method": "linear",
            "layer_granularity": 2,
        },
        "dfs": {"repeats": 1},
        "fitness": {
            "tasks": [
                {
                    "name": "ll",
                    "kind": "callable",
                    "function": "fitness_fns:loglik",
                    "data": str(data),
                    "heldout": str(data),
                }
            ]
        },
        "optimizer": {"max_evals": 8, "seed": 1},
        "dtype": "float32",
    }


@pytest.fixture(scope="module")
def runs(family, tmp_path_factory):
    sys.path.insert(0, str(TESTS))  # fitness_fns
    root = tmp_path_factory.mktemp("hubruns")
    data = write_rows(root / "rows.jsonl")
    out = {}
    for space in ("ps", "dfs"):
        runner.start(parse_config(run_config(family, data, space)), root / space, device="cpu", progress=False)
        out[space] = root / space
    return out


def cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.environ["PYTHONPATH"],
        "HOME": str(cwd),
        "HF_HOME": str(cwd / "hf-home"),
        "NO_PROXY": "127.0.0.1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "mergekit_evolve.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **env},
        timeout=300,
    )


def front_matter(card: str) -> tuple[dict, str]:
    _, head, body = card.split("---\n", 2)
    return yaml.safe_load(head), body


def yaml_blocks(text: str) -> list:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def all_bytes_under(path: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in path.rglob("*") if p.is_file()]


# -- tests -----------------------------------------------------------------------------------------
def test_push_creates_the_repo_and_uploads_model_card_and_plots(runs, tmp_path):
    run = runs["ps"]
    with FakeHub() as hub:
        done = cli(
            "push",
            str(run),
            "--repo",
            "alice/evo-merge",
            "--private",
            env={"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url},
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr
    assert "pushed" in done.stdout and "alice/evo-merge" in done.stdout

    create = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert len(create) == 1
    assert json.loads(create[0]["body"]) == {
        "name": "evo-merge",
        "organization": "alice",
        "visibility": "private",
        "type": "model",
    }
    assert any(r["path"] == "/api/models/alice/evo-merge/preupload/main" for r in hub.requests)
    assert {r["path"].split("?")[0] for r in hub.requests} <= {
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/alice/evo-merge/preupload/main",
        "/api/models/alice/evo-merge/commit/main",
    }

    files = hub.commit_files()
    model_files = {p.name for p in (run / "model").iterdir() if p.is_file() and p.name != "README.md"}
    assert set(files) == model_files | {"README.md", "report/fitness.png", "report/ps_parameters.png"}
    assert files["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()
    assert all(files[p].startswith(PNG_MAGIC) and len(files[p]) > 10_000 for p in files if p.endswith(".png"))

    meta, body = front_matter(files["README.md"].decode())
    assert meta["base_model"] == ["expert0", "expert1"]
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "mergekit", "evolutionary-merge"]  # no dfs for a PS run
    assert "arxiv.org/abs/2403.13187" in body and "![" in body and "(report/ps_parameters.png)" in body
    best = yaml.safe_load((run / "best.yaml").read_text())
    recipe = yaml_blocks(body)[0]
    assert recipe["merge_method"] == "linear"
    assert [s["model"] for sl in recipe["slices"] for s in sl["sources"]] == [
        Path(s["model"]).name for sl in best["slices"] for s in sl["sources"]
    ]
    assert [s["parameters"]["weight"] for sl in recipe["slices"] for s in sl["sources"]] == [
        s["parameters"]["weight"] for sl in best["slices"] for s in sl["sources"]
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['best']['heldout']['ll']:.4f}" in body
    assert "rows.jsonl" in body  # the selection data is named

    # the token travels only in the Authorization header
    for r in hub.requests:
        assert r["headers"].get("authorization") == f"Bearer {TOKEN}", r["path"]
        assert TOKEN.encode() not in r["body"] and TOKEN not in r["path"]
        assert all(TOKEN not in v for k, v in r["headers"].items() if k != "authorization")
    assert TOKEN not in done.stdout + done.stderr
    assert not [p for p, data in all_bytes_under(run) + all_bytes_under(tmp_path) if TOKEN.encode() in data]


def test_hub_errors_are_one_line_and_never_show_the_token(tmp_path, monkeypatch):
    import huggingface_hub.constants

    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\n---\n# card\n")
    plan = UploadPlan(repo_id="alice/evo-merge", private=False, fmt="standard", files={"README.md": card})
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set its value explicitly for each case.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE .*is set; unset it to push, or use --dry-run"):
        upload(plan, token=TOKEN, endpoint="http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # loopback stand-in only
    with FakeHub(reject=True) as hub:
        with pytest.raises(InputError) as caught:
            upload(plan, token=TOKEN, endpoint=hub.url)
    assert hub.requests and TOKEN in hub.requests[0]["headers"]["authorization"]  # it did try, at our endpoint
    message = str(caught.value)
    assert TOKEN not in message and "***" in message  # the server echoed the token; we redacted it
    assert message.startswith("push: uploading to alice/evo-merge failed") and "401" in message
    assert "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained original


def test_push_without_a_token_says_how_to_log_in(runs, tmp_path):
    done = cli("push", str(runs["ps"]), "--repo", "alice/evo-merge", env={}, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: push: no Hugging Face token found; set HF_TOKEN or run `hf auth login` (or use --dry-run DIR)"
    )


def test_bad_repo_id_is_an_input_error(runs, tmp_path):
    with pytest.raises(InputError, match="--repo: 'evo' is not of the form user/name"):
        push_run(runs["ps"], repo_id="evo", dry_run=tmp_path / "d")
    with pytest.raises(InputError, match="--repo: .*--"):
        push_run(runs["ps"], repo_id="alice/evo--merge", dry_run=tmp_path / "d")


def test_dry_run_writes_the_repo_folder_and_contacts_nothing(runs, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs no token
    run = runs["dfs"]
    with FakeHub() as hub:
        done = push_run(run, repo_id="alice/evo-dfs", private=True, dry_run=tmp_path / "repo", endpoint=hub.url)
        custom = push_run(run, repo_id="alice/evo-dfs", fmt="custom", dry_run=tmp_path / "custom", endpoint=hub.url)
    assert hub.requests == []

    folder = tmp_path / "repo"
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert written == done["files"]
    assert {"README.md", "config.json", "model.safetensors", "report/fitness.png", "report/dfs_path.png"} <= set(
        written
    )
    described = json.loads((tmp_path / "repo.push.json").read_text())
    assert described["repo_id"] == "alice/evo-dfs" and described["private"] is True and described["files"] == written
    meta, body = front_matter((folder / "README.md").read_text())
    assert meta["tags"] == ["merge", "mergekit", "evolutionary-merge", "dfs"]
    assert meta["base_model"] == ["expert0", "expert1"]
    best = json.loads((run / "best.json").read_text())
    assert f"{len(best['path']['hops'])} hops" in body
    assert yaml_blocks(body)[0]["merge_method"] == "passthrough"  # the folded recipe

    custom_dir = tmp_path / "custom"
    meta, body = front_matter((custom_dir / "README.md").read_text())
    assert "custom_code" in meta["tags"] and "dfs" in meta["tags"] and "trust_remote_code=True" in body
    assert any(name.endswith(".py") for name in custom["files"])  # the modeling code travels with it
    assert "auto_map" in json.loads((custom_dir / "config.json").read_text())
    # the card's usage snippet runs as written, with the repository's files (its id -> the dry-run folder)
    snippet = body.split("```python\n")[1].split("```")[0].replace('"alice/evo-dfs"', repr(str(custom_dir)))
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 (our own card's code, on our own files)
    assert type(scope["model"]).__name__ == "LayerStackForCausalLM" and scope["tokenizer"] is not None

    with pytest.raises(InputError, match="--dry-run: .* not an empty folder"):
        push_run(run, repo_id="alice/evo-dfs", dry_run=folder)


def test_results_table_compares_sources_and_marks_this_model(runs, tmp_path):
    run = runs["ps"]
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            [
                {"name": "source: expert0", "heldout": {"ll": -4.25}},
                {"name": "Ours PS", "heldout": {"ll": -3.5}, "run_dir": str(run)},
            ]
        )
    )
    push_run(run, repo_id="alice/evo", dry_run=tmp_path / "repo", results=results, base_models=["org/a", "org/b"])
    meta, body = front_matter((tmp_path / "repo" / "README.md").read_text())
    assert meta["base_model"] == ["org/a", "org/b"]
    assert "| source: expert0 | -4.2500 |" in body and "| **Ours PS (this model)** | -3.5000 |" in body
