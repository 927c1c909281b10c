"""The model side of a Serve replica: the critic it serves now, and zero-downtime hot swap (DESIGN.md §8-9).

A replica owns one inference backend, used in one of two ways:

* **continuously** (``continuous``: vLLM, whose backend takes requests one by one): ``submit`` hands a
  request's prompts to the running engine at once and returns its ``Generations``, whose text streams
  as the engine makes it; the engine batches whatever is running at each step, and a request finishes
  when it is done, not when its batch is;
* **in batches** (HF, or a remote server): the Serve deployment groups requests with ``@serve.batch``
  and ``generate_batch`` runs each group; ``Generations.finished`` then hands the finished text out in
  pieces, so both paths look alike to the routes.

A background thread follows the run's ``versions/registry.jsonl`` with
``scrit.checkpoints.VersionFollower`` (the same subscriber the role actors use) every ``poll_s`` seconds
and calls the backend's ``load_weights``, whose swap is atomic between requests: the HF backend loads
the new weights beside the old ones, warms them up and switches one reference; vLLM reloads in place
once the requests in flight are done, holding new ones back meanwhile. A request (all its prompts)
takes its version when it enters the engine (``generate_batch``: when the batch starts), and every
generation carries it, so

* a request runs on one version from start to end, the one it started with;
* no request fails because of a swap: it either ran before it or runs after it.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from scrit.actors.registry import ObjectStoreWeights
from scrit.backends.base import Generation, SamplingParams
from scrit.checkpoints import VersionFollower
from scrit.factory import RoleSpec
from scrit.serve.schema import Limits

__all__ = ["ActiveModel", "CriticService", "Delta", "Generations", "ServeSettings"]

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
    # The run's versions in Ray's object store, for the endpoint a run starts itself (``scrit serve
    # --follow`` from another process reads checkpoints); such a replica is one of the run's processes.
    weights: ObjectStoreWeights | None = None

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


def _replica_rank() -> int:
    """This Serve replica's rank in its deployment (0 outside Serve): a replacement takes its rank."""
    try:
        from ray import serve

        return int(serve.get_replica_context().rank.rank)
    except Exception:  # noqa: BLE001 - not in a Serve replica (tests build the service in-process)
        return 0


@dataclass(frozen=True)
class ActiveModel:
    """What a replica serves now (a snapshot: read it once per use)."""

    version: int
    uri: str
    since: float  # wall-clock time this replica started serving it


@dataclass(frozen=True)
class Delta:
    """A new piece of one generation's text (stop strings included); ``final`` is set on its last piece."""

    index: int  # the prompt's place in its request
    text: str
    final: Generation | None = None


class Generations:
    """One request's generations (one per prompt), as they are made, all on version ``version``.

    An async iterator of ``Delta``: every piece of text as it arrives; ``results()`` waits for all of
    them. A failed generation raises its error from either. Leaving early (the client went away and the
    task was cancelled, an error) must end in ``close()``, which aborts what is unfinished and so frees
    its engine slots; ``results()`` and a cancelled wait do that themselves. Pieces arrive from the
    engine thread through ``put_threadsafe``.
    """

    def __init__(self, count: int, version: int = 0) -> None:
        self.count = count
        self.version = version
        self.abort: Callable[[], None] | None = None  # stops what is unfinished (set once submitted)
        self._queue: asyncio.Queue[tuple[int, str, Generation | BaseException | None]] = asyncio.Queue()
        self._open = count  # generations not finished yet

    @classmethod
    def finished(cls, generations: Sequence[Generation], piece_chars: int = 16) -> Generations:
        """Generations already made (a batch backend), handed out in pieces of ``piece_chars`` characters."""
        out = cls(len(generations), generations[0].version if generations else 0)
        for index, generation in enumerate(generations):
            for start in range(0, len(generation.text), piece_chars):
                out._queue.put_nowait((index, generation.text[start:start + piece_chars], None))
            out._queue.put_nowait((index, "", generation))
        return out

    def put_threadsafe(self, loop: asyncio.AbstractEventLoop, index: int, text: str,
                       final: Generation | BaseException | None) -> None:
        """From any thread: a piece of generation ``index``; ``final`` (its Generation, or the error it
        failed with) on its last. Never raises (the engine thread calls it): a closed loop drops it."""
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._queue.put_nowait, (index, text, final))

    def __aiter__(self) -> Generations:
        return self

    async def __anext__(self) -> Delta:
        if not self._open:
            raise StopAsyncIteration
        try:
            index, text, final = await self._queue.get()
        except BaseException:  # cancelled while waiting: nobody will read the rest
            self.close()
            raise
        if isinstance(final, BaseException):
            self.close()
            raise final
        if final is not None:
            self._open -= 1
        return Delta(index, text, final)

    async def results(self) -> list[Generation]:
        """Every generation, in prompt order, once all are done."""
        out: list[Generation | None] = [None] * self.count
        try:
            async for delta in self:
                if delta.final is not None:
                    out[delta.index] = delta.final
        finally:
            self.close()
        return [generation for generation in out if generation is not None]

    def close(self) -> None:
        """Abort the generations still running (idempotent; nothing to do once all have finished)."""
        if self._open and self.abort is not None:
            self.abort()
        self.abort = None


