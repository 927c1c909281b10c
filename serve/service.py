"""The model side of a Serve replica: the critic it serves now, and zero-downtime hot swap (DESIGN.md §8-9).

A replica holds exactly one *active* model (a backend plus its version) and, while a swap is under
way, a second one: the next version is loaded **beside** the active one in a background thread,
then made active by replacing one reference. ``generate_batch`` reads that reference once per batch,
so

* every request of a batch runs on one version, the one the batch started with;
* a request in flight when the swap happens finishes on the old model, which is freed when the last
  batch holding it returns;
* no request waits for a load or fails because of one: requests keep running on the old version
  until the new one is fully loaded and warmed up.

The follower tails the run's ``versions/registry.jsonl`` (``serve/follow.py``) every ``poll_s``
seconds. Before loading a version it checks the checkpoint against the published checksum
(``actors/registry.py: checkpoint_checksum``); a version that fails the check or does not load is
logged, counted and never tried again, and the replica keeps serving what it has. When several new
versions are waiting it takes the newest that loads.

Ray-free (``serve/app.py`` wraps it in the Serve deployment), so it is testable in-process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import msgspec

from scrit.backends.base import Generation, InferenceBackend, SamplingParams
from scrit.messages import WeightVersion
from scrit.serve.follow import RegistryTail
from scrit.serve.schema import Limits

__all__ = ["ActiveModel", "CriticService", "ServeSettings"]

log = logging.getLogger("ray.serve")

_WARMUP_PROMPT = "Critique the student solution.\n"


class ServeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a replica needs, built by ``scrit.serve.app.build_settings`` (picklable, no secrets)."""

    model_uri: str = "seed"  # what to serve when no newer version is published (version ``start_version``)
    start_version: int = 0
    follow_run_dir: str | None = None  # follow this run's registry.jsonl (absolute path)
    poll_s: float = 0.2
    model_name: str = "scrit-critic"
    prompt_style: str = "compact"
    backend: str = "hf"  # "hf" or "vllm" (checkpoint directories are loaded as ``vllm:DIR``); URLs pass through
    backend_options: dict[str, Any] = msgspec.field(default_factory=dict)
    critique_max_new_tokens: int = 512
    limits: Limits = msgspec.field(default_factory=Limits)
    api_key_sha256: str | None = None  # sha256 hex of the API key; None = no auth
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    torch_threads: int = 1
    verify_checksum: bool = True
    metrics_run: str | None = None  # Prometheus ``run`` label (scrit.telemetry, role "serve"); None = off


ROLE = "serve"  # the telemetry role label of endpoint replicas


def telemetry(settings: ServeSettings) -> Any:
    """``scrit.telemetry`` when metrics are on for this replica, else None (recording is then skipped)."""
    if settings.metrics_run is None:
        return None
    try:
        from scrit import telemetry as module
    except ImportError:  # pragma: no cover - metrics are optional for serving
        return None
    return module if module.enabled() else None


@dataclass(frozen=True)
class ActiveModel:
    version: int
    backend: InferenceBackend
    uri: str
    since: float  # wall-clock time this replica started serving it
    load_s: float  # seconds spent loading, verifying and warming it up


def _verify(version: WeightVersion) -> None:
    """Raise ValueError unless the checkpoint directory matches its published checksum."""
    if not version.checksum:
        return
    from scrit.actors.registry import checkpoint_checksum

    actual = checkpoint_checksum(version.uri)
    if actual != version.checksum:
        raise ValueError(f"checksum mismatch for {version.uri!r}: published {version.checksum}, found {actual}")


