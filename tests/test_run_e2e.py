"""`scrit run` end to end on a real local Ray with the shipped seed: one version with the critic endpoint
up (queried during and after the run, --keep-serving, stopped with Ctrl-C), then --resume to two.

Slow (minutes): it starts Ray, the actors and Ray Train for real, so it is marked and runs in CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def scrit_run(run_dir: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "scrit.cli", "run", "--config", str(REPO / "configs" / "tiny-test.yaml"),
               "--run-dir", str(run_dir), *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def critique(url: str) -> httpx.Response:
    body = {"problem": "Start with 12. Add 5. Multiply by 3. What is the result?",
            "steps": ["12 + 5 = 17", "17 * 3 = 52"]}
    return httpx.post(f"{url}/v1/critique", json=body, timeout=120)


def run_serving(run_dir: Path) -> tuple[subprocess.CompletedProcess, list[int]]:
    """The first run, with the critic endpoint on and --keep-serving: query it while the run is going
    and after it ended, then stop it with Ctrl-C (SIGINT). Returns the run and the versions served."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "scrit.cli", "run", "--config", str(REPO / "configs" / "tiny-test.yaml"),
               "--run-dir", str(run_dir), "--set", "serve.enabled=true", "--set", f"serve.port={free_port()}",
               "--keep-serving"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    served = []
    try:
        deadline = time.monotonic() + 600
        while not (run_dir / "endpoint.json").is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the endpoint never came up"
            time.sleep(1)
        url = json.loads((run_dir / "endpoint.json").read_text())["url"]
        response = critique(url)  # during the run
        assert response.status_code == 200, response.text
        served.append(int(response.headers["x-critic-version"]))
        while not (run_dir / "summary.json").is_file():  # the run is over once the summary exists
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(1)
        for _ in range(50):  # after the run: still up, and on the final version within seconds
            response = critique(url)
            assert response.status_code == 200, response.text
            served.append(int(response.headers["x-critic-version"]))
            if served[-1] == 1:
                break
            time.sleep(0.5)
        assert process.poll() is None  # --keep-serving: still running
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), served


def test_run_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    first, served = run_serving(run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert served[0] in (0, 1) and served[-1] == 1 and served == sorted(served)
    assert "critic endpoint" in first.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["endpoint"] and not summary["interrupted"]
    for key in ("versions", "seed_model", "final_model", "wall_seconds", "config", "evals"):
        assert key in summary
    assert summary["versions"] == 1 and summary["config"]["run"]["versions"] == 1
    assert Path(summary["final_model"]).is_dir() and summary["final_model"] != summary["seed_model"]
    assert [e["version"] for e in summary["evals"]] == [0, 1]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "batch" and e["kept"] > 0 for e in events)
    assert (run_dir / "report.md").is_file() and (run_dir / "heldout_scores.png").is_file()
    examples_log = run_dir / "buffer" / "examples.log"
    size_after_first = examples_log.stat().st_size
    assert size_after_first > 0

    again = scrit_run(run_dir)
    assert again.returncode != 0 and "--resume" in again.stderr  # never silently overwrites a run

    resumed = scrit_run(run_dir, "--resume", "--set", "run.versions=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"] == 2 and summary["resumed"]
    assert [e["version"] for e in summary["evals"]] == [0, 1, 2]  # earlier evals kept, not redone
    registry = [json.loads(line) for line in (run_dir / "versions" / "registry.jsonl").read_text().splitlines()]
    assert [r["version"] for r in registry if r["version"] > 0] == [1, 2]
    assert examples_log.stat().st_size >= size_after_first  # the buffer log was continued, not replaced