class CriticService:
    """One replica's critic: its backend, the registry follower and generation (continuous or batched)."""

    def __init__(self, settings: ServeSettings, *, start_following: bool = True) -> None:
        from scrit.factory import open_engine

        self.settings = settings
        self.requests = 0
        self.batches = 0
        self.aborted = 0  # requests aborted before they finished (their client went away)
        self._stop = threading.Event()
        # The newest published version that verifies and loads (else the start model), through the same
        # VersionFollower that then keeps this replica current (scrit.factory.open_engine).
        if settings.weights is not None and settings.follow_run_dir:
            from scrit.rundir import record_process

            record_process(settings.follow_run_dir, f"{ROLE}.{_replica_rank()}")  # where it runs; restarts count
        self.engine = open_engine(settings.role.engine, settings.follow_run_dir, base_version=settings.start_version,
                                  verify_checksum=settings.verify_checksum, poll_s=settings.poll_s, label=ROLE,
                                  weights=settings.weights)
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

    @property
    def continuous(self) -> bool:
        """Whether requests go to the engine one by one as they arrive, their text streaming as it is
        made (``submit``; vLLM), rather than in batches (``generate_batch``)."""
        return callable(getattr(self.backend, "submit_many", None))

    async def submit(self, prompts: Sequence[str], sampling: SamplingParams) -> Generations:
        """Start generating ``prompts`` now, on the version the engine has (continuous backends only).

        Admission waits only while a weight swap is in progress (in a worker thread: the event loop
        goes on); a caller cancelled meanwhile still has its requests aborted once they are in.
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        generations = Generations(len(prompts))

        def on_delta(handle: Any, text: str, done: bool) -> None:  # engine thread
            final: Generation | BaseException | None = None
            if done:
                final = handle.error if handle.error is not None else handle.result(0)
                if isinstance(final, Generation):
                    self._record([final], time.perf_counter() - started)
            generations.put_threadsafe(loop, handle.index, text, final)

        def abort_once_admitted(admission: asyncio.Future) -> None:
            if not admission.cancelled() and admission.exception() is None:
                self.aborted += 1
                self.backend.abort([handle.request_id for handle in admission.result()])

        admitted = loop.run_in_executor(None, self.backend.submit_many, list(prompts), sampling, on_delta)
        try:
            handles = await asyncio.shield(admitted)
        except asyncio.CancelledError:
            admitted.add_done_callback(abort_once_admitted)
            raise
        self.requests += 1

        def abort() -> None:
            self.aborted += 1
            self.backend.abort([handle.request_id for handle in handles if not handle.done])

        generations.version = handles[0].version
        generations.abort = abort
        return generations

    def _record(self, generations: list[Generation], seconds: float) -> None:
        """Telemetry of generations made in ``seconds`` (a batch, or one request on a continuous engine,
        whose seconds overlap with other requests')."""
        metrics = telemetry(self.settings)
        if metrics is not None:
            metrics.record_generation(ROLE, generations, seconds)

    def unfinished_requests(self) -> int | None:
        """Requests the engine holds now (continuous backends; None for the others)."""
        count = getattr(self.backend, "unfinished_requests", None)
        return count() if callable(count) else None

    async def generate_batch(self, requests: Sequence[tuple[Sequence[str], SamplingParams]]
                             ) -> list[list[Generation] | Exception]:
        """The generations of each request (its prompts, its sampling), all on one version: the one the
        batch started with.

        Prompts with equal sampling share one ``backend.generate`` call (one padded forward pass per
        step); the calls of a batch run with the backend pinned (``pinned()``: a swap waits for the
        batch). A failing group returns its exception in its requests' places; the others still succeed.
        """
        self.batches += 1
        self.requests += len(requests)
        return await asyncio.to_thread(self._generate_groups, requests)

    def _generate_groups(self, requests: Sequence[tuple[Sequence[str], SamplingParams]]
                         ) -> list[list[Generation] | Exception]:
        groups: dict[SamplingParams, list[tuple[int, str]]] = {}  # sampling -> (request, prompt)
        for index, (prompts, sampling) in enumerate(requests):
            groups.setdefault(sampling, []).extend((index, prompt) for prompt in prompts)
        results: list[list[Generation] | Exception] = [[] for _ in requests]
        pinned = getattr(self.backend, "pinned", contextlib.nullcontext)
        with pinned():
            for sampling, members in groups.items():
                started = time.perf_counter()
                try:
                    generations: list[Any] = self.backend.generate([prompt for _, prompt in members], sampling)
                except Exception as error:  # noqa: BLE001 - reported per request by the caller
                    log.exception("generation failed for %d prompts", len(members))
                    for index, _ in members:
                        results[index] = error
                    continue
                self._record(generations, time.perf_counter() - started)
                for (index, _), generation in zip(members, generations):
                    result = results[index]
                    if isinstance(result, list):
                        result.append(generation)
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
            "aborted": self.aborted,
            "continuous_batching": self.continuous,
            "unfinished_requests": self.unfinished_requests(),
            "pid": os.getpid(),
        }
