"""Checkpoints and the version registry on disk, and the one way to follow them (DESIGN.md §8).

A run publishes critic versions as HF checkpoint directories ``RUN_DIR/versions/vNNNN`` plus one
fsynced JSON line per ``WeightVersion`` in ``RUN_DIR/versions/registry.jsonl``. That file alone says
which versions exist, for a running run and a finished one, from any process, with no Ray handle:

* ``checkpoint_checksum`` is what a version's ``checksum`` records (and what subscribers verify);
* ``read_registry`` loads the whole file (the registry actor, on start and restart);
* ``RegistryTail`` reads only what was appended since its last poll;
* ``VersionFollower`` keeps one inference backend on the newest published version that loads. Every
  subscriber uses it: the engine hosts between requests, and every Serve replica in a background
  thread. A version whose checkpoint does not match its checksum, or does not load, is logged,
  counted and never tried again; the backend keeps what it has.

The registry file says *which* versions exist; the weights come from a ``WeightSource`` when the
follower has one (in a run: Ray's object store, ``scrit.actors.registry.ObjectStoreWeights``), else
from the checkpoint. A version whose in-memory copy is gone (its owner died) is read from disk.

Ray-free, so all of it runs and is tested in-process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec

from scrit import telemetry
from scrit.messages import WeightVersion

__all__ = [
    "RegistryError",
    "RegistryTail",
    "VersionFollower",
    "WeightSource",
    "checkpoint_checksum",
    "read_registry",
    "registry_path",
    "remove_unpublished_checkpoints",
    "resolve_uri",
    "version_dir",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
_CHUNK = 1 << 20


class RegistryError(ValueError):
    """``registry.jsonl`` is corrupt beyond a torn last line; the message names the file and byte."""


def registry_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run's published versions are recorded."""
    return Path(run_dir) / VERSIONS_DIR / "registry.jsonl"


def version_dir(run_dir: str | os.PathLike[str], version: int) -> Path:
    """Where version ``version``'s checkpoint lives: ``run_dir/versions/v0001`` etc."""
    return Path(run_dir).resolve() / VERSIONS_DIR / f"v{version:04d}"


def trained_weights_path(run_dir: str | os.PathLike[str], version: int) -> Path:
    """Where the trainer keeps its own weights at ``version`` when what it publishes is mixed with the
    seed's (``train.seed_share``): a restarted trainer resumes from these, not from the published mix.
    Outside ``versions/`` so that no engine loads them as part of a checkpoint."""
    return Path(run_dir).resolve() / "trained" / f"v{version:04d}.safetensors"


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


def verify_checkpoint(version: WeightVersion) -> None:
    """Raise ValueError unless ``version.uri`` holds the checkpoint its checksum names.

    Guards subscribers against a checkpoint that is still being written, was overwritten or lost a
    file. A URI that is not a local directory (an HTTP server owns its weights) is not checked.
    """
    if not version.checksum or version.uri.startswith(("http://", "https://")):
        return
    if not Path(version.uri).is_dir():
        raise ValueError(f"checkpoint directory of version {version.version} is missing: {version.uri}")
    try:
        actual = checkpoint_checksum(version.uri)
    except OSError as error:
        raise ValueError(f"checkpoint of version {version.version} unreadable: {error}") from error
    if actual != version.checksum:
        raise ValueError(f"checksum mismatch for version {version.version} at {version.uri!r}: "
                         f"published {version.checksum}, found {actual}")


def read_registry(run_dir: str | os.PathLike[str]) -> list[WeightVersion]:
    """Every version a run published, oldest first (the seed, version 0, is never in the file).

    A torn last line (a crash mid-write: ``publish`` had not returned, so nobody relied on it) is cut
    off the file; a complete last record without its newline gets one. A bad line anywhere else is
    corruption: RegistryError names the file and byte offset. Versions must increase strictly.
    """
    path = registry_path(run_dir)
    if not path.is_file():
        return []
    decoder = msgspec.json.Decoder(WeightVersion)
    data = path.read_bytes()
    out: list[WeightVersion] = []
    offset = 0
    for line in data.splitlines(keepends=True):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            version = decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            if data[offset:].strip():
                raise RegistryError(f"{path}: byte {start}: not a WeightVersion: {error}") from error
            log.warning("%s: cutting off a torn last line (%s)", path, error)
            _truncate(path, start)
            return out
        if out and version.version <= out[-1].version:
            raise RegistryError(f"{path}: byte {start}: version {version.version} does not follow "
                                f"{out[-1].version}")
        out.append(version)
    if data and not data.endswith(b"\n"):
        with path.open("ab") as handle:  # or the next publish would be glued onto the last record
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    return out


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)
        handle.flush()
        os.fsync(handle.fileno())


