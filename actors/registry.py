"""Weight registry: the one place that says which critic version is current (DESIGN.md §8).

The trainer publishes a ``WeightVersion`` (checkpoint directory + checksum) every K steps. The
registry appends it to ``run_dir/versions/registry.jsonl`` (fsynced) before ``publish`` returns;
subscribers follow that file (``scrit.checkpoints.VersionFollower``) and load new versions
themselves, so weights never pass through the registry or Ray's object store.

``WeightRegistry`` is a plain class (no Ray import) so it is testable in-process;
``weight_registry_actor()`` wraps it as a named Ray actor, importing Ray only when called.

* Version 0 is always the seed checkpoint the run started from.
* Versions increase strictly: a stale or duplicate publish is refused, so a subscriber can compare
  version numbers alone.
* Its state is the file: a restarted actor (``max_restarts``) or a ``--resume`` rebuilds it from
  ``registry.jsonl``, and nothing published is lost.
* ``request_stop()`` is the run's stop flag: the driver sets it, the trainer polls it and finishes
  its current step.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from scrit.checkpoints import append_registry, checkpoint_checksum, read_registry, registry_path
from scrit.messages import WeightVersion
from scrit.rundir import record_process

__all__ = ["WeightRegistry", "weight_registry_actor"]

log = logging.getLogger(__name__)


class WeightRegistry:
    """Published critic versions (0 = seed), persisted append-only, plus the run's stop flag."""

    def __init__(self, run_dir: str | os.PathLike[str], seed_uri: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = registry_path(run_dir)
        self._lock = threading.Lock()
        self._stop = False
        self._metrics_targets: dict[str, str] = {}
        record_process(self.run_dir, "registry")
        published = read_registry(self.run_dir)
        self._versions: list[WeightVersion] = [self._seed_version(seed_uri), *published]
        self.resumed = len(published)  # versions reloaded from the file

    @staticmethod
    def _seed_version(seed_uri: str | os.PathLike[str]) -> WeightVersion:
        """Version 0. created_at is the checkpoint's own mtime, so it is the same record after every
        resume. A seed that is not a local directory (a model behind an HTTP endpoint) has no checksum."""
        from scrit.backends import resolve_model_path

        seed_uri = resolve_model_path(str(seed_uri))  # the spec "seed" names the shipped seed model
        root = Path(seed_uri)
        if not root.is_dir():
            return WeightVersion(version=0, uri=str(seed_uri), checksum="", created_at=0.0)
        checksum = checkpoint_checksum(root)
        stamp = max(p.stat().st_mtime for p in root.iterdir() if p.is_file())
        return WeightVersion(version=0, uri=str(seed_uri), checksum=checksum, created_at=stamp)

    def publish(self, version: WeightVersion) -> WeightVersion:
        """Record a new version (durably, before returning); it must be newer than the latest."""
        if not isinstance(version, WeightVersion):
            raise TypeError(f"expected WeightVersion, got {type(version).__name__}")
        with self._lock:
            latest = self._versions[-1]
            if version.version <= latest.version:
                raise ValueError(f"version {version.version} is not newer than the latest ({latest.version})")
            append_registry(self.run_dir, version)
            self._versions.append(version)
        log.info("published critic version %d (%s)", version.version, version.uri)
        return version

    def latest(self) -> WeightVersion:
        return self._versions[-1]

    def get(self, version: int) -> WeightVersion:
        """The WeightVersion numbered ``version``; KeyError if it was never published."""
        for item in self._versions:
            if item.version == version:
                return item
        raise KeyError(f"no critic version {version}")

    def history(self) -> list[WeightVersion]:
        """Every version, oldest (the seed) first."""
        return list(self._versions)

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def register_metrics_target(self, component: str, url: str) -> None:
        """A process's Prometheus exporter URL (e.g. the trainer's rank 0); the driver lists them."""
        self._metrics_targets[str(component)] = str(url)

    def metrics_targets(self) -> dict[str, str]:
        """Exporter URLs registered so far, by component."""
        return dict(self._metrics_targets)


# ------------------------------------------------------------------------------------------------
# Ray shell (Ray is imported only here)

_actor_class: Any = None


def _remote_class() -> Any:
    global _actor_class
    if _actor_class is None:
        import ray

        _actor_class = ray.remote(WeightRegistry)
    return _actor_class


def weight_registry_actor(
    run_dir: str | os.PathLike[str],
    seed_uri: str | os.PathLike[str],
    num_cpus: float = 0.1,
    name: str = "scrit-registry",
    *,
    actor_options: dict[str, Any] | None = None,
) -> Any:
    """Start (or, with ``get_if_exists``, join) the named registry actor.

    Named so any process of the run (trainer workers, Serve replicas) can find it with
    ``ray.get_actor(name)``; joining an existing one makes a restarted driver reuse the live registry
    instead of failing on the name. A small fractional CPU: it only answers short calls.
    ``actor_options`` may set ``max_restarts``: a restarted registry reloads ``registry.jsonl``.
    """
    options = {"num_cpus": num_cpus, "name": name, "get_if_exists": True, **(actor_options or {})}
    return _remote_class().options(**options).remote(str(run_dir), str(seed_uri))
