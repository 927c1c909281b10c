"""A run directory and the files a run writes there (Ray-free).

``RUN_DIR/`` holds ``config.yaml`` (the resolved config, secrets redacted), ``buffer/`` (the durable
example log), ``versions/`` (checkpoints + ``registry.jsonl``), ``metrics.jsonl`` (one event per
pipeline batch and per evaluation, written by ``EventLog``), ``train_metrics.jsonl`` (the trainer),
``run.log`` (full tracebacks of failures), ``processes.jsonl`` (every component process that started:
name, pid, time; restarts show as repeated names), and at the end ``report.md`` with plots and
``summary.json`` (written last and whole: scripts wait for it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "EventLog",
    "buffer_log_path",
    "RunDirError",
    "interrupts_deferred",
    "prepare_run_dir",
    "process_records",
    "process_starts",
    "read_events",
    "record_process",
    "write_json_atomic",
]

PROCESSES_FILE = "processes.jsonl"


def buffer_log_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run's replay log lives (the replay buffer actor owns it; reports read it)."""
    return Path(run_dir) / "buffer" / "examples.log"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists without --resume, or missing with it)."""


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Create a fresh run directory, or check that the one to resume exists."""
    registry_file = run_dir / "versions" / "registry.jsonl"
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"--resume: run directory {run_dir} does not exist")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        hint = " (it holds a run: add --resume to continue it)" if registry_file.exists() else ""
        raise RunDirError(f"run directory {run_dir} is not empty{hint}; choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Events of a JSON-lines file; a torn last line (crash mid-write) is skipped."""
    events = []
    path = Path(path)
    if not path.is_file():
        return events
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


class EventLog:
    """Append-only JSON lines (``metrics.jsonl``); each event gets ``t``, seconds since the run started."""

    def __init__(self, path: Path, started: float) -> None:
        self.path = path
        self.started = started
        self.lock = threading.Lock()

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        from scrit import telemetry

        event = {"kind": kind, "t": round(time.time() - self.started, 2), **fields}
        with self.lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
        telemetry.record_event(event)  # Prometheus: pipeline counters, pass rate, eval scores
        return event


def record_process(run_dir: str | os.PathLike[str], component: str) -> None:
    """Note that ``component`` (``critic.0``, ``buffer``, ``trainer.rank1``, ...) started in this process.

    Each actor calls this in its constructor, so a restarted actor adds a line: operators see which
    pid is which and on which Ray node it runs, and the driver counts restarts (and tells a lost node
    from a dead process by that node). One short ``O_APPEND`` write per line keeps concurrent writers
    from interleaving.
    """
    path = Path(run_dir) / PROCESSES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"component": component, "pid": os.getpid(), "time": time.time(), **_ray_node()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _ray_node() -> dict[str, str]:
    """``{"node": id, "ip": address}`` of this process's Ray node, or ``{}`` outside Ray (Ray is not
    imported here: a process that runs in Ray has imported it already)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    return {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


def process_records(run_dir: str | os.PathLike[str], since: float = 0.0) -> dict[str, list[dict[str, Any]]]:
    """Each component's process starts at or after ``since``, oldest first: ``{"pid", "time"}`` and,
    in Ray, ``{"node", "ip"}``."""
    starts: dict[str, list[dict[str, Any]]] = {}
    for event in read_events(Path(run_dir) / PROCESSES_FILE):
        if event.get("time", 0.0) >= since:
            starts.setdefault(event["component"], []).append(event)
    return starts


def process_starts(run_dir: str | os.PathLike[str], since: float = 0.0) -> dict[str, list[int]]:
    """The pids each component started with (oldest first), counting starts at or after ``since``."""
    return {name: [int(start["pid"]) for start in starts] for name, starts in process_records(run_dir, since).items()}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over: readers see all of it or none."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(staging, path)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; `ray job stop`, Kubernetes and schedulers


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def stop_signals_interrupt() -> None:
    """SIGTERM stops a run the way Ctrl-C does (KeyboardInterrupt: summary, status 'interrupted').

    Python's default for SIGTERM is to die on the spot, without the summary. Main thread only.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_interrupt)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then raise KeyboardInterrupt (only the main thread can)."""
    received: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, lambda got, _frame: received.append(got))
    except ValueError:  # not the main thread: signals are not ours to hold
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt
