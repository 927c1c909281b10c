"""A run survives crashes, says how it ended, and resumes after kill -9 (README, "Failures").

Real runs of ``configs/tiny-test.yaml`` in their own process: the chaos test kills (``kill -9`` by
pid, from ``RUN_DIR/processes.jsonl``) the critic actor, then a Ray Train worker, then the replay
buffer actor while clients query the endpoint; the resume test kills the whole ``scrit run``
process group and continues the run. Bad files on ``--resume`` get a clear error naming the file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

from scrit.rundir import buffer_log_path
from scrit.replay_log import LogLockedError, RecordLog
from scrit.rundir import process_starts

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-test.yaml"


def start_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "scrit.cli", "run", "--config", str(TINY), "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: killpg reaches only this run


def examples_in_log(run_dir: Path) -> int:
    path = buffer_log_path(run_dir)
    return RecordLog(path, readonly=True).count if path.is_file() else 0


def published(run_dir: Path) -> int:
    path = run_dir / "versions" / "registry.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["version"] for line in path.read_text().splitlines() if line.strip()), default=0)


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended while waiting for {what}: {process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def current_pid(run_dir: Path, component: str) -> int | None:
    pids = process_starts(run_dir).get(component)
    return pids[-1] if pids else None


def kill(run_dir: Path, component: str) -> int:
    pid = current_pid(run_dir, component)
    assert pid is not None, f"{component} never started"
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.slow
def test_chaos_run_survives_killed_critic_trainer_and_buffer(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start_run(run_dir, "--set", "run.versions=3", "--set", "run.max_wall_seconds=1500",
                        "--set", "serve.enabled=true", "--set", f"serve.port={free_port()}")
    counts: list[int] = []
    requests: list[tuple[float, str]] = []  # (sent at, status code or error)
    stop = threading.Event()

    def watch_buffer() -> None:
        while not stop.is_set():
            counts.append(examples_in_log(run_dir))
            time.sleep(0.5)

    def query_endpoint(url: str) -> None:
        body = {"problem": "Start with 12. Add 5. Multiply by 3. What is the result?",
                "steps": ["12 + 5 = 17", "17 * 3 = 52"]}
        # Until the run writes summary.json: after that it shuts its endpoint down, on purpose.
        while not stop.is_set() and not (run_dir / "summary.json").is_file():
            started = time.time()
            try:
                outcome = str(httpx.post(f"{url}/v1/critique", json=body, timeout=60).status_code)
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            requests.append((started, outcome))
            time.sleep(0.2)

    threads = [threading.Thread(target=watch_buffer, daemon=True)]
    try:
        wait_for(lambda: (run_dir / "endpoint.json").is_file(), "the endpoint", process)
        url = json.loads((run_dir / "endpoint.json").read_text())["url"]
        threads.append(threading.Thread(target=query_endpoint, args=(url,), daemon=True))
        for thread in threads:
            thread.start()

        wait_for(lambda: examples_in_log(run_dir) > 0, "the first kept examples", process)
        killed = {"critic.0": kill(run_dir, "critic.0")}
        wait_for(lambda: published(run_dir) >= 1 and current_pid(run_dir, "trainer.rank0"), "version 1", process)
        killed["trainer.rank0"] = kill(run_dir, "trainer.rank0")
        wait_for(lambda: current_pid(run_dir, "trainer.rank0") != killed["trainer.rank0"], "a new trainer", process)
        killed["buffer"] = kill(run_dir, "buffer")
        last_kill = time.time()
        stdout, stderr = process.communicate(timeout=1500)
    finally:
        stop.set()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["versions"] == 3
    assert all(summary["restarts"].get(name, 0) >= 1 for name in killed), summary["restarts"]
    starts = process_starts(run_dir)
    assert all(pid in starts[name] and starts[name][-1] != pid for name, pid in killed.items())
    assert counts == sorted(counts) and counts[-1] > 0  # the buffer's examples never went down
    assert requests, "the endpoint was never queried"
    failed = [(round(t - last_kill, 1), outcome) for t, outcome in requests if outcome != "200"]
    print(f"chaos: restarts {summary['restarts']}, batches resent {summary['batch_retries']}, buffer examples "
          f"{counts[0]} -> {counts[-1]} (never down), endpoint requests {len(requests)}, failed {failed} "
          f"(seconds after the last kill), versions {summary['versions']}, wall {summary['wall_seconds']} s")
    # A request may fail around the kills, none long after them (times relative to the last kill).
    assert len(failed) <= 3 and not [t for t, _ in failed if t > 30], failed
    report = (run_dir / "report.md").read_text()
    assert "status: **completed**" in report and "restarts:" in report


@pytest.mark.slow
def test_resume_after_killing_the_whole_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start_run(run_dir, "--set", "run.versions=1")
    try:
        wait_for(lambda: examples_in_log(run_dir) > 0, "kept examples", process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # driver, actors, trainer: everything of this run
        process.communicate()
    before = examples_in_log(run_dir)
    # What a kill in the middle of a checkpoint write leaves: never published, removed on resume.
    half = run_dir / "versions" / ".v0001.tmp-deadbeef"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half a checkpoint")
    deadline = time.monotonic() + 120
    while True:  # the killed run's processes let go of the buffer log
        try:
            RecordLog(buffer_log_path(run_dir)).close()
            break
        except LogLockedError:
            assert time.monotonic() < deadline, "the killed run still holds the buffer log"
            time.sleep(1)

    resumed = start_run(run_dir, "--resume")
    stdout, stderr = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["versions"] == 1 and summary["resumed"]
    assert not half.exists()
    registry = [json.loads(line) for line in (run_dir / "versions" / "registry.jsonl").read_text().splitlines()]
    assert [r["version"] for r in registry] == [1] and registry[0]["uri"].endswith("v0001")
    print(f"resume: examples in the buffer log at the kill {before}, after the resumed run {examples_in_log(run_dir)}; "
          f"half-written checkpoint removed; {summary['versions']} version published, wall {summary['wall_seconds']} s")
    assert examples_in_log(run_dir) >= before > 0  # nothing validated was lost
    starts = process_starts(run_dir)
    assert len(starts["buffer"]) == 2  # the killed run's buffer, then the resumed one


def test_resume_with_a_corrupt_config_names_the_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run:\n  versions: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "scrit.cli", "run", "--run-dir", str(run_dir), "--resume"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and str(run_dir / "config.yaml") in result.stderr
    assert "malformed YAML" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_resume_with_a_corrupt_registry_fails_cleanly_and_keeps_the_buffer(tmp_path: Path) -> None:
    from scrit.messages import TrainingExample

    run_dir = tmp_path / "run"
    (run_dir / "versions").mkdir(parents=True)
    (run_dir / "versions" / "registry.jsonl").write_text('{"type":"WeightVersion","version":1}\ngarbage\n{}\n')
    log = RecordLog(buffer_log_path(run_dir), expected=TrainingExample)
    log.append([TrainingExample(prompt="p", target="t", student_correct=True, problem_id="x", version=0)])
    log.close()
    process = start_run(run_dir, "--resume")
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 1
    assert "registry" in stderr and "registry.jsonl" in stderr and "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]["component"] == "registry"
    assert "Traceback" in (run_dir / "run.log").read_text()
    assert examples_in_log(run_dir) == 1