def append_registry(run_dir: str | os.PathLike[str], version: WeightVersion) -> None:
    """Append one version durably (fsynced before returning)."""
    path = registry_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write(msgspec.json.encode(version) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def remove_unpublished_checkpoints(run_dir: str | os.PathLike[str]) -> list[str]:
    """Delete what a killed trainer left behind: ``.vNNNN.tmp-*`` / ``.vNNNN.stale-*`` directories and
    ``vNNNN`` directories newer than the last published version (written, never published).

    Only for a run whose trainer is not running (``--resume`` calls it before training starts).
    Returns the names removed.
    """
    root = Path(run_dir) / VERSIONS_DIR
    if not root.is_dir():
        return []
    last = max((v.version for v in read_registry(run_dir)), default=0)
    removed = []
    for entry in sorted(root.iterdir()):
        leftover = entry.name.startswith(".v") and (".tmp-" in entry.name or ".stale-" in entry.name)
        unpublished = entry.name.startswith("v") and entry.name[1:].isdigit() and int(entry.name[1:]) > last
        if entry.is_dir() and (leftover or unpublished):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        log.warning("removed checkpoints that were never published: %s", ", ".join(removed))
    return removed


def resolve_uri(uri: str, run_dir: str | os.PathLike[str]) -> str:
    """An absolute checkpoint path for ``uri``.

    The trainer records absolute paths; a relative one (written by a driver in another working
    directory) is taken relative to the run's ``versions/`` directory when that is where it exists.
    """
    path = Path(uri)
    if path.is_absolute() or uri.startswith(("http://", "https://")):
        return uri
    if path.exists():
        return str(path.resolve())
    candidate = Path(run_dir) / VERSIONS_DIR / path.name
    return str(candidate.resolve()) if candidate.exists() else uri


class RegistryTail:
    """Incremental reader of one registry file; ``poll()`` returns the versions appended since last time.

    * a last line without its newline is a publish still being written: it is left for the next poll;
    * a line that does not decode is logged, counted in ``bad_lines`` and skipped;
    * a file that shrank (a resumed run cut off a torn last line) is read again from the start;
      callers filter versions they already have by number.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = registry_path(self.run_dir)
        self._offset = 0
        self._partial = b""
        self._decoder = msgspec.json.Decoder(WeightVersion)
        self.bad_lines = 0

    def poll(self) -> list[WeightVersion]:
        """Versions appended since the previous call, oldest first (absolute URIs)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []  # no version published yet (or the run has not created its directory)
        if size < self._offset:
            log.warning("%s shrank from %d to %d bytes; reading it again", self.path, self._offset, size)
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # b"" when the data ended with a newline
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                version = self._decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                self.bad_lines += 1
                log.error("%s: skipping a line that is not a WeightVersion: %s", self.path, error)
                continue
            out.append(msgspec.structs.replace(version, uri=resolve_uri(version.uri, self.run_dir)))
        return out


class WeightSource(Protocol):
    """Where a follower gets a published version's weights without reading its checkpoint."""

    name: str  # the transport, as swap records name it ("object_store")

    def fetch(self, version: WeightVersion) -> Mapping[str, Any] | None:
        """The version's state dict, or None when this source does not have it (read the checkpoint)."""
        ...


DISK = "disk"  # the transport of a version read from its checkpoint


class VersionFollower:
    """Keeps ``backend`` on the newest version published in ``run_dir`` that verifies and loads.

    ``poll()`` is cheap when nothing is new (one ``stat``). When versions are waiting it tries the
    newest first: its weights from ``weights`` (the ``WeightSource``) if that has them, else the
    checkpoint after its checksum is verified, then ``backend.load_weights`` (which swaps atomically:
    HF loads beside and switches a reference, vLLM reloads in place after the batch in flight). A
    version that fails is rejected for good (logged, ``swap_errors``), and the next newest is tried.
    ``role`` labels the Prometheus series (``scrit_swap_seconds``, ``scrit_critic_version``); each swap's
    record names its transport.
    """

    def __init__(self, run_dir: str | os.PathLike[str], backend: Any, role: str, *,
                 verify_checksum: bool = True, weights: WeightSource | None = None) -> None:
        self.tail = RegistryTail(run_dir)
        self.backend = backend  # None until ``open`` builds it
        self.role = role
        self.verify_checksum = verify_checksum
        self.weights = weights
        self.transports: dict[str, int] = {}  # swaps (and ``open``) per transport
        self._pending: dict[int, WeightVersion] = {}
        self._lock = threading.Lock()
        self.rejected: set[int] = set()
        self.swaps = 0
        self.swap_errors = 0
        self.swap_latencies: deque[float] = deque(maxlen=100)  # seconds per completed swap, newest last
        self.history: deque[dict[str, Any]] = deque(maxlen=50)
        self.since: dict[int, float] = {backend.version: time.time()} if backend is not None else {}

    def open(self, build: Callable[[WeightVersion], Any], base: WeightVersion) -> Any:
        """Build the backend (``build(version)``) on the newest published version above ``base`` that
        verifies and loads, else on ``base`` (the run's own seed: its failure is raised). A version
        whose weights the ``WeightSource`` has is built as ``base`` and reloaded from them. A published
        version that fails is rejected for good, as in ``poll``. Returns the backend (``self.backend``).

        This is how every subscriber starts, and how a restarted one rejoins on the latest version."""
        with self._lock:
            newer = sorted((v for v in self.tail.poll() if v.version > base.version and v.version not in self.rejected),
                           key=lambda v: v.version, reverse=True)
            for version in [*newer, base]:
                try:
                    weights = self._fetch(version) if version is not base else None
                    if weights is not None:
                        backend = build(base)
                        backend.load_weights(version.version, version.uri, weights=weights)
                    else:
                        if version is not base and self.verify_checksum:
                            verify_checkpoint(version)
                        backend = build(version)
                except Exception as error:  # noqa: BLE001 - a broken checkpoint is skipped, never served
                    if version is base:
                        raise
                    self._reject(version, error, previous=None)
                    continue
                self.backend = backend
                self.since[backend.version] = time.time()
                if version is not base:
                    self._count(self.weights.name if weights is not None else DISK)
                return backend
        raise AssertionError("unreachable: the base version either loads or raises")

    def _fetch(self, version: WeightVersion) -> Mapping[str, Any] | None:
        return self.weights.fetch(version) if self.weights is not None else None

    def _count(self, transport: str) -> None:
        self.transports[transport] = self.transports.get(transport, 0) + 1

    @property
    def version(self) -> int:
        return self.backend.version

    def poll(self) -> bool:
        """Swap to the newest new version that loads; True if the backend changed version."""
        with self._lock:
            for version in self.tail.poll():
                if version.version > self.backend.version and version.version not in self.rejected:
                    self._pending[version.version] = version
            for number in sorted(self._pending, reverse=True):
                version = self._pending.pop(number)
                if number <= self.backend.version:
                    continue
                if self._load(version):
                    self._pending = {n: v for n, v in self._pending.items() if n > number}
                    return True
            return False

    def _load(self, version: WeightVersion) -> bool:
        previous = self.backend.version
        started = time.perf_counter()
        try:
            weights = self._fetch(version)
            if weights is not None:
                self.backend.load_weights(version.version, version.uri, weights=weights)
            else:
                if self.verify_checksum:
                    verify_checkpoint(version)
                self.backend.load_weights(version.version, version.uri)
        except Exception as error:  # noqa: BLE001 - a broken checkpoint must not stop the subscriber
            self._reject(version, error, previous)
            return False
        seconds = time.perf_counter() - started
        now = time.time()
        transport = self.weights.name if weights is not None else DISK
        self.swaps += 1
        self._count(transport)
        self.swap_latencies.append(seconds)
        self.since[version.version] = now
        self.history.append({"version": version.version, "from": previous, "since": now, "transport": transport,
                             "load_s": round(seconds, 4), "published_at": version.created_at or None})
        telemetry.observe_swap(self.role, version, now=now)
        log.info("%s now on critic version %d (was %d; %s, %.2fs)", self.role, version.version, previous,
                 transport, seconds)
        return True

    def _reject(self, version: WeightVersion, error: BaseException, previous: int | None) -> None:
        self.rejected.add(version.version)
        self.swap_errors += 1
        telemetry.count_swap_error(self.role)
        staying = f"staying on {previous}" if previous is not None else "starting on an older one"
        log.error("%s: critic version %d (%s) rejected, %s: %s", self.role, version.version, version.uri,
                  staying, error)

    def stats(self) -> dict[str, Any]:
        return {"version": self.backend.version, "swaps": self.swaps, "swap_errors": self.swap_errors,
                "rejected": sorted(self.rejected), "bad_registry_lines": self.tail.bad_lines,
                "last_swap_s": self.swap_latencies[-1] if self.swap_latencies else None,
                "transports": dict(self.transports)}
