"""Where Prometheus finds a run's exporters: ``RUN_DIR/prometheus_targets.json`` (file_sd).

Every process that records metrics runs its own exporter on a free port: the driver, each stage
actor, the buffer, the evaluator, the trainer's rank 0 (which registers with the registry actor) and
each Serve replica (which writes its own ``prometheus_targets-serve-*.json``). ``MetricsTargets``
collects the URLs and rewrites the file whenever one appears or moves (an actor restarted on a new
port), checking the registry every second until the run ends.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from scrit import telemetry

__all__ = ["MetricsTargets"]


class MetricsTargets:
    """The run's exporter URLs, kept in ``RUN_DIR/prometheus_targets.json``."""

    def __init__(self, run_dir: Path, run: str, registry: Any, driver_port: int = 0) -> None:
        self.path = run_dir / telemetry.TARGETS_FILE
        self.run = run
        self.registry = registry
        self.targets: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self._update({"driver": telemetry.start_exporter(port=driver_port, run=run)})

    def add_actors(self, actors: dict[str, Any]) -> None:
        """Start each actor's exporter (``metrics_url``) and list it."""
        import ray

        names = [name for name, actor in actors.items() if actor is not None]
        urls = ray.get([actors[name].metrics_url.remote(self.run) for name in names])
        self._update(dict(zip(names, urls)))

    def watch(self, poll_s: float = 1.0) -> None:
        """Pick up exporters that register with the registry actor (the trainer) within a second."""
        threading.Thread(target=self._watch, args=(poll_s,), name="scrit-metrics-targets", daemon=True).start()

    def _watch(self, poll_s: float) -> None:
        import ray

        while not self.stopped.wait(poll_s):
            try:
                if not ray.is_initialized():
                    return
                self._update(ray.get(self.registry.metrics_targets.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - metrics must never stop the run; a restarted registry re-registers
                continue

    def _update(self, found: dict[str, str]) -> None:
        with self.lock:
            new = {name: url for name, url in found.items() if self.targets.get(name) != url}
            if not new:
                return
            self.targets.update(new)
            path = telemetry.write_targets(self.path, self.targets)
        print(f"metrics ({path}): " + "  ".join(f"{name} {url}" for name, url in sorted(new.items())),
              file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.stopped.set()