class CriticService:
    """The active critic of one replica, its registry follower and batched generation."""

    def __init__(self, settings: ServeSettings, *, start_following: bool = True) -> None:
        self.settings = settings
        self._tail = RegistryTail(settings.follow_run_dir) if settings.follow_run_dir else None
        self._pending: dict[int, WeightVersion] = {}  # published, newer than active, not yet tried
        self._bad: set[int] = set()
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self.swaps = 0
        self.swap_errors = 0
        self.swap_history: deque[dict[str, Any]] = deque(maxlen=50)
        self.requests = 0
        self.batches = 0
        self._since: dict[int, float] = {}
        self.active = self._initial()
        self._thread: threading.Thread | None = None
        if self._tail is not None and start_following:
            self._thread = threading.Thread(target=self._follow_loop, name="scrit-follow", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------ loading

    def _load(self, version: WeightVersion) -> ActiveModel:
        """Verify, load and warm up ``version`` beside the active model; raises on any failure."""
        from scrit.backends import make_backend, resolve_model_path

        started = time.perf_counter()
        uri = resolve_model_path(version.uri)
        if self.settings.verify_checksum and Path(uri).is_dir():
            _verify(msgspec.structs.replace(version, uri=uri))
        spec = f"vllm:{uri}" if self.settings.backend == "vllm" and not uri.startswith("http") else uri
        backend = make_backend(spec, version=version.version, **self.settings.backend_options)
        backend.generate([_WARMUP_PROMPT], SamplingParams(max_new_tokens=1))  # first-call costs, off the request path
        return ActiveModel(version=version.version, backend=backend, uri=uri, since=0.0,
                           load_s=time.perf_counter() - started)

    def _initial(self) -> ActiveModel:
        """The newest published version that loads, else ``model_uri`` as ``start_version``."""
        base = WeightVersion(version=self.settings.start_version, uri=self.settings.model_uri, checksum="",
                             created_at=0.0)
        published = self._tail.poll() if self._tail is not None else []
        for version in sorted(published, key=lambda v: v.version, reverse=True):
            if version.version <= base.version:
                break
            try:
                return self._activate(self._load(version))
            except Exception as error:  # noqa: BLE001 - a broken checkpoint is skipped, never served
                self._reject(version, error)
        return self._activate(self._load(base))  # the base model must load: nothing else to serve

    def _activate(self, model: ActiveModel) -> ActiveModel:
        now = time.time()
        model = ActiveModel(version=model.version, backend=model.backend, uri=model.uri, since=now,
                            load_s=model.load_s)
        self._since[model.version] = now
        self.active = model  # one reference assignment: the next batch runs on it
        metrics = telemetry(self.settings)
        if metrics is not None:
            metrics.set_version(ROLE, model.version)
        return model

    def _reject(self, version: WeightVersion, error: BaseException) -> None:
        self._bad.add(version.version)
        self.swap_errors += 1
        metrics = telemetry(self.settings)
        if metrics is not None:
            metrics.count_swap_error(ROLE)
        log.error("critic version %d (%s) is not served: %s", version.version, version.uri, error)

    def poll_once(self) -> bool:
        """Read the registry; load and switch to the newest new version that loads. True if switched."""
        if self._tail is None:
            return False
        with self._swap_lock:
            for version in self._tail.poll():
                if version.version > self.active.version and version.version not in self._bad:
                    self._pending[version.version] = version
            for number in sorted(self._pending, reverse=True):
                version = self._pending.pop(number)
                if number <= self.active.version:
                    continue
                try:
                    loaded = self._load(version)
                except Exception as error:  # noqa: BLE001 - keep serving the active version
                    self._reject(version, error)
                    continue
                previous = self.active.version
                model = self._activate(loaded)
                self._pending = {n: v for n, v in self._pending.items() if n > model.version}
                self.swaps += 1
                published = version.created_at or None
                metrics = telemetry(self.settings)
                if metrics is not None:
                    metrics.observe_swap(ROLE, version, now=model.since)
                self.swap_history.append({"version": model.version, "from": previous, "since": model.since,
                                          "load_s": round(model.load_s, 4), "published_at": published})
                log.info("now serving critic version %d (was %d; loaded in %.2fs)", model.version, previous,
                         model.load_s)
                return True
        return False

    def _follow_loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the follower must outlive any one bad poll
                log.exception("registry poll failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --------------------------------------------------------------------------- serving

    def since(self, version: int) -> float | None:
        """When this replica started serving ``version`` (None if it never did)."""
        return self._since.get(version)

    async def generate_batch(self, items: Sequence[tuple[str, SamplingParams]]) -> list[Generation | Exception]:
        """One Generation per (prompt, sampling), all on the version active when the batch starts.

        Items with equal sampling share one ``backend.generate`` call (one padded forward pass per
        step). A failing group returns its exception in its items' places; the others still succeed.
        """
        model = self.active
        self.batches += 1
        self.requests += len(items)
        groups: dict[SamplingParams, list[int]] = {}
        for index, (_, sampling) in enumerate(items):
            groups.setdefault(sampling, []).append(index)
        results: list[Generation | Exception] = [RuntimeError("not generated")] * len(items)
        for sampling, indices in groups.items():
            prompts = [items[i][0] for i in indices]
            started = time.perf_counter()
            try:
                generations = await asyncio.to_thread(model.backend.generate, prompts, sampling)
            except Exception as error:  # noqa: BLE001 - reported per request by the caller
                log.exception("generation failed for %d prompts on version %d", len(prompts), model.version)
                generations = [error] * len(prompts)
            else:
                metrics = telemetry(self.settings)
                if metrics is not None:
                    metrics.record_generation(ROLE, generations, time.perf_counter() - started)
            for i, generation in zip(indices, generations):
                results[i] = generation
        return results

    def health(self) -> dict[str, Any]:
        model = self.active
        return {
            "critic_version": model.version,
            "model_uri": model.uri,
            "version_since": model.since,
            "following": self.settings.follow_run_dir,
            "swaps": self.swaps,
            "swap_errors": self.swap_errors,
            "last_swap": self.swap_history[-1] if self.swap_history else None,
            "recent_swaps": list(self.swap_history),
            "requests": self.requests,
            "batches": self.batches,
            "pid": os.getpid(),
        }
