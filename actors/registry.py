"""Weight registry: the one place that says which critic version is current (DESIGN.md §8).

The trainer publishes a ``WeightVersion`` (checkpoint directory + checksum) every K steps, with the
version's weights (``scrit.weights.PackedWeights``). The registry puts the weights into Ray's object
store, then appends the version to ``run_dir/versions/registry.jsonl`` (fsynced) before ``publish``
returns; subscribers follow that file (``scrit.checkpoints.VersionFollower``) and take the weights from
the object store through ``weights(version)`` (``ObjectStoreWeights``), or read the checkpoint.

Why the registry, not the trainer, owns the in-memory copy: a Ray object lives as long as the process
that put it, and the trainer's worker is the process most likely to go (its node is preempted, Ray
Train restarts its group); the registry lives with the driver. Only the newest version is kept (a
subscriber still fetching an older one holds its own reference until it is done), so the object store
holds one version. A restarted registry has none: subscribers then read the checkpoint.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from scrit.checkpoints import append_registry, checkpoint_checksum, read_registry, registry_path
from scrit.messages import WeightVersion
from scrit.rundir import record_process
from scrit.weights import PackedWeights

__all__ = ["ObjectStoreWeights", "WeightRegistry", "weight_registry_actor"]

log = logging.getLogger(__name__)


class WeightRegistry:
    """Published critic versions (0 = seed), persisted append-only, plus the run's stop flag."""

    def __init__(self, run_dir: str | os.PathLike[str], seed_uri: str | os.PathLike[str], *,
                 store: Callable[[PackedWeights], Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = registry_path(run_dir)
        self._lock = threading.Lock()
        self._stop = False
        self._metrics_targets: dict[str, str] = {}
        self._store = store or (lambda weights: weights)  # the Ray actor: ray.put (this process owns the copy)
        self._in_memory: tuple[int, Any] | None = None  # (version, what ``store`` returned) of the newest
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

    def publish(self, version: WeightVersion, weights: PackedWeights | None = None) -> WeightVersion:
        """Record a new version (durably, before returning); it must be newer than the latest. Its
        ``weights`` are stored first, so a subscriber that sees the version finds them."""
        if not isinstance(version, WeightVersion):
            raise TypeError(f"expected WeightVersion, got {type(version).__name__}")
        with self._lock:
            latest = self._versions[-1]
            if version.version <= latest.version:
                raise ValueError(f"version {version.version} is not newer than the latest ({latest.version})")
            if weights is not None:
                self._in_memory = (version.version, self._store(weights))
            append_registry(self.run_dir, version)
            self._versions.append(version)
        log.info("published critic version %d (%s%s)", version.version, version.uri,
                 f", {weights.nbytes / 1e6:.1f} MB in memory" if weights is not None else "")
        return version

    def weights(self, version: int) -> list[Any]:
        """``[stored weights]`` of ``version`` if they are in memory, else ``[]`` (read the checkpoint).

        In the Ray actor that is ``[ObjectRef]``: inside a list Ray hands the reference to the caller,
        who fetches the bytes from the nearest object store, not through this actor."""
        held = self._in_memory
        return [held[1]] if held is not None and held[0] == version else []

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


class _RegistryActor(WeightRegistry):
    """The registry as a Ray actor: published weights go into Ray's object store, owned by this actor."""

    def __init__(self, run_dir: str, seed_uri: str) -> None:
        import ray

        super().__init__(run_dir, seed_uri, store=ray.put)


class ObjectStoreWeights(msgspec.Struct, frozen=True, kw_only=True):
    """A ``scrit.checkpoints.WeightSource``: published versions from Ray's object store, through the
    run's registry actor (``registry`` in ``namespace``). Anything that goes wrong (the registry is
    restarting or gone, the object was lost with its node) is logged and makes the follower read the
    checkpoint instead, so the in-memory path can only make a swap faster, never fail one."""

    registry: str
    namespace: str | None = None
    timeout_s: float = 60.0
    name: ClassVar[str] = "object_store"

    def fetch(self, version: WeightVersion) -> Mapping[str, Any] | None:
        import ray
        from ray.exceptions import RayError

        try:
            registry = ray.get_actor(self.registry, namespace=self.namespace)
            refs = ray.get(registry.weights.remote(version.version), timeout=self.timeout_s)
            if not refs:
                return None
            packed: PackedWeights = ray.get(refs[0], timeout=self.timeout_s)
        except (RayError, ValueError) as error:  # ValueError: no actor of that name (yet)
            log.warning("version %d not in memory (%s: %s); reading its checkpoint", version.version,
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return None
        return packed.tensors()


_actor_class: Any = None


def _remote_class() -> Any:
    global _actor_class
    if _actor_class is None:
        import ray

        _actor_class = ray.remote(_RegistryActor)
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
