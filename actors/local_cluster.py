"""A multi-node Ray cluster on one machine, for the node-loss tests and benchmarks (DESIGN.md §11).

Built the way Ray's own tests build one: ``ray.cluster_utils.Cluster``, a head plus ``add_node``
workers, each a real node (its own raylet, object store and worker processes), and
``remove_node(node, allow_graceful=False)`` for a node that is lost. Token authentication stays on:
the cluster gets a token of its own (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``), which
``client_env()`` hands to the processes that join it (``scrit run`` with ``RAY_ADDRESS``, ``ray job``).

The cluster lives in a child process that takes one JSON command per line on stdin, so the caller's
own Ray (a test session's) is never touched by the cluster's global state. Every process of the
cluster carries a marker variable in its environment; ``stop()`` ends exactly those, never anything
else on the machine (no ``ray stop``).

    with LocalCluster(workers=2) as cluster:
        subprocess.run([... "scrit", "run", ...], env=cluster.client_env())
        cluster.remove(node_id)          # the node's raylet, object store and workers die at once
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LocalCluster", "NodeLoss", "free_port", "run_losing_node"]

MARKER = "SCRIT_LOCAL_CLUSTER"


class LocalCluster:
    """A head node and ``workers`` worker nodes of ``worker_cpus`` CPUs each (see the module docstring).

    ``head_cpus`` defaults to 0, as Ray recommends for cluster heads: the head keeps the driver and
    the run's state (registry, buffer, Serve's controller and proxy, Ray Train's controller), and the
    work goes to the workers. ``dashboard`` starts the head's dashboard (the jobs API of ``ray job
    submit``) on a free port.
    """

    def __init__(self, workers: int = 2, worker_cpus: int = 1, head_cpus: int = 0, *,
                 object_store_mb: int = 300, dashboard: bool = False, env: dict[str, str] | None = None) -> None:
        self.marker = uuid.uuid4().hex
        self.temp_dir = Path(tempfile.mkdtemp(prefix="scrit-cl-", dir="/tmp"))  # short: Ray's socket paths
        token = self.temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        base = {k: v for k, v in (env or os.environ).items() if not k.startswith("RAY_")}
        self._auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self._env = {**base, **self._auth, MARKER: self.marker}
        self._spec = {"workers": workers, "worker_cpus": worker_cpus, "head_cpus": head_cpus,
                      "object_store_bytes": object_store_mb * 1024 * 1024, "dashboard": dashboard,
                      "temp_dir": str(self.temp_dir)}
        self._child: subprocess.Popen | None = None
        self.address = ""  # the GCS address (RAY_ADDRESS for `scrit run`)
        self.dashboard_url: str | None = None  # http://127.0.0.1:PORT (`ray job submit --address`)
        self.head = ""  # node ids (hex)
        self.workers: list[str] = []

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 240) -> LocalCluster:
        self._child = subprocess.Popen([sys.executable, "-c", "from scrit.actors.local_cluster import _serve; _serve()"],
                                       env=self._env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=open(self.temp_dir / "cluster.log", "w"), text=True,
                                       start_new_session=True)
        reply = self._call({"start": self._spec}, timeout_s)
        self.address, self.dashboard_url = reply["address"], reply["dashboard_url"]
        self.head, self.workers = reply["head"], reply["workers"]
        return self

    def stop(self, grace_s: float = 30) -> None:
        """Shut every node down (the child's ``Cluster.shutdown``), then end any process still carrying
        this cluster's marker."""
        if self._child is not None and self._child.poll() is None:
            try:
                self._call({"stop": True}, grace_s)
            except (RuntimeError, TimeoutError, OSError):
                pass
            self._child.kill()
            self._child.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in marked_pids(self.marker):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while marked_pids(self.marker) and time.monotonic() < deadline:
                time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- nodes
    def remove(self, node_id: str) -> float:
        """Kill worker node ``node_id`` ungracefully (every process of it at once); returns when."""
        reply = self._call({"remove": node_id}, 120)
        self.workers.remove(node_id)
        return float(reply["removed_at"])

    def add_worker(self) -> str:
        """A new worker node like the others; returns its id."""
        node = self._call({"add": True}, 120)["node"]
        self.workers.append(node)
        return node

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that joins this cluster (its address and token; marked, so
        ``stop()`` ends it too if it outlives the caller)."""
        return {**self._env, "RAY_ADDRESS": self.address, **extra}

    # ------------------------------------------------------------------------------ protocol
    def _call(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        import selectors

        assert self._child is not None and self._child.stdin is not None and self._child.stdout is not None
        self._child.stdin.write(json.dumps(command) + "\n")
        self._child.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(self._child.stdout, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                raise TimeoutError(f"local cluster: no answer to {command} in {timeout_s} s "
                                   f"(see {self.temp_dir / 'cluster.log'})")
        line = self._child.stdout.readline()
        if not line:
            raise RuntimeError(f"local cluster process ended (see {self.temp_dir / 'cluster.log'})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"local cluster: {reply['error']}")
        return reply


def marked_pids(marker: str, variable: str = MARKER) -> list[int]:
    """Processes (not this one) whose environment holds ``variable=marker`` (``SCRIT_LOCAL_CLUSTER`` by default)."""
    needle = f"{variable}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve() -> None:
    """The child process: owns the ``Cluster`` and answers one JSON line per command line."""
    import traceback

    from ray.cluster_utils import Cluster

    cluster: Any = None
    nodes: dict[str, Any] = {}
    spec: dict[str, Any] = {}

    def worker() -> Any:
        node = cluster.add_node(num_cpus=spec["worker_cpus"], object_store_memory=spec["object_store_bytes"],
                                temp_dir=spec["temp_dir"])
        nodes[node.node_id] = node
        return node

    for line in sys.stdin:
        command = json.loads(line)
        try:
            if "start" in command:
                spec = command["start"]
                head: dict[str, Any] = {"num_cpus": spec["head_cpus"], "object_store_memory": spec["object_store_bytes"],
                                        "temp_dir": spec["temp_dir"], "include_dashboard": spec["dashboard"]}
                if spec["dashboard"]:
                    head.update(dashboard_host="127.0.0.1", dashboard_port=free_port())
                cluster = Cluster(initialize_head=True, head_node_args=head)
                workers = [worker().node_id for _ in range(spec["workers"])]
                cluster.wait_for_nodes()
                url = f"http://{cluster.head_node.webui_url}" if spec["dashboard"] else None
                reply: dict[str, Any] = {"address": cluster.address, "dashboard_url": url,
                                         "head": cluster.head_node.node_id, "workers": workers}
            elif "remove" in command:
                cluster.remove_node(nodes.pop(command["remove"]), allow_graceful=False)
                reply = {"removed_at": time.time()}
            elif "add" in command:
                reply = {"node": worker().node_id}
            elif "stop" in command:
                cluster.shutdown()
                reply = {"stopped": True}
            else:
                reply = {"error": f"unknown command {command}"}
        except Exception as error:  # noqa: BLE001 - reported to the caller, who raises it
            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)
        if "stop" in command:
            return


# --------------------------------------------------------------------------------------------------
# A run that loses a node: what the tests and benchmarks/weight_sync.py measure


@dataclass
class NodeLoss:
    """What happened to one ``scrit run`` whose node holding ``component`` was removed.

    Times are seconds after the node was removed: ``restarted_s`` when the last process that ran on it
    had started again elsewhere, ``first_batch_s`` when the first batch finished after it,
    ``next_version_s`` when the next version was published. ``examples`` is the buffer log's count,
    sampled every half second (it must never go down); ``requests`` the endpoint probes
    ``(seconds after the removal, status or error)``."""

    component: str
    node: str | None  # the node removed (None: the component was on the head, nothing removed)
    returncode: int
    summary: dict[str, Any]
    stderr: str
    on_node: list[str] = field(default_factory=list)  # components that ran on the removed node
    restarted_s: float | None = None
    first_batch_s: float | None = None
    next_version_s: float | None = None
    examples: list[int] = field(default_factory=list)
    examples_at_loss: int = 0
    requests: list[tuple[float, str]] = field(default_factory=list)

    @property
    def failed_requests(self) -> list[tuple[float, str]]:
        return [(t, outcome) for t, outcome in self.requests if outcome != "200"]

    def line(self) -> str:
        """One line for logs and tables."""
        s = self.summary
        return (f"lost {self.component}'s node ({', '.join(self.on_node) or '-'}): {s.get('status')} "
                f"{s.get('versions')}/{s.get('config', {}).get('run', {}).get('versions')} versions, rc {self.returncode}; "
                f"restarted {_secs(self.restarted_s)}, first batch {_secs(self.first_batch_s)}, next version "
                f"{_secs(self.next_version_s)} after the loss; examples {self.examples_at_loss} at the loss -> "
                f"{self.examples[-1] if self.examples else 0} (never down: {self.examples == sorted(self.examples)}); "
                f"endpoint requests {len(self.requests)}, failed {len(self.failed_requests)}; "
                f"restarts {s.get('restarts')}; wall {s.get('wall_seconds')} s")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def run_losing_node(cluster: LocalCluster, run_dir: Path, component: str, args: list[str], *,
                    after_batches: int = 1, probe_endpoint: bool = False, cwd: Path | None = None,
                    timeout_s: float = 1500) -> NodeLoss:
    """``scrit run --run-dir RUN_DIR ARGS`` on ``cluster``; once ``after_batches`` batches are in, the
    worker node running ``component`` (per ``RUN_DIR/processes.jsonl``) is removed ungracefully. With
    ``probe_endpoint`` a client posts a critique to the run's endpoint every half second."""
    import threading

    import httpx

    from scrit.rundir import buffer_log_path, process_records, read_events

    def examples() -> int:
        from scrit.replay_log import RecordLog

        path = buffer_log_path(run_dir)
        return RecordLog(path, readonly=True).count if path.is_file() else 0

    def batches() -> list[dict[str, Any]]:
        return [e for e in read_events(run_dir / "metrics.jsonl") if e.get("kind") == "batch"]

    command = [sys.executable, "-m", "scrit.cli", "run", "--run-dir", str(run_dir), *args]
    process = subprocess.Popen(command, cwd=cwd, env=cluster.client_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    result = NodeLoss(component=component, node=None, returncode=-1, summary={}, stderr="")
    stop = threading.Event()
    removed_at: list[float] = []

    def sample() -> None:
        while not stop.is_set():
            result.examples.append(examples())
            time.sleep(0.5)

    def probe() -> None:
        body = {"problem": "Start with 12. Add 5. Multiply by 3. What is the result?", "steps": ["12 + 5 = 17", "17 * 3 = 52"]}
        while not stop.is_set() and not (run_dir / "endpoint.json").is_file():
            time.sleep(0.5)
        if stop.is_set():
            return
        url = json.loads((run_dir / "endpoint.json").read_text())["url"]
        while not stop.is_set() and not (run_dir / "summary.json").is_file():
            sent = time.time()
            try:
                outcome = str(httpx.post(f"{url}/v1/critique", json=body, timeout=60).status_code)
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            if removed_at:
                result.requests.append((round(sent - removed_at[0], 1), outcome))
            time.sleep(0.5)

    threads = [threading.Thread(target=sample, daemon=True)]
    if probe_endpoint:
        threads.append(threading.Thread(target=probe, daemon=True))
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and not removed_at:
            if len(batches()) >= after_batches:
                current = {name: starts[-1] for name, starts in process_records(run_dir).items()}
                node = current.get(component, {}).get("node")
                result.examples_at_loss = examples()
                if node in cluster.workers:
                    result.node = node
                    result.on_node = sorted(name for name, start in current.items() if start.get("node") == node)
                    removed_at.append(cluster.remove(node))
                else:
                    removed_at.append(time.time())  # on the head (or unknown): nothing to remove
            if time.monotonic() > deadline:
                raise TimeoutError(f"no batch within {timeout_s} s")
            time.sleep(0.2)
        _, result.stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop.set()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        for thread in threads:
            thread.join(timeout=70)
    result.returncode = process.returncode
    if (run_dir / "summary.json").is_file():
        result.summary = json.loads((run_dir / "summary.json").read_text())
    if removed_at and result.node:
        lost = removed_at[0]
        restarts = process_records(run_dir, since=lost)
        if all(name in restarts for name in result.on_node):
            result.restarted_s = max(restarts[name][0]["time"] for name in result.on_node) - lost
        if "started_at" in result.summary:
            offset = lost - result.summary["started_at"]  # the loss on the run's clock (metrics.jsonl's ``t``)
            events = read_events(run_dir / "metrics.jsonl")
            after = [e["t"] - offset for e in events if e.get("kind") == "batch" and e["t"] > offset]
            result.first_batch_s = min(after) if after else None
            versions = [e["t"] - offset for e in events if e.get("kind") == "version" and e["t"] > offset]
            result.next_version_s = min(versions) if versions else None
    return result
