"""Thin Ray actor shells around the roles (``actors/roles.py``).

Each engine builds its backend *inside* the actor from a model spec (``scrit.backends.make_backend``),
so model weights never cross Ray's object store, and follows the weight registry actor between
batches. Messages cross the actor boundary as msgspec msgpack bytes (DESIGN.md §3): methods accept
messages or their bytes and return ``list[bytes]``; ``unpack`` turns results back into messages.

Ray is imported only inside the factory functions and the engines' ``__init__``, so importing this
module stays cheap. Engines call ``torch.set_num_threads`` (default: whole CPUs asked for, at least 1):
on shared cores, more threads than the actor's CPU share makes tiny-batch generation ~10x slower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from scrit.backends.base import SamplingParams
from scrit.messages import (
    Critique,
    CritiqueRequest,
    Message,
    Problem,
    decode,
    encode,
)

__all__ = [
    "CriticEngine",
    "CorrectorEngine",
    "SolverEngine",
    "ValidatorEngine",
    "corrector_actor",
    "critic_actor",
    "pack",
    "solver_actor",
    "unpack",
    "validator_actor",
]


def pack(messages: Sequence[Message]) -> list[bytes]:
    """Messages as msgpack bytes, for crossing a process boundary."""
    return [encode(m) for m in messages]


def unpack(items: Sequence[Message | bytes], expected: type[Message] | None = None) -> list[Any]:
    """Messages from msgpack bytes (messages pass through); MessageDecodeError on bad bytes."""
    out = []
    for item in items:
        message = decode(item, expected) if isinstance(item, (bytes, bytearray, memoryview)) else item
        if expected is not None and not isinstance(message, expected):
            raise TypeError(f"expected {expected.__name__}, got {type(message).__name__}")
        out.append(message)
    return out


def _sampling(value: SamplingParams | dict[str, Any] | None) -> SamplingParams | None:
    if value is None or isinstance(value, SamplingParams):
        return value
    return msgspec.convert(value, SamplingParams)


class _Engine:
    """Backend construction, thread setting and registry following shared by the engines."""

    def __init__(self, model: str, backend_options: dict[str, Any] | None, registry: Any, follow: bool,
                 torch_threads: int | None, domain: str) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        from scrit.backends import make_backend
        from scrit.selfplay import get_domain

        self.domain = get_domain(domain)
        self.backend = make_backend(model, **(backend_options or {}))
        self.follow = None
        if registry is not None and follow:
            import ray

            self.follow = lambda: ray.get(registry.latest.remote())

    def version(self) -> int:
        return self.backend.version

    def ready(self) -> bool:
        """For ``ray.get(actor.ready.remote())``: returns once the model is loaded."""
        return True

    def metrics_url(self, run: str, port: int = 0) -> str:
        """Start this actor process's Prometheus exporter (once; ``scrit.telemetry``) with ``run`` as
        the run label, and return its URL for the driver's targets file."""
        from scrit import telemetry
        from scrit.actors.roles import _Role

        url = telemetry.start_exporter(port=port, run=run)
        for role in vars(self).values():
            if isinstance(role, _Role):
                telemetry.set_version(telemetry.role_of(role), role.version)
        return url


class SolverEngine(_Engine):
    """A solver model in an actor. Solvers are fixed models by default (``follow_registry=False``)."""

    def __init__(self, model: str, *, backend_options: dict[str, Any] | None = None, domain: str = "arith",
                 name: str = "solver", samples_per_problem: int = 4,
                 sampling: SamplingParams | dict[str, Any] | None = None, style: str = "compact",
                 registry: Any = None, follow_registry: bool = False, torch_threads: int | None = 1) -> None:
        super().__init__(model, backend_options, registry, follow_registry, torch_threads, domain)
        from scrit.actors.roles import SolverRole

        self.role = SolverRole(self.backend, self.domain, name, samples_per_problem, _sampling(sampling), style,
                               self.follow)

    def solve(self, problems: Sequence[Problem | bytes]) -> list[bytes]:
        """Solutions (msgpack), ``samples_per_problem`` per problem, in problem order."""
        return pack(self.role.solve(unpack(problems, Problem)))

    def stats(self) -> dict[str, Any]:
        return self.role.stats()


