"""A multi-node Ray cluster on this machine (loopback only: every Ray process on 127.0.0.1), started and stopped
by the test: the run joins it by address, its workers spread over the nodes, and losing a node mid-run (its
raylet and worker killed) loses nothing and changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from mergekit_evolve import runner  # noqa: E402
from mergekit_evolve.config import parse_config  # noqa: E402

TESTS = Path(__file__).parent
LOOPBACK = "127.0.0.1"


def config(family, rows: Path, executor: dict, function: str = "slow_loglik") -> dict:
    return {
        "genome": {"models": [str(family["expert0"]), str(family["expert1"])], "merge_method": "linear"},
        "fitness": {
            "tasks": [{"name": "ll", "kind": "callable", "function": f"fitness_fns:{function}", "data": str(rows)}]
        },
        "optimizer": {"max_evals": 18, "seed": 3, "popsize": 6},
        "executor": {"threads_per_worker": 1, **executor},
        "dtype": "float32",
    }


def evals(out: Path) -> list[dict]:
    return sorted(
        (json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()), key=lambda r: r["index"]
    )


def test_a_run_joins_a_multi_node_cluster_and_survives_losing_a_node(family, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    # the nodes' workers import the test's fitness module (as a user's would, from PYTHONPATH on every node)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ["PYTHONPATH"]]))
    # this cluster runs without token authentication: a token file that another cluster left in ~/.ray must
    # not switch the run to it
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}*2=", "answer": str(2 * i)}) + "\n" for i in range(6)))
    local = runner.start(
        parse_config(config(family, rows, {"kind": "local"}, "loglik")),
        tmp_path / "local",
        device="cpu",
        progress=False,
    )
    # head and two more nodes, one CPU each: the two workers sit on two different nodes, at least one of them
    # off the head; that node is lost mid-run, and the free CPU takes the replacement worker
    cluster = cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK, "include_dashboard": False}
    )
    out = tmp_path / "joined"
    try:
        nodes = [cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK) for _ in range(2)]
        cluster.wait_for_nodes()
        assert cluster.address.startswith(f"{LOOPBACK}:")
        config_file = tmp_path / "ray.yaml"
        executor = {"kind": "ray", "workers": 2, "address": cluster.address}
        config_file.write_text(yaml.safe_dump(config(family, rows, executor)))
        run = subprocess.Popen(
            ["mergekit-evo", "run", str(config_file), "--out", str(out), "--device", "cpu", "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline and run.poll() is None and len(_workers(out)) < 2:  # both workers at work
            time.sleep(0.05)
        assert run.poll() is None, run.communicate()[0][-3000:]
        doomed = next(node for node in nodes if _hosts(node, _workers(out)))
        cluster.remove_node(doomed, allow_graceful=False)  # its raylet and its worker are killed
        output = run.communicate(timeout=240)[0]
        assert run.returncode == 0, output[-3000:]
    finally:
        cluster.shutdown()
    ours, theirs = evals(tmp_path / "local"), evals(out)
    assert [r["index"] for r in theirs] == list(range(18))  # each candidate once: none lost, none twice
    assert [r["genome"] for r in theirs] == [r["genome"] for r in ours]
    assert [r["fitness"] for r in theirs] == [r["fitness"] for r in ours] and all(r["error"] is None for r in theirs)
    # the two first workers, then the lost one's replacement, which took over its candidate
    assert len({r.get("worker") for r in theirs} - {None}) == 3, [(r["index"], r.get("worker")) for r in theirs]
    assert json.loads((out / "summary.json").read_text())["best"]["fitness"] == local.best.fitness
    assert (out / "best.yaml").read_text() == (tmp_path / "local" / "best.yaml").read_text()


def _workers(out: Path) -> set[int]:
    """The process ids of the workers that recorded a candidate so far."""
    path = out / "evaluations.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    workers = {json.loads(line).get("worker") for line in lines if line.endswith("}")}
    return workers - {None}  # a recipe scored before (cached) names no worker


def _hosts(node, pids: set[int]) -> bool:
    """Whether one of ``pids`` runs under this node's raylet."""
    raylet = node.all_processes["raylet"][0].process.pid
    for pid in pids:
        try:
            if any(parent.pid == raylet for parent in psutil.Process(pid).parents()):
                return True
        except psutil.NoSuchProcess:
            continue
    return False
