"""scrit on a real multi-node Ray cluster (README "Failures", "Running on a cluster"; DESIGN.md §12).

One cluster for the module, built as Ray's own tests build one (``ray.cluster_utils.Cluster``, through
``scrit.actors.local_cluster``): a head that runs no work (0 CPUs, as Ray recommends for a cluster
head: it keeps the driver and the run's state) and two worker nodes of 1 CPU, token authentication on.
``scrit run`` joins it through ``RAY_ADDRESS``. Each node-loss test removes one worker node
ungracefully (``remove_node(node, allow_graceful=False)``) once the first batch is in, then adds a
fresh worker so the next test finds the same cluster:

* the node holding the Ray Train worker, and the node holding the evaluator: the run ends
  ``completed`` with all 3 versions, every process that was on the lost node restarted elsewhere and
  counted with the reason ``node lost``, the buffer's example count never went down;
* a run sized so that one worker node cannot hold it: it ends ``failed`` in ``cluster`` with a message
  that says the cluster is too small, instead of waiting forever;
* every checkpoint directory removed the moment it is published: every subscriber (the engine host,
  whose critic engine also serves the evaluator, and the Serve replica) still swaps to every version,
  from Ray's object store;
* ``ray job submit`` of a tiny run to the cluster's head.

Run sizes (``SMALL``): the whole tiny run must fit on the one worker left (0.9 of its CPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import REPO, TINY, free_port

from scrit.actors.local_cluster import LocalCluster, run_losing_node

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

SMALL = ["--set", "resources.engine_num_cpus=0.2", "--set", "resources.train_worker_num_cpus=0.3",
         "--set", "resources.actor_num_cpus=0.02", "--set", "resources.serve_replica_num_cpus=0.1"]
THREE_VERSIONS = ["--config", str(TINY), "--set", "run.versions=3", "--set", "run.max_wall_seconds=1200", *SMALL]


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    with LocalCluster(workers=2, worker_cpus=1, head_cpus=0, dashboard=True, env=env) as instance:
        yield instance


@pytest.fixture
def two_workers(cluster: LocalCluster) -> LocalCluster:
    """The cluster with two worker nodes again (a node-loss test leaves one)."""
    while len(cluster.workers) < 2:
        cluster.add_worker()
    return cluster


def check_survived(loss, versions: int = 3) -> None:
    summary = loss.summary
    print(loss.line())
    assert loss.node is not None, f"{loss.component} ran on the head; nothing was removed"
    assert loss.returncode == 0, loss.stderr[-3000:]
    assert summary["status"] == "completed" and summary["versions"] == versions, summary.get("error")
    by_component = {r["component"]: r for r in summary["restart_log"]}
    for component in loss.on_node:  # every process of the lost node restarted elsewhere, for that reason
        assert by_component.get(component, {}).get("reason") == "node lost", (component, summary["restart_log"])
        assert summary["restarts"][component] >= 1
    assert loss.examples == sorted(loss.examples) and loss.examples[-1] > 0  # nothing validated was lost
    lost_names = [name for name, node in summary["nodes"].items() if not node["alive"]]
    assert any(name.endswith(loss.node[:8]) for name in lost_names), summary["nodes"]
    assert set(loss.on_node) <= set(summary["placement"])
    assert not [name for name, node in summary["placement"].items() if node.endswith(loss.node[:8])]


def test_losing_the_trainers_node(two_workers: LocalCluster, tmp_path: Path) -> None:
    loss = run_losing_node(two_workers, tmp_path / "run", "trainer.rank0",
                           [*THREE_VERSIONS, "--set", "serve.enabled=true", "--set", f"serve.port={free_port()}"],
                           probe_endpoint=True, cwd=REPO)
    check_survived(loss)
    assert "trainer.rank0" in loss.on_node


def test_losing_the_evaluators_node(two_workers: LocalCluster, tmp_path: Path) -> None:
    loss = run_losing_node(two_workers, tmp_path / "run", "evaluator.0", THREE_VERSIONS, cwd=REPO)
    check_survived(loss)
    assert "evaluator.0" in loss.on_node
    assert {e["version"] for e in loss.summary["evals"]} >= {0, 3}  # scored before and after the loss


def test_a_cluster_too_small_after_the_loss_fails_the_run(two_workers: LocalCluster, tmp_path: Path) -> None:
    # tiny-test's own sizes: 1.25 CPUs of work, more than the 1-CPU worker left can hold
    started = time.monotonic()
    loss = run_losing_node(two_workers, tmp_path / "run", "trainer.rank0",
                           ["--config", str(TINY), "--set", "run.versions=3", "--set", "run.max_wall_seconds=1200"],
                           cwd=REPO, timeout_s=600)
    print(f"too small: rc {loss.returncode}, {loss.summary.get('error')}, {time.monotonic() - started:.0f} s")
    assert loss.node is not None
    assert loss.returncode == 1 and loss.summary["status"] == "failed"
    assert loss.summary["error"]["component"] == "cluster"
    assert "the cluster is too small for this run" in loss.summary["error"]["message"]
    assert "the cluster is too small" in loss.stderr


def test_versions_reach_every_subscriber_from_memory(two_workers: LocalCluster, tmp_path: Path) -> None:
    """No subscriber reads a checkpoint: each is deleted as soon as the registry names it."""
    run_dir = tmp_path / "run"
    registry = run_dir / "versions" / "registry.jsonl"
    deleted: list[int] = []
    stop = threading.Event()

    def delete_checkpoints() -> None:
        while not stop.is_set():
            lines = registry.read_text().splitlines() if registry.is_file() else []
            for line in lines[len(deleted):]:
                if line.endswith("}"):
                    version = json.loads(line)
                    shutil.rmtree(version["uri"])
                    deleted.append(version["version"])
            time.sleep(0.005)

    versions = 2
    command = [sys.executable, "-m", "scrit.cli", "run", "--config", str(TINY), "--run-dir", str(run_dir),
               "--set", f"run.versions={versions}", "--set", "run.max_wall_seconds=1200", *SMALL,
               "--set", "serve.enabled=true", "--set", f"serve.port={free_port()}", "--keep-serving"]
    process = subprocess.Popen(command, cwd=REPO, env=two_workers.client_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deleter = threading.Thread(target=delete_checkpoints, daemon=True)
    deleter.start()
    try:
        deadline = time.monotonic() + 1200
        while not (run_dir / "summary.json").is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(1)
        url = json.loads((run_dir / "endpoint.json").read_text())["url"]
        while True:  # the replica swaps within a poll interval of the last publish
            health = httpx.get(f"{url}/healthz", timeout=30).json()
            if health["critic_version"] == versions or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        process.send_signal(signal.SIGINT)  # --keep-serving: serves until Ctrl-C
        try:
            process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"in memory: versions {summary['versions']}, checkpoints deleted {deleted}, engines "
          f"{ {host: {e: (s['version'], s['transports']) for e, s in engines.items()} for host, engines in summary['engines'].items()} }, "
          f"serve {health['critic_version']} {[(s['version'], s['transport']) for s in health['recent_swaps']]}")
    assert summary["status"] == "completed" and summary["versions"] == versions
    assert deleted == list(range(1, versions + 1))
    assert not any((run_dir / "versions" / f"v{v:04d}").exists() for v in deleted)
    critic_engines = [engines["critic"] for engines in summary["engines"].values() if "critic" in engines]
    assert critic_engines
    for engine in critic_engines:  # the engine host's critic engine (the evaluator scores through it too)
        assert engine["version"] == versions and engine["swap_errors"] == 0
        assert engine["transports"] == {"object_store": engine["swaps"]} and engine["swaps"] >= 1
    assert {e["version"] for e in summary["evals"]} == {0, versions}  # run.eval_every 2: the seed and version 2
    assert health["critic_version"] == versions and health["swap_errors"] == 0  # the Serve replica
    assert health["swaps"] >= 1 and {s["transport"] for s in health["recent_swaps"]} == {"object_store"}


def test_ray_job_submit_to_the_cluster_head(two_workers: LocalCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id = f"scrit-multinode-{uuid.uuid4().hex[:8]}"
    env = two_workers.client_env()
    env.pop("RAY_ADDRESS")  # `ray job` takes the dashboard's address

    def ray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)

    deadline = time.monotonic() + 120
    while True:  # a fresh head's job agent takes a while to come up ("No available agent to submit job")
        submitted = ray("job", "submit", "--address", two_workers.dashboard_url, "--submission-id", job_id, "--no-wait",
                        "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml", "--",
                        "scrit", "run", "--config", "configs/tiny-test.yaml", "--run-dir", str(run_dir))
        if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    deadline, status = time.monotonic() + 900, ""
    while time.monotonic() < deadline:
        text = ray("job", "status", "--address", two_workers.dashboard_url, job_id, timeout=60).stdout
        final = re.search(r"Job '[^']*' (succeeded|failed|was stopped)", text)
        if final:
            status = final.group(1)
            break
        time.sleep(5)
    logs = ray("job", "logs", "--address", two_workers.dashboard_url, job_id, timeout=120).stdout
    assert status == "succeeded", f"job {job_id}: {status or 'timed out'}\n{logs[-5000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["versions"] == 1
    nodes = {name for name, node in summary["nodes"].items() if node["alive"]}
    assert len(nodes) == 3 and set(summary["placement"].values()) <= nodes
    head = summary["placement"]["driver"]
    assert summary["placement"]["buffer"] == summary["placement"]["registry"] == head  # the run's state
    assert summary["placement"]["trainer.rank0"] != head  # the head runs no work
