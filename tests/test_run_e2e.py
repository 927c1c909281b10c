"""`scrit run` end to end on a real local Ray with the shipped seed: one version, then --resume to two.

Slow (minutes): it starts Ray, the actors and Ray Train for real, so it is marked and runs in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def scrit_run(run_dir: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "scrit.cli", "run", "--config", str(REPO / "configs" / "tiny-test.yaml"),
               "--run-dir", str(run_dir), *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    first = scrit_run(run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
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
