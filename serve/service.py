"""The model side of a Serve replica: the critic it serves now, and zero-downtime hot swap (DESIGN.md §8-9).

A replica owns one inference backend. A background thread follows the run's
``versions/registry.jsonl`` with ``scrit.checkpoints.VersionFollower`` (the same subscriber the role
actors use) every ``poll_s`` seconds and calls the backend's ``load_weights``, whose swap is atomic
between batches: the HF backend loads the new weights beside the old ones, warms them up and switches
one reference; vLLM reloads in place once the batch in flight is done. ``generate_batch`` pins the
backend for the whole batch (a swap waits for it), and every generation carries its version, so

* every request of a batch runs on one version, the one the batch started with;
* no request fails because of a swap: a batch either ran before it or runs after it.

A version whose checkpoint fails its checksum or does not load is logged, counted and never tried
again; the replica keeps serving what it has, and when several new versions wait it takes the
newest that loads. Ray-free (``serve/app.py`` wraps it in the Serve deployment), so it is testable
in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import msgspec

from scrit.backends.base import Generation, SamplingParams
from scrit.checkpoints import VersionFollower
from scrit.factory import RoleSpec
from scrit.serve.schema import Limits

__all__ = ["ActiveModel", "CriticService", "ServeSettings"]

log = logging.getLogger("ray.serve")

class ServeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a replica needs, built by ``scrit.serve.app.build_settings`` (picklable, no secrets)."""

    role: RoleSpec  # the model, backend, prompt style and critique sampling (``scrit.factory.serve_role``)
    start_version: int = 0  # the version number of ``role.engine.model`` (what is served until a newer one)
    follow_run_dir: str | None = None  # follow this run's registry.jsonl (absolute path)
    poll_s: float = 0.2
    model_name: str = "scrit-critic"
    limits: Limits = msgspec.field(default_factory=Limits)
    api_key_sha256: str | None = None  # sha256 hex of the API key; None = no auth
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    verify_checksum: bool = True
    metrics_run: str | None = None  # Prometheus ``run`` label (scrit.telemetry, role "serve"); None = off

    @property
    def prompt_style(self) -> str:
        return self.role.style


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
    """What a replica serves now (a snapshot: read it once per use)."""

    version: int
    uri: str
    since: float  # wall-clock time this replica started serving it


class CriticService:
    """One replica's critic: its backend, the registry follower and batched generation."""

    def __init__(self, settings: ServeSettings, *, start_following: bool = True) -> None:
        from scrit.factory import open_engine

        self.settings = settings
        self.requests = 0
        self.batches = 0
        self._stop = threading.Event()
        # The newest published version that verifies and loads (else the start model), through the same
        # VersionFollower that then keeps this replica current (scrit.factory.open_engine).
        self.engine = open_engine(settings.role.engine, settings.follow_run_dir, base_version=settings.start_version,
                                  verify_checksum=settings.verify_checksum, poll_s=settings.poll_s, label=ROLE)
        self.backend = self.engine.backend
        self.follower: VersionFollower | None = self.engine.follower
        self._started = time.time()
        self._thread: threading.Thread | None = None
        if self.follower is not None and start_following:
            self._thread = threading.Thread(target=self._follow_loop, name="scrit-follow", daemon=True)
            self._thread.start()
        metrics = telemetry(settings)
        if metrics is not None:
            metrics.set_version(ROLE, self.backend.version)

    @property
    def active(self) -> ActiveModel:
        version = self.backend.version
        since = self.follower.since.get(version) if self.follower is not None else None
        return ActiveModel(version=version, uri=getattr(self.backend, "model_path", self.settings.role.engine.model),
                           since=since if since is not None else self._started)

    @property
    def swaps(self) -> int:
        return self.follower.swaps if self.follower is not None else 0

    @property
    def swap_errors(self) -> int:
        return self.follower.swap_errors if self.follower is not None else 0

    def poll_once(self) -> bool:
        """Read the registry and switch to the newest new version that loads. True if switched."""
        return self.follower.poll() if self.follower is not None else False

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
        if self.follower is not None and version in self.follower.since:
            return self.follower.since[version]
        return self._started if version == self.settings.start_version else None

    async def generate_batch(self, items: Sequence[tuple[str, SamplingParams]]) -> list[Generation | Exception]:
        """One Generation per (prompt, sampling), all on one version: the one the batch started with.

        Items with equal sampling share one ``backend.generate`` call (one padded forward pass per
        step); the calls of a batch run with the backend pinned (``pinned()``: a swap waits for the
        batch). A failing group returns its exception in its items' places; the others still succeed.
        """
        self.batches += 1
        self.requests += len(items)
        groups: dict[SamplingParams, list[int]] = {}
        for index, (_, sampling) in enumerate(items):
            groups.setdefault(sampling, []).append(index)
        return await asyncio.to_thread(self._generate_groups, items, groups)

    def _generate_groups(self, items: Sequence[tuple[str, SamplingParams]],
                         groups: dict[SamplingParams, list[int]]) -> list[Generation | Exception]:
        results: list[Generation | Exception] = [RuntimeError("not generated")] * len(items)
        pinned = getattr(self.backend, "pinned", contextlib.nullcontext)
        with pinned():
            for sampling, indices in groups.items():
                prompts = [items[i][0] for i in indices]
                started = time.perf_counter()
                try:
                    generations: list[Any] = self.backend.generate(prompts, sampling)
                except Exception as error:  # noqa: BLE001 - reported per request by the caller
                    log.exception("generation failed for %d prompts", len(prompts))
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
        history = list(self.follower.history) if self.follower is not None else []
        return {
            "critic_version": model.version,
            "model_uri": model.uri,
            "version_since": model.since,
            "following": self.settings.follow_run_dir,
            "swaps": self.swaps,
            "swap_errors": self.swap_errors,
            "last_swap": history[-1] if history else None,
            "recent_swaps": history,
            "requests": self.requests,
            "batches": self.batches,
            "pid": os.getpid(),
        }
