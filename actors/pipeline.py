"""The producer pipeline: solver -> critic -> corrector -> validator -> replay buffer, streaming.

Every role is a long-lived actor (``actors/shells.py``) generating through its model's engine actors
(``actors/engines.py``: the critic, corrector and validator share the evolving critic's engines, each
solver model has its own). A batch of problems flows through the roles as ObjectRefs, actor to actor::

    problems  = ray.put(ProblemBatch)
    parts     = [solver.stage.remote(problems) for each configured solver]    # in parallel
    critiques = critic.stage.remote(problems, *parts)                         # waits for every part
    corrected = corrector.stage.remote(critiques)                             # the critic continues its critique
    examples  = validator.stage.remote(corrected)
    report    = buffer.put_batch.remote(examples)                             # a small dict

Ray hands each stage its upstream's output through the object store when it is ready; the driver
holds only references and reads back the final report (counts, timings, buffer state), never the
data. ``batches_in_flight`` batches move at once, so while the critic works on one batch the
solvers already work on the next and the validator on the previous one; the roles sharing an engine
send it their requests at the same time, and it batches them together. That window also bounds every
actor's queue (at most ``batches_in_flight`` calls wait at any actor). The replay buffer's room is a
budget: the driver submits a batch only while the room left after what the batches in flight will
bring (their expected kept examples) is positive, so backpressure (``buffer.max_ahead``) reaches from
the trainer back to the solvers. ``batches_in_flight: 1`` is the old synchronous loop.

Batches of one role are spread round-robin over its actors (``*.num_actors``).

Crashes: actors restart (``faults.actor_max_restarts``) and Ray re-runs the interrupted call on the
restarted actor (``faults.actor_task_retries``; every stage call is idempotent: solver samples are
seeded by batch id, and the buffer stores a batch once). A batch that still fails because an actor
(or the engine it calls) died is sent through the pipeline again, up to ``faults.batch_retries``
times; only then does the run fail, naming the actor. Each resend waits first
(``faults.batch_retry_backoff_s``, doubling per resend): when a node is lost, its actors answer
"unavailable" at once until Ray notices the loss and restarts them elsewhere (15-46 s measured), and
resends without a wait used up every retry in that window. A stage that raises fails the run at once,
naming its actor (``StageFailed``).
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scrit.checkpoints import WeightSource
from scrit.config import ScritConfig
from scrit.factory import RoleSpec, RunPlan
from scrit.messages import ProblemBatch, encode
from scrit.problems import ProblemSource

__all__ = ["BatchFailed", "ProducerPipeline", "RoleActors"]

RETRY_WAIT_CAP_S = 60.0  # the longest wait before a batch is sent again


class BatchFailed(RuntimeError):
    """A batch could not get through the pipeline; ``component`` names the actor (``critic.0``)."""

    def __init__(self, component: str, error: BaseException) -> None:
        super().__init__(f"{component}: {type(error).__name__}: {error}")
        self.component = component
        self.error = error


@dataclass
class _InFlight:
    batch_id: int
    problems: Any  # ObjectRef of the ProblemBatch bytes, kept to send the batch again
    submitted: float
    attempt: int = 0
    resend_at: float = 0.0  # monotonic time before which a batch waiting to be sent again is not sent


@dataclass
class RoleActors:
    """The actors of one role, used round-robin."""

    spec: RoleSpec
    handles: list[Any]
    _turn: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def next(self) -> Any:
        if self._turn is None:
            self._turn = itertools.cycle(self.handles)
        return next(self._turn)


class ProducerPipeline:
    """Starts the engine and role actors of a ``RunPlan`` and keeps ``run.batches_in_flight`` batches
    moving through the roles."""

    def __init__(self, cfg: ScritConfig, plan: RunPlan, run_dir: Path, buffer: Any, source: ProblemSource,
                 first_batch_id: int = 0, actor_options: dict[str, Any] | None = None,
                 weights: WeightSource | None = None) -> None:
        from scrit.actors.engines import start_engine_hosts

        self.cfg = cfg
        self.buffer = buffer
        self.source = source
        self.next_batch_id = first_batch_id
        self.in_flight: dict[Any, _InFlight] = {}  # report ref -> the batch it reports on
        self.waiting: list[_InFlight] = []  # batches lost with an actor, sent again once their wait is over
        self.retries: list[dict[str, Any]] = []  # batches sent again after an actor died
        self.expected_examples = float(cfg.run.problems_per_batch)  # kept per batch; the mean once batches report
        self._kept: list[int] = []
        options = actor_options or {}
        self.plan = plan
        self.prefix = f"{uuid.uuid4().hex[:8]}/"  # this pipeline's engine host names, apart from any other run's
        self.hosts = start_engine_hosts(plan.hosts, str(run_dir), options, self.prefix, weights)
        self.roles = {spec.name: RoleActors(spec, [self.start_role(spec, run_dir, k, options) for k in range(spec.replicas)])
                      for spec in plan.roles if spec.kind != "evaluator"}

    def start_role(self, spec: RoleSpec, run_dir: Path, index: int = 0, actor_options: dict[str, Any] | None = None) -> Any:
        """Role actor ``index`` of ``spec``, on this pipeline's engine hosts."""
        from scrit.actors.shells import start_role

        hosts = self.plan.hosts_of(spec.engine) if spec.engine is not None else []
        return start_role(spec, hosts, str(run_dir), index, actor_options, self.prefix)

    def of_kind(self, kind: str) -> list[RoleActors]:
        return [role for role in self.roles.values() if role.spec.kind == kind]

    def actors(self) -> dict[str, Any]:
        """Every role and engine host actor by its unique name (``critic.0``, ``engines.0``, ...)."""
        out = {role.spec.actor_name(k): handle for role in self.roles.values() for k, handle in enumerate(role.handles)}
        out.update(self.hosts)
        return out

    def wait_ready(self) -> None:
        import ray

        ray.get([handle.ready.remote() for handle in self.actors().values()])

    # ---------------------------------------------------------------------------------- running
    @property
    def moving(self) -> int:
        """Batches in the pipeline: in flight, or waiting to be sent again."""
        return len(self.in_flight) + len(self.waiting)

    def submit(self) -> int:
        """Send one new batch of problems into the pipeline; returns its id."""
        import ray

        batch_id = self.next_batch_id
        self.next_batch_id += 1
        batch = ProblemBatch(batch_id=batch_id, problems=self.source.take(self.cfg.run.problems_per_batch))
        self._send(_InFlight(batch_id, ray.put(encode(batch)), time.time()))
        return batch_id

    def _send(self, batch: _InFlight) -> None:
        """Chain the stage calls for ``batch``: each gets its upstream's ObjectRef, never the data."""
        parts = [role.next().stage.remote(batch.problems) for role in self.of_kind("solver")]
        critiques = self.roles["critic"].next().stage.remote(batch.problems, *parts)
        corrected = self.roles["corrector"].next().stage.remote(critiques)
        examples = self.roles["validator"].next().stage.remote(corrected)
        self.in_flight[self.buffer.put_batch.remote(examples)] = batch

    def fill(self, room: int) -> int:
        """Submit batches while fewer than ``batches_in_flight`` are moving and the buffer's ``room``
        (examples it may still take) is not used up by what the batches in flight will bring, each
        counted as ``expected_examples``; returns how many were submitted."""
        budget = room - self.moving * self.expected_examples
        submitted = 0
        while budget > 0 and self.moving < self.cfg.run.batches_in_flight:
            self.submit()
            submitted += 1
            budget -= self.expected_examples
        return submitted

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        """Reports of the batches that finished within ``timeout`` seconds (oldest first). A batch
        whose actor (or engine) died is sent again after its wait (``faults.batch_retries``,
        ``faults.batch_retry_backoff_s``), else BatchFailed names the actor; a stage that raised fails at once."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        from scrit.actors.engines import EngineUnavailable
        from scrit.actors.shells import StageFailed

        self._send_waiting()
        if self.waiting:  # wake up in time to send the next waiting batch
            timeout = max(0.0, min(timeout, min(b.resend_at for b in self.waiting) - time.monotonic()))
        if not self.in_flight:
            time.sleep(min(timeout, 0.2))
            return []
        ready, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=timeout)
        reports = []
        for ref in ready:
            batch = self.in_flight.pop(ref)
            try:
                report = ray.get(ref)
            except (RayActorError, ActorUnavailableError) as error:
                self._retry(batch, self._actor_name(error), error)
                continue
            except ray.exceptions.RayTaskError as error:
                cause = getattr(error, "cause", None)
                if isinstance(cause, EngineUnavailable):  # the engine's process or node is gone: a crash
                    self._retry(batch, cause.component, error)
                    continue
                if isinstance(cause, StageFailed):  # a stage raised: retrying would not help
                    raise BatchFailed(cause.component, error) from error
                raise BatchFailed("buffer" if "ReplayBuffer" in str(getattr(error, "function_name", "")) else "pipeline",
                                  error) from error
            report["latency_s"] = round(time.time() - batch.submitted, 2)
            report["attempts"] = batch.attempt + 1
            self._kept.append(int(report.get("validated", 0)))
            self.expected_examples = max(1.0, sum(self._kept[-20:]) / len(self._kept[-20:]))
            reports.append(report)
        return sorted(reports, key=lambda r: r["batch_id"])

    def _retry(self, batch: _InFlight, component: str, error: BaseException) -> None:
        """Queue ``batch`` to be sent again after its wait, or fail it once its retries are used up."""
        if batch.attempt >= self.cfg.faults.batch_retries:
            raise BatchFailed(component, error) from error
        wait_s = self._retry_wait(batch.attempt)
        self.retries.append({"batch_id": batch.batch_id, "component": component, "attempt": batch.attempt + 1,
                             "wait_s": wait_s, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})
        self.waiting.append(_InFlight(batch.batch_id, batch.problems, batch.submitted, batch.attempt + 1,
                                      resend_at=time.monotonic() + wait_s))

    def _retry_wait(self, attempt: int) -> float:
        """Seconds before resend ``attempt + 1``: ``faults.batch_retry_backoff_s``, doubled per resend,
        at most ``RETRY_WAIT_CAP_S``."""
        return min(self.cfg.faults.batch_retry_backoff_s * 2 ** attempt, RETRY_WAIT_CAP_S)

    def _send_waiting(self) -> None:
        """Send again every waiting batch whose wait is over."""
        now = time.monotonic()
        due = [batch for batch in self.waiting if batch.resend_at <= now]
        self.waiting = [batch for batch in self.waiting if batch.resend_at > now]
        for batch in due:
            self._send(batch)

    def _actor_name(self, error: BaseException) -> str:
        """Our name (``critic.0``) for the actor a RayActorError is about, else ``pipeline``."""
        actor_id = getattr(error, "actor_id", None)
        for name, handle in {**self.actors(), "buffer": self.buffer}.items():
            if actor_id and handle._actor_id.hex() == actor_id:
                return name
        return "pipeline"

    def drain(self, timeout: float) -> list[dict[str, Any]]:
        """Finish the batches in flight and those waiting to be sent again (their examples reach the buffer)
        for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        reports: list[dict[str, Any]] = []
        while self.moving and time.monotonic() < deadline:
            reports += self.collect(timeout=max(0.1, deadline - time.monotonic()))
        return reports

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every role and engine actor's counters (items, tokens, version, swaps)."""
        import ray

        handles = self.actors()
        return dict(zip(handles, ray.get([handle.stats.remote() for handle in handles.values()])))
