"""Weight registry: the one place that says which critic version is current (DESIGN.md §8).

The trainer publishes a ``WeightVersion`` (checkpoint directory + checksum) every K steps; every
subscriber (critic, corrector, validator engines, Serve replicas) asks ``latest()`` between batches
and loads a newer version itself, so weights never pass through the registry or Ray's object store.

``WeightRegistry`` is a plain class (no Ray import) so it is testable in-process;
``weight_registry_actor()`` wraps it as a named Ray actor, importing Ray only when called.

* Version 0 is always the seed checkpoint the run started from.
* Versions increase strictly: a stale or duplicate publish is refused, so a subscriber can compare
  version numbers alone.
* Published versions are appended to ``run_dir/versions/registry.jsonl`` (one JSON object a line,
  fsynced) before ``publish`` returns, so ``--resume`` reloads them and continues from the last one.
* ``request_stop()`` is the run's stop flag: the driver sets it, the trainer and producers poll it
  and finish their current step, and ``wait_for_version`` returns at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from scrit.messages import WeightVersion

__all__ = ["WeightRegistry", "checkpoint_checksum", "registry_path", "weight_registry_actor"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def registry_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run's published versions are recorded."""
    return Path(run_dir) / "versions" / "registry.jsonl"


def checkpoint_checksum(directory: str | os.PathLike[str]) -> str:
    """sha256 over a checkpoint's weights and config: ``*.safetensors`` (sorted by name) + config.json.

    Each file contributes its name and size before its bytes, so renaming or splitting shards
    changes the digest. Tokenizer and optimizer files are left out: they do not change what the
    weights compute, and hashing them would only cost time. Raises FileNotFoundError when the
    directory has neither weights nor config.
    """
    root = Path(directory)
    files = sorted(root.glob("*.safetensors"), key=lambda p: p.name)
    if (root / "config.json").is_file():
        files.append(root / "config.json")
    if not files:
        raise FileNotFoundError(f"no *.safetensors or config.json in {str(root)!r}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class WeightRegistry:
    """Published critic versions (0 = seed), persisted append-only, plus the run's stop flag."""

    def __init__(self, run_dir: str | os.PathLike[str], seed_uri: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = registry_path(run_dir)
        self._lock = threading.Lock()
        self._stop = False
        self._metrics_targets: dict[str, str] = {}
        self._versions: list[WeightVersion] = [self._seed_version(seed_uri)]
        self.resumed = 0  # versions reloaded from the log
        for version in self._load():
            if version.version <= self._versions[-1].version:
                raise ValueError(f"{self.path}: version {version.version} does not follow "
                                 f"{self._versions[-1].version}")
            self._versions.append(version)
            self.resumed += 1

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

    def _load(self) -> list[WeightVersion]:
        """Versions recorded by an earlier run.

        A torn last line (a crash mid-write; ``publish`` had not returned, so nobody relied on it) is
        cut off the file; a bad line anywhere else is corruption and raises.
        """
        if not self.path.is_file():
            return []
        decoder = msgspec.json.Decoder(WeightVersion)
        data = self.path.read_bytes()
        out: list[WeightVersion] = []
        offset = 0
        for line in data.splitlines(keepends=True):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                out.append(decoder.decode(line))
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                if data[offset:].strip():
                    raise ValueError(f"{self.path}: byte {start}: not a WeightVersion: {error}") from error
                log.warning("%s: cutting off a torn last line (%s)", self.path, error)
                with self.path.open("r+b") as handle:
                    handle.truncate(start)
                    handle.flush()
                    os.fsync(handle.fileno())
                return out
        if data and not data.endswith(b"\n"):
            # A complete last record without its newline: end the line, or the next publish would be
            # glued onto it.
            with self.path.open("ab") as handle:
                handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        return out

    # -------------------------------------------------------------------------------------------

    def publish(self, version: WeightVersion) -> WeightVersion:
        """Record a new version (durably, before returning); it must be newer than the latest."""
        if not isinstance(version, WeightVersion):
            raise TypeError(f"expected WeightVersion, got {type(version).__name__}")
        with self._lock:
            latest = self._versions[-1]
            if version.version <= latest.version:
                raise ValueError(f"version {version.version} is not newer than the latest ({latest.version})")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = msgspec.json.encode(version) + b"\n"
            with self.path.open("ab") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
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

    def register_metrics_target(self, component: str, url: str) -> None:
        """A process's Prometheus exporter URL (e.g. the trainer's rank 0); the driver lists them."""
        self._metrics_targets[str(component)] = str(url)

    def metrics_targets(self) -> dict[str, str]:
        """Exporter URLs registered so far, by component."""
        return dict(self._metrics_targets)

    def stop_requested(self) -> bool:
        return self._stop

    async def wait_for_version(
        self, min_version: int, timeout: float | None = None, poll_s: float = 0.05
    ) -> WeightVersion | None:
        """The latest version once it is ``>= min_version``; None on timeout or when a stop is requested.

        Async so that, in the Ray actor, waiters do not block ``publish`` (synchronous rounds wait
        here for the trainer's next version).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            latest = self._versions[-1]
            if latest.version >= min_version:
                return latest
            if self._stop:
                return None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                await asyncio.sleep(min(poll_s, left))
            else:
                await asyncio.sleep(poll_s)


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
    """
    options = {"num_cpus": num_cpus, "name": name, "get_if_exists": True, **(actor_options or {})}
    return _remote_class().options(**options).remote(str(run_dir), str(seed_uri))
