"""`ray job submit` as the README documents it, against a real local head with token authentication.

The test starts its own head (`ray start --head --block`) with its own temp dir, free ports and a
token of its own (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), submits

    ray job submit --address http://127.0.0.1:PORT --working-dir . --runtime-env deploy/runtime_env.yaml \
        -- scrit run --config configs/tiny-test.yaml --run-dir /abs/tmp/run

from the repository root, waits for SUCCEEDED and checks the run's artifacts. It also checks that a
client without the token is refused. Teardown never uses `ray stop` (that kills every Ray process on
the machine, including other tests' clusters): every process of this head carries a marker variable
in its environment, and exactly those processes are terminated.

Slow: 4.4 min on the shared 2-core dev machine under load (the tiny run itself is ~2.5 min).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from scrit.actors.local_cluster import marked_pids

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, scrit and python of this interpreter
pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 600
MARKER = "SCRIT_JOB_SUBMIT_TEST"


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _marked_pids(marker: str) -> list[int]:
    """PIDs of processes whose environment holds ``MARKER=marker`` (this head and everything it started)."""
    return marked_pids(marker, MARKER)


def _kill_marked(marker: str, leader: subprocess.Popen | None, grace_s: float = 30.0) -> None:
    if leader is not None and leader.poll() is None:
        leader.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
        try:
            leader.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            leader.kill()
    deadline = time.time() + grace_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while time.time() < deadline and _marked_pids(marker):
            time.sleep(0.5)
        deadline = time.time() + 10


class Head:
    """A local Ray head of this test only."""

    def __init__(self, workdir: Path) -> None:
        self.marker = uuid.uuid4().hex
        # Short path: Ray's unix sockets live under it and must stay below ~107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="scrit-ray-", dir="/tmp"))
        token_file = workdir / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_port,
         self.metrics_port) = _free_ports(5)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.client_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                           "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
        self.env = {**self.client_env, MARKER: self.marker}
        self.log = open(workdir / "ray-head.log", "w")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
            "--port", str(self.gcs_port), "--temp-dir", str(self.temp_dir),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(self.client_port),
            "--dashboard-agent-listen-port", str(self.agent_port),
            "--metrics-export-port", str(self.metrics_port),
        ]
        self.process = subprocess.Popen(command, env=self.env, cwd=self.temp_dir, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}; see {self.log.name}")
            probe = self.ray("job", "list", "--address", self.address, timeout=60, check=False)
            if probe.returncode == 0:
                return
            time.sleep(2)
        raise RuntimeError(f"the Ray head did not come up in 180 s; see {self.log.name}")

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env or self.client_env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def stop(self) -> None:
        _kill_marked(self.marker, self.process)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def head(tmp_path: Path):
    instance = Head(tmp_path)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        assert not _marked_pids(instance.marker), "processes of the test's Ray head survived teardown"


def _wait_for(head: Head, job_id: str, timeout_s: float) -> str:
    """The job's final status (SUCCEEDED, FAILED, STOPPED), or the last one seen at the timeout."""
    deadline = time.time() + timeout_s
    status = "UNKNOWN"
    while time.time() < deadline:
        out = head.ray("job", "status", "--address", head.address, job_id, timeout=60, check=False)
        text = out.stdout + out.stderr
        # `ray job status` prints "Job 'ID' succeeded" / "failed" / "was stopped" for a finished job
        # and "Status for job 'ID': RUNNING" otherwise.
        final = re.search(r"Job '[^']*' (succeeded|failed|was stopped)", text)
        if final:
            return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[final.group(1)]
        running = re.search(r"Status for job '[^']*': (?:JobStatus\.)?(\w+)", text)
        if running:
            status = running.group(1)
        time.sleep(5)
    return status


def test_ray_job_submit_runs_scrit(head: Head, tmp_path: Path) -> None:
    # Token authentication is on: a client without the token is turned away.
    anonymous = {k: v for k, v in head.client_env.items() if not k.startswith("RAY_AUTH")}
    anonymous.update(RAY_AUTH_MODE="disabled", HOME=str(tmp_path))  # no ~/.ray/auth_token either
    refused = head.ray("job", "list", "--address", head.address, env=anonymous, timeout=60, check=False)
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert "401" in refused.stdout + refused.stderr or "uthentication" in refused.stdout + refused.stderr

    run_dir = tmp_path / "run"  # absolute: the job's own working directory is a temporary copy
    job_id = f"scrit-test-{uuid.uuid4().hex[:8]}"
    head.ray("job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait",
             "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml", "--",
             "scrit", "run", "--config", "configs/tiny-test.yaml", "--run-dir", str(run_dir), timeout=300)
    status = _wait_for(head, job_id, JOB_TIMEOUT_S)
    logs = head.ray("job", "logs", "--address", head.address, job_id, timeout=120, check=False).stdout
    assert status == "SUCCEEDED", f"job {job_id} ended {status}:\n{logs[-5000:]}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"] >= 1 and summary["config"]["run"]["name"] == "tiny-test"
    assert Path(summary["final_model"]).is_dir()
    registry = [json.loads(line) for line in (run_dir / "versions" / "registry.jsonl").read_text().splitlines()]
    assert any(r["version"] >= 1 for r in registry)
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "report.md").is_file()
    # The job ran this checkout's code from the uploaded working_dir copy, under the runtime env.
    assert "scrit run" in logs and "completed: 1 versions" in logs
