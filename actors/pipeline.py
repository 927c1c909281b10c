"""The producer pipeline: solver -> critic (+ corrector) -> validator -> replay buffer, streaming.

Every stage is a long-lived actor (``actors/shells.py``); a batch of problems flows through them as
ObjectRefs, actor to actor::

    problems = ray.put(ProblemBatch)
    parts    = [solver.solve.remote(problems) for each configured solver]     # in parallel
    critique = critic.critique.remote(problems, *parts)                       # waits for every part
    critique = corrector.correct.remote(critique)                             # separate corrector only
    examples = validator.validate.remote(critique)
    report   = buffer.put_batch.remote(examples)                              # a small dict

Ray hands each stage its upstream's output through the object store when it is ready; the driver
holds only references and reads back the final report (counts, timings, buffer state), never the
data. ``batches_in_flight`` batches move at once, so while the critic works on one batch the
solvers already work on the next and the validator on the previous one: on a cluster every role's
GPUs stay busy. That window also bounds every actor's queue (at most ``batches_in_flight`` calls
wait at any actor), and the driver submits a new batch only while the replay buffer has room
(``buffer.max_ahead``), so backpressure reaches from the trainer back to the solvers.
``batches_in_flight: 1`` is the old synchronous loop: one stage at a time.

Batches of one role are spread round-robin over its actors (``*.num_actors``).

Crashes: stage actors restart (``faults.actor_max_restarts``) and Ray re-runs the interrupted call
on the restarted actor (``faults.actor_task_retries``; every stage call is idempotent: solver
samples are seeded by batch id, and the buffer stores a batch once). A batch that still fails
because an actor died is sent through the pipeline again, up to ``faults.batch_retries`` times;
only then does the run fail, naming the actor.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from scrit.config import ScritConfig
from scrit.messages import ProblemBatch, encode
from scrit.problems import ProblemSource

__all__ = ["BatchFailed", "ProducerPipeline", "RoleActors"]


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


@dataclass
class RoleActors:
    """The actors of one role (or one solver model), used round-robin."""

    name: str
    handles: list[Any]
    _turn: Any = field(default=None, repr=False)

    def next(self) -> Any:
        if self._turn is None:
            self._turn = itertools.cycle(self.handles)
        return next(self._turn)


class ProducerPipeline:
    """Starts the stage actors and keeps ``run.batches_in_flight`` batches moving through them."""

    def __init__(self, cfg: ScritConfig, run_dir: Path, buffer: Any, critic_uri: str, style: str,
                 chat_template: bool, source: ProblemSource, first_batch_id: int = 0,
                 actor_options: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.buffer = buffer
        self.source = source
        self.next_batch_id = first_batch_id
        self.in_flight: dict[Any, _InFlight] = {}  # report ref -> the batch it reports on
        self.retries: list[dict[str, Any]] = []  # batches sent again after an actor died
        self.roles = self._start(run_dir, critic_uri, style, chat_template, actor_options or {})

    # ------------------------------------------------------------------------------------ set-up
    def _start(self, run_dir: Path, critic_uri: str, style: str, chat_template: bool,
               actor_options: dict[str, Any]) -> dict[str, RoleActors]:
        from scrit.actors.shells import CorrectorActor, CriticActor, SolverActor, ValidatorActor, start_actor
        from scrit.backends import resolve_model_path, role_backend
        from scrit.prompts import resolve_prompt_style, use_chat_template

        cfg, res = self.cfg, self.cfg.resources
        place = {"num_cpus": res.actor_num_cpus, "num_gpus": res.actor_num_gpus, "actor_options": actor_options}
        vllm = msgspec.structs.asdict(cfg.vllm)
        critic_spec, critic_options = role_backend(
            critic_uri, cfg.critic.backend, device=cfg.critic.device, dtype=cfg.critic.dtype,
            batch_size=cfg.critic.batch_size, use_chat_template=chat_template, vllm_options=vllm)
        sampling = {"max_new_tokens": cfg.critic.max_new_tokens, "temperature": cfg.critic.temperature}
        roles: dict[str, RoleActors] = {}
        for index, spec in enumerate(cfg.solvers):
            model = resolve_model_path(spec.model)
            solver_style = resolve_prompt_style(model, cfg.critic.prompt_style)
            solver_spec, solver_options = role_backend(
                model, spec.backend, device=spec.device, dtype=spec.dtype, batch_size=cfg.critic.batch_size,
                use_chat_template=use_chat_template(model, solver_style), vllm_options=vllm)
            name = f"solver{index}-{Path(spec.model).name}"  # e.g. solver0-careless: reports say which model
            roles[name] = RoleActors(name, [start_actor(
                SolverActor, solver_spec, **place, name=name, actor_name=f"{name}.{k}", run_dir=str(run_dir),
                domain=cfg.domain.name,
                samples_per_problem=spec.samples_per_problem, style=solver_style, backend_options=solver_options,
                sampling={"max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature,
                          "seed": cfg.run.seed * 1000 + index},
            ) for k in range(spec.num_actors)])
        pairing = {"mode": cfg.critic.mode, "max_per_class": cfg.run.max_per_class,
                   "reference_as_correct": cfg.run.reference_as_correct, "seed": cfg.run.seed}
        separate_corrector = cfg.corrector.model is not None
        roles["critic"] = RoleActors("critic", [start_actor(
            CriticActor, critic_spec, **place, run_dir=str(run_dir), actor_name=f"critic.{k}",
            domain=cfg.domain.name, style=style, sampling=sampling, pairing=pairing,
            continuation=None if separate_corrector else sampling, backend_options=critic_options,
        ) for k in range(cfg.critic.num_actors)])
        if separate_corrector:
            model = resolve_model_path(cfg.corrector.model)
            corrector_spec, corrector_options = role_backend(
                model, cfg.corrector.backend, batch_size=cfg.critic.batch_size,
                use_chat_template=use_chat_template(model, style), vllm_options=vllm)
            roles["corrector"] = RoleActors("corrector", [start_actor(
                CorrectorActor, corrector_spec, **place, run_dir=str(run_dir), actor_name=f"corrector.{k}",
                domain=cfg.domain.name,
                style=style, sampling={"max_new_tokens": cfg.corrector.max_new_tokens, "temperature": 0.0},
                backend_options=corrector_options,
            ) for k in range(cfg.corrector.num_actors)])
        validator = cfg.validator
        roles["validator"] = RoleActors("validator", [start_actor(
            ValidatorActor, critic_spec if validator.enabled else None, **place, run_dir=str(run_dir),
            actor_name=f"validator.{k}", domain=cfg.domain.name, style=style, sampling=sampling,
            require_answer_match=validator.require_answer_match,
            require_verdict_match=validator.require_verdict_match, backend_options=critic_options,
        ) for k in range(validator.num_actors)])
        return roles

    def actors(self) -> dict[str, Any]:
        """Every stage actor by a unique name (``critic.0``, ``solver1.0``, ...)."""
        return {f"{role.name}.{k}": handle for role in self.roles.values() for k, handle in enumerate(role.handles)}

    def wait_ready(self) -> None:
        import ray

        ray.get([handle.ready.remote() for handle in self.actors().values()])

    # ---------------------------------------------------------------------------------- running
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
        parts = [role.next().solve.remote(batch.problems) for name, role in self.roles.items()
                 if name.startswith("solver")]
        critique = self.roles["critic"].next().critique.remote(batch.problems, *parts)
        if "corrector" in self.roles:
            critique = self.roles["corrector"].next().correct.remote(critique)
        examples = self.roles["validator"].next().validate.remote(critique)
        self.in_flight[self.buffer.put_batch.remote(examples)] = batch

    def fill(self, room: int) -> int:
        """Submit batches until ``batches_in_flight`` are moving, if the buffer has ``room``; returns
        how many were submitted."""
        submitted = 0
        while room > 0 and len(self.in_flight) < self.cfg.run.batches_in_flight:
            self.submit()
            submitted += 1
        return submitted

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        """Reports of the batches that finished within ``timeout`` seconds (oldest first). A batch
        whose actor died is sent again (``faults.batch_retries``), else BatchFailed names the actor."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

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
                component = self._actor_name(error)
                if batch.attempt >= self.cfg.faults.batch_retries:
                    raise BatchFailed(component, error) from error
                self.retries.append({"batch_id": batch.batch_id, "component": component, "attempt": batch.attempt + 1,
                                     "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})
                self._send(_InFlight(batch.batch_id, batch.problems, batch.submitted, batch.attempt + 1))
                continue
            except ray.exceptions.RayTaskError as error:  # a stage raised: not a crash, retrying will not help
                raise BatchFailed(self._task_name(error), error) from error
            report["latency_s"] = round(time.time() - batch.submitted, 2)
            report["attempts"] = batch.attempt + 1
            reports.append(report)
        return sorted(reports, key=lambda r: r["batch_id"])

    def _actor_name(self, error: BaseException) -> str:
        """Our name (``critic.0``) for the actor a RayActorError is about, else ``pipeline``."""
        actor_id = getattr(error, "actor_id", None)
        for name, handle in {**self.actors(), "buffer": self.buffer}.items():
            if actor_id and handle._actor_id.hex() == actor_id:
                return name
        return "pipeline"

    def _task_name(self, error: BaseException) -> str:
        """The stage (``critic``, ``validator``, ...) whose method raised, from Ray's task name."""
        function = str(getattr(error, "function_name", "") or "")
        for role in self.roles:
            if function.lower().startswith(role.rstrip("0123456789")):
                return role
        return "buffer" if "ReplayBuffer" in function else "pipeline"

    def drain(self, timeout: float) -> list[dict[str, Any]]:
        """Finish the batches in flight (their examples reach the buffer) for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        reports: list[dict[str, Any]] = []
        while self.in_flight and time.monotonic() < deadline:
            reports += self.collect(timeout=max(0.1, deadline - time.monotonic()))
        return reports

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every stage actor's counters (items, tokens, version, swaps)."""
        import ray

        handles = self.actors()
        return dict(zip(handles, ray.get([handle.stats.remote() for handle in handles.values()])))
