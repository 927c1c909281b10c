"""Thin Ray actor shells around the roles (``actors/roles.py``): one actor class per pipeline stage.

Each actor builds its backend *inside* its process from a model spec (``scrit.backends.make_backend``),
so model weights never cross Ray's object store, and (critic, corrector, validator) follows the
run's published versions with a ``VersionFollower`` between batches. Batches cross actor boundaries
as msgspec msgpack bytes (DESIGN.md §3): every stage method takes the upstream stage's bytes (or the
ObjectRefs Ray resolves to them) and returns its own, so the pipeline passes work actor to actor
through the object store and the driver only holds references.

Ray is imported only inside ``start_actor``, so importing this module stays cheap. Actors call
``torch.set_num_threads`` (default: the whole CPUs asked for, at least 1): on shared cores, more
threads than the actor's CPU share makes tiny-batch generation ~10x slower.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from scrit.backends.base import SamplingParams
from scrit.messages import CritiqueBatch, ProblemBatch, SolutionBatch, decode, encode

__all__ = ["CorrectorActor", "CriticActor", "SolverActor", "ValidatorActor", "start_actor"]


def _sampling(value: SamplingParams | dict[str, Any] | None) -> SamplingParams | None:
    if value is None or isinstance(value, SamplingParams):
        return value
    return msgspec.convert(value, SamplingParams)


class _RoleActor:
    """What every stage actor does: set threads, build its backend and (optionally) a follower."""

    def __init__(self, model: str | None, backend_options: dict[str, Any] | None, run_dir: str | None,
                 follow: bool, torch_threads: int | None, domain: str, actor_name: str, role: str) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        from scrit.backends import make_backend
        from scrit.checkpoints import VersionFollower
        from scrit.rundir import record_process
        from scrit.selfplay import get_domain

        if run_dir:
            record_process(run_dir, actor_name)  # a restarted actor shows up again: restarts are counted
        self.actor_name = actor_name
        self.domain = get_domain(domain)
        self.backend = make_backend(model, **(backend_options or {})) if model else None
        self.follower = None
        if self.backend is not None and run_dir and follow:
            self.follower = VersionFollower(run_dir, self.backend, role)
            self.follower.poll()  # a restarted or resumed actor starts on the newest published version
        self.role: Any = None

    def ready(self) -> bool:
        """For ``ray.get(actor.ready.remote())``: returns once the model is loaded."""
        return True

    def version(self) -> int:
        return self.role.version

    def stats(self) -> dict[str, Any]:
        return self.role.stats()

    def metrics_url(self, run: str, port: int = 0) -> str:
        """Start this actor process's Prometheus exporter (once; ``scrit.telemetry``) with ``run`` as
        the run label, and return its URL for the driver's targets file."""
        from scrit import telemetry

        url = telemetry.start_exporter(port=port, run=run)
        telemetry.set_version(telemetry.role_of(self.role), self.role.version)
        return url


class SolverActor(_RoleActor):
    """A solver model (fixed by default: solvers do not follow the critic's versions)."""

    def __init__(self, model: str, *, name: str = "solver", actor_name: str = "", domain: str = "arith",
                 samples_per_problem: int = 2, sampling: SamplingParams | dict[str, Any] | None = None,
                 style: str = "compact", backend_options: dict[str, Any] | None = None,
                 run_dir: str | None = None, torch_threads: int | None = 1) -> None:
        super().__init__(model, backend_options, run_dir, False, torch_threads, domain, actor_name or name, "solver")
        from scrit.actors.roles import Solver

        self.role = Solver(self.backend, self.domain, name, samples_per_problem, _sampling(sampling), style,
                           self.follower)

    def solve(self, batch: bytes) -> bytes:
        """ProblemBatch -> SolutionBatch."""
        return encode(self.role.solve_batch(decode(batch, ProblemBatch), self.actor_name))