class CriticEngine(_Engine):
    """The evolving critic in an actor: critique, correction by continuation, and validation.

    The three roles share one backend (one copy of the weights); only the critic role follows the
    registry, and it swaps before a batch, so ``critique_and_correct`` runs a critique and its
    continuation on the same version. Start a second engine to validate in parallel.
    """

    def __init__(self, model: str, *, backend_options: dict[str, Any] | None = None, domain: str = "arith",
                 style: str = "compact", sampling: SamplingParams | dict[str, Any] | None = None,
                 correction_sampling: SamplingParams | dict[str, Any] | None = None,
                 validation_sampling: SamplingParams | dict[str, Any] | None = None,
                 require_answer_match: bool = True, registry: Any = None, follow_registry: bool = True,
                 torch_threads: int | None = 1) -> None:
        super().__init__(model, backend_options, registry, follow_registry, torch_threads, domain)
        from scrit.actors.roles import CorrectorRole, CriticRole, ValidatorRole

        self.critic = CriticRole(self.backend, self.domain, style, _sampling(sampling), self.follow)
        self.corrector = CorrectorRole(self.backend, self.domain, style, _sampling(correction_sampling),
                                       continue_critique=True)
        self.validator = ValidatorRole(self.backend, self.domain, style, _sampling(validation_sampling),
                                       require_answer_match)
        self.critic.maybe_swap()  # a resumed run starts on the latest published version

    def maybe_swap(self) -> bool:
        return self.critic.maybe_swap()

    def critique(self, requests: Sequence[CritiqueRequest | bytes]) -> list[bytes]:
        """Critiques up to ``Correction:`` (msgpack), one per request."""
        return pack(self.critic.critique(unpack(requests, CritiqueRequest)))

    def correct(self, requests: Sequence[CritiqueRequest | bytes], critiques: Sequence[Critique | bytes]) -> list[bytes]:
        """Corrections (msgpack) continuing each critique. Does not swap: see the class docstring."""
        return pack(self.corrector.correct(unpack(requests, CritiqueRequest), unpack(critiques, Critique)))

    def critique_and_correct(self, requests: Sequence[CritiqueRequest | bytes]) -> tuple[list[bytes], list[bytes]]:
        """(critiques, corrections) in one call, both from the same critic version."""
        decoded = unpack(requests, CritiqueRequest)
        critiques = self.critic.critique(decoded)
        return pack(critiques), pack(self.corrector.correct(decoded, critiques))

    def validate(self, problems: Sequence[Problem | bytes], corrected_texts: Sequence[str]) -> list[bytes]:
        """Validations (msgpack) of corrected solutions, on the current version (swapping first)."""
        self.critic.maybe_swap()
        return pack(self.validator.validate(unpack(problems, Problem), list(corrected_texts)))

    def stats(self) -> dict[str, Any]:
        return {"critic": self.critic.stats(), "corrector": self.corrector.stats(),
                "validator": self.validator.stats()}


class CorrectorEngine(_Engine):
    """A separately configured corrector model (``corrector.model``), prompted with corrector_prompt."""

    def __init__(self, model: str, *, backend_options: dict[str, Any] | None = None, domain: str = "arith",
                 style: str = "compact", sampling: SamplingParams | dict[str, Any] | None = None,
                 registry: Any = None, follow_registry: bool = False, torch_threads: int | None = 1) -> None:
        super().__init__(model, backend_options, registry, follow_registry, torch_threads, domain)
        from scrit.actors.roles import CorrectorRole

        self.role = CorrectorRole(self.backend, self.domain, style, _sampling(sampling), continue_critique=False,
                                  follow=self.follow)

    def correct(self, requests: Sequence[CritiqueRequest | bytes], critiques: Sequence[Critique | bytes]) -> list[bytes]:
        return pack(self.role.correct(unpack(requests, CritiqueRequest), unpack(critiques, Critique)))

    def stats(self) -> dict[str, Any]:
        return self.role.stats()


class ValidatorEngine(_Engine):
    """A validator on its own actor (its own copy of the evolving critic, following the registry)."""

    def __init__(self, model: str, *, backend_options: dict[str, Any] | None = None, domain: str = "arith",
                 style: str = "compact", sampling: SamplingParams | dict[str, Any] | None = None,
                 require_answer_match: bool = True, registry: Any = None, follow_registry: bool = True,
                 torch_threads: int | None = 1) -> None:
        super().__init__(model, backend_options, registry, follow_registry, torch_threads, domain)
        from scrit.actors.roles import ValidatorRole

        self.role = ValidatorRole(self.backend, self.domain, style, _sampling(sampling), require_answer_match,
                                  self.follow)
        self.role.maybe_swap()

    def validate(self, problems: Sequence[Problem | bytes], corrected_texts: Sequence[str]) -> list[bytes]:
        return pack(self.role.validate(unpack(problems, Problem), list(corrected_texts)))

    def stats(self) -> dict[str, Any]:
        return self.role.stats()


# ------------------------------------------------------------------------------------------------
# Factories (Ray imported only here)

_remote: dict[type, Any] = {}


def _start(cls: type, model: str, num_cpus: float, num_gpus: float, actor_options: dict[str, Any] | None,
           kwargs: dict[str, Any]) -> Any:
    import ray

    if cls not in _remote:
        _remote[cls] = ray.remote(cls)
    # Threads: the whole CPUs this actor asked for (at least 1); a fraction of a core gets one thread.
    kwargs.setdefault("torch_threads", max(1, math.floor(num_cpus)))
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, **(actor_options or {})}
    return _remote[cls].options(**options).remote(model, **kwargs)


def solver_actor(model: str, *, num_cpus: float = 0.25, num_gpus: float = 0.0,
                 actor_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """A SolverEngine actor; ``kwargs`` go to SolverEngine, ``actor_options`` to ``.options``."""
    return _start(SolverEngine, model, num_cpus, num_gpus, actor_options, kwargs)


def critic_actor(model: str, *, num_cpus: float = 0.25, num_gpus: float = 0.0,
                 actor_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """A CriticEngine actor (critique + continuation corrector + validator); pass ``registry=``."""
    return _start(CriticEngine, model, num_cpus, num_gpus, actor_options, kwargs)


def corrector_actor(model: str, *, num_cpus: float = 0.25, num_gpus: float = 0.0,
                    actor_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """A CorrectorEngine actor for a separately configured corrector model."""
    return _start(CorrectorEngine, model, num_cpus, num_gpus, actor_options, kwargs)


def validator_actor(model: str, *, num_cpus: float = 0.25, num_gpus: float = 0.0,
                    actor_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """A ValidatorEngine actor following the registry; pass ``registry=``."""
    return _start(ValidatorEngine, model, num_cpus, num_gpus, actor_options, kwargs)
