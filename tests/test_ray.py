"""The Ray executor on a real local Ray cluster (CPU workers): same results as the local executor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from mergekit_evolve import runner  # noqa: E402
from mergekit_evolve.config import parse_config  # noqa: E402
from mergekit_evolve.errors import InputError  # noqa: E402

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster; workers see the test fitness module. (A worker lost mid-run, and its node:
    tests/test_ray_cluster.py.)"""
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ["PYTHONPATH"]])}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
        _node_ip_address="127.0.0.1",
    )  # loopback only: no interface lookup in sandboxes
    yield
    ray.shutdown()


def make_config(family, rows: Path, kind: str, function: str = "fitness_fns:loglik") -> dict:
    return {
        "genome": {
            "models": [str(family["expert0"]), str(family["expert1"])],
            "merge_method": "linear",
            "layer_granularity": 2,
        },
        "fitness": {"tasks": [{"name": "ll", "kind": "callable", "function": function, "data": str(rows)}]},
        "optimizer": {"max_evals": 12, "seed": 5},
        "executor": {"kind": kind, "workers": 2, "threads_per_worker": 1},
        "dtype": "float32",
    }


def evals(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    return sorted(records, key=lambda r: r["index"])


def test_a_cluster_that_cannot_be_joined_or_is_too_small_is_one_line_before_anything_is_written(
    family, tmp_path, ray_cluster
):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1*2=", "answer": "2"}) + "\n")
    config = make_config(family, rows, "ray")
    with pytest.raises(InputError, match=r"executor.address: nothing answers at 127.0.0.1:1 \(Connection refused\)"):
        runner.start(parse_config({**config, "executor": {"kind": "ray", "address": "127.0.0.1:1"}}), tmp_path / "a")
    joined = {"kind": "ray", "workers": 5, "address": ray.get_runtime_context().gcs_address}  # this test's cluster
    with pytest.raises(
        InputError, match=r"executor.workers: 5 workers need 5 CPUs \(one each\) but the Ray cluster has 2"
    ):
        runner.start(parse_config({**config, "executor": joined}), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_node_is_checked_for_the_package_and_the_paths_a_worker_reads(family, tmp_path, ray_cluster):
    """A real probe on each node of the test's cluster: this machine has both; a path no node has is named."""
    from mergekit_evolve.search.executors import check_nodes, local_paths

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1*2=", "answer": "2"}) + "\n")
    config = parse_config(make_config(family, rows, "ray"))
    paths = local_paths(config)
    assert str(rows) in paths and str(family["expert0"]) in paths
    check_nodes(ray, paths, gpu=False)  # the package and every path are there
    gone = str(tmp_path / "moved-away")
    with pytest.raises(InputError, match=rf"executor: the Ray node \S+ lacks {gone}; put the models and data"):
        check_nodes(ray, [*paths, gone], gpu=False)


def test_a_multi_objective_run_on_ray_gives_the_local_front(family, tmp_path, ray_cluster, monkeypatch):
    """optimizer.objectives with the Ray executor: the same candidates, scores and front as in this process."""
    monkeypatch.syspath_prepend(str(TESTS))
    tasks = []
    for name, factor in (("double", 2), ("triple", 3)):
        rows = tmp_path / f"{name}.jsonl"
        rows.write_text(
            "".join(json.dumps({"prompt": f"{i}*{factor}=", "answer": str(factor * i)}) + "\n" for i in range(8))
        )
        tasks.append({"name": name, "kind": "callable", "function": "fitness_fns:loglik", "data": str(rows)})
    fronts = {}
    for kind in ("local", "ray"):
        config = make_config(family, tmp_path / "double.jsonl", kind)
        config["fitness"]["tasks"] = tasks
        # mean log-likelihoods are below 0: the reference point says what the worst useful value is
        config["optimizer"].update(
            objectives=["double", "triple"], kind="nsga2", popsize=6, reference={"double": -50, "triple": -50}
        )
        runner.start(parse_config(config), tmp_path / kind, device="cpu", progress=False, save_model=False)
        fronts[kind] = json.loads((tmp_path / kind / "front.json").read_text())
    ours, theirs = evals(tmp_path / "local"), evals(tmp_path / "ray")
    assert [r["genome"] for r in ours] == [r["genome"] for r in theirs] and len(ours) == 12
    assert [r["scores"] for r in ours] == [r["scores"] for r in theirs]
    assert [(p["index"], p["values"]) for p in fronts["local"]["points"]] == [
        (p["index"], p["values"]) for p in fronts["ray"]["points"]
    ]
    assert fronts["ray"]["hypervolume"] > 0 and fronts["ray"]["reference"] == [-50.0, -50.0]


def test_m2n2_on_ray_keeps_the_local_archive(family, tmp_path, ray_cluster):
    """optimizer.kind m2n2 with the Ray executor: workers send each row's result; same candidates and archive."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}*2=", "answer": str(2 * i)}) + "\n" for i in range(6)))
    archives = {}
    for kind in ("local", "ray"):
        config = make_config(family, rows, kind)
        config["genome"].update(layer_granularity=1)
        config["fitness"]["tasks"] = [{"name": "gen", "data": str(rows), "max_new_tokens": 2}]
        config["optimizer"].update(kind="m2n2", popsize=2, m2n2={"archive_size": 3}, max_evals=8)
        runner.start(parse_config(config), tmp_path / kind, device="cpu", progress=False, save_model=False)
        archives[kind] = json.loads((tmp_path / kind / "archive.json").read_text())
    ours, theirs = evals(tmp_path / "local"), evals(tmp_path / "ray")
    assert [r["genome"] for r in ours] == [r["genome"] for r in theirs] and len(ours) == 8
    assert [r["items"] for r in ours] == [r["items"] for r in theirs] and all(
        len(r["items"]["gen"]) == 6 for r in theirs
    )
    assert archives["local"]["members"] == archives["ray"]["members"]