class CriticActor(_RoleActor):
    """The evolving critic: pairs a batch's solutions, critiques them and (``continuation``, the
    default corrector) continues each critique with its correction on the same version."""

    def __init__(self, model: str, *, run_dir: str | None = None, actor_name: str = "critic", domain: str = "arith",
                 style: str = "compact", sampling: SamplingParams | dict[str, Any] | None = None,
                 continuation: SamplingParams | dict[str, Any] | None = None,
                 pairing: dict[str, Any] | None = None, backend_options: dict[str, Any] | None = None,
                 torch_threads: int | None = 1) -> None:
        super().__init__(model, backend_options, run_dir, True, torch_threads, domain, actor_name, "critic")
        from scrit.actors.roles import Critic, PairingSettings

        self.role = Critic(self.backend, self.domain, style, _sampling(sampling), self.follower,
                           msgspec.convert(pairing or {}, PairingSettings), _sampling(continuation))

    def critique(self, batch: bytes, *solutions: bytes) -> bytes:
        """ProblemBatch + every solver's SolutionBatch -> CritiqueBatch."""
        parts = [decode(part, SolutionBatch) for part in solutions]
        return encode(self.role.critique_batch(decode(batch, ProblemBatch), parts, self.actor_name))


class CorrectorActor(_RoleActor):
    """A separately configured corrector model (``corrector.model``), prompted with corrector_prompt."""

    def __init__(self, model: str, *, run_dir: str | None = None, actor_name: str = "corrector",
                 domain: str = "arith", style: str = "compact", sampling: SamplingParams | dict[str, Any] | None = None,
                 backend_options: dict[str, Any] | None = None, torch_threads: int | None = 1) -> None:
        super().__init__(model, backend_options, run_dir, False, torch_threads, domain, actor_name, "corrector")
        from scrit.actors.roles import Corrector

        self.role = Corrector(self.backend, self.domain, style, _sampling(sampling), continue_critique=False)

    def correct(self, batch: bytes) -> bytes:
        """CritiqueBatch -> CritiqueBatch with corrections."""
        return encode(self.role.correct_batch(decode(batch, CritiqueBatch), self.actor_name))


class ValidatorActor(_RoleActor):
    """The validator: the same evolving critic (its own copy of the weights, following the run's
    versions) judging each corrected solution with no reference. ``model=None``: no judgment
    (``validator.enabled: false``), only the parse and verdict checks."""

    def __init__(self, model: str | None, *, run_dir: str | None = None, actor_name: str = "validator",
                 domain: str = "arith", style: str = "compact",
                 sampling: SamplingParams | dict[str, Any] | None = None, require_answer_match: bool = True,
                 require_verdict_match: bool = True, backend_options: dict[str, Any] | None = None,
                 torch_threads: int | None = 1) -> None:
        super().__init__(model, backend_options, run_dir, True, torch_threads, domain, actor_name, "validator")
        from scrit.actors.roles import Validator

        self.role = Validator(self.backend, self.domain, style, _sampling(sampling), require_answer_match,
                              require_verdict_match, self.follower)

    def validate(self, batch: bytes) -> bytes:
        """CritiqueBatch (with corrections) -> ExampleBatch."""
        return encode(self.role.validate_batch(decode(batch, CritiqueBatch), self.actor_name))


_remote: dict[type, Any] = {}


def start_actor(cls: type, model: str | None, *, num_cpus: float = 0.25, num_gpus: float = 0.0,
                actor_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Start one stage actor of class ``cls``; ``kwargs`` go to its constructor, ``actor_options`` to
    ``.options`` (``name``, ``max_restarts``, ``max_task_retries``, ...)."""
    import ray

    if cls not in _remote:
        _remote[cls] = ray.remote(cls)
    # Threads: the whole CPUs this actor asked for (at least 1); a fraction of a core gets one thread.
    kwargs.setdefault("torch_threads", max(1, math.floor(num_cpus)))
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, **(actor_options or {})}
    return _remote[cls].options(**options).remote(model, **kwargs)
