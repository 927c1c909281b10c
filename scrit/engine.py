"""One model's engine: an inference backend that, for the evolving critic, follows the run's versions.

Engines belong to models, not roles (DESIGN.md §1): the critic, corrector, validator and in-run
evaluator all call the one engine (pool) of the evolving critic, so each published version is loaded
once per engine, not once per role. The engine moves to a newer version between requests: a swap waits
for the requests in flight (each finishes on the version it started with) and every result names the
version that produced it. ``min_version`` lets a caller that needs at least some version (the evaluator
scoring version v) make the engine look for it first.

Ray-free: the Ray shell (``actors/engines.py``) hosts one of these per engine actor, and tests and
``scrit eval`` use it in-process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from scrit.backends.base import Generation, InferenceBackend, SamplingParams

__all__ = ["Engine", "VersionUnavailable"]

log = logging.getLogger(__name__)


class VersionUnavailable(RuntimeError):
    """A caller asked for a version the engine cannot serve (not published yet, or rejected)."""


class Engine:
    """A backend plus, optionally, the ``VersionFollower`` that keeps it on the newest published version.

    ``poll_s`` rate-limits registry reads (one ``stat`` each); a caller asking for a newer version than
    the engine has always triggers a read.
    """

    def __init__(self, name: str, backend: InferenceBackend, follower: Any = None, poll_s: float = 0.2) -> None:
        self.name = name
        self.backend = backend
        self.follower = follower
        self.poll_s = poll_s
        self._last_poll = float("-inf")  # the first call looks
        self._poll_lock = threading.Lock()
        self.requests = 0

    @property
    def version(self) -> int:
        return self.backend.version

    def sync(self, min_version: int = 0) -> int:
        """Move to the newest published version that loads (if the last look is older than ``poll_s``, or
        the engine is below ``min_version``); returns the version now served."""
        if self.follower is None:
            return self.backend.version
        now = time.monotonic()
        if self.backend.version >= min_version and now - self._last_poll < self.poll_s:
            return self.backend.version
        with self._poll_lock:  # one caller swaps; the others wait for it, then find nothing new
            if self.backend.version < min_version or now - self._last_poll >= self.poll_s:
                self.follower.poll()
                self._last_poll = time.monotonic()
        return self.backend.version

    def generate(self, prompts: Sequence[str], sampling: SamplingParams, min_version: int = 0) -> list[Generation]:
        """Generations on the newest version the engine has; ``VersionUnavailable`` if that is below
        ``min_version`` (the version is not published, or its checkpoint was rejected)."""
        version = self.sync(min_version)
        if version < min_version:
            raise VersionUnavailable(f"{self.name}: version {min_version} requested, engine has {version}")
        self.requests += 1
        return self.backend.generate(prompts, sampling)

    def stats(self) -> dict[str, Any]:
        follower = self.follower.stats() if self.follower is not None else {}
        return {"engine": self.name, "version": self.backend.version, "requests": self.requests,
                "swaps": follower.get("swaps", 0), "swap_errors": follower.get("swap_errors", 0),
                "last_swap_s": follower.get("last_swap_s"), "transports": follower.get("transports", {})}

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
