"""Engine actors: each model's engine, shared by every role that uses the model (DESIGN.md §1).

An engine host actor builds its engines inside its own process from ``EngineHostSpec`` (one engine per
model it holds; ``scrit.factory.open_engine``: model weights never cross Ray's object store at start)
and serves ``generate`` calls from any number of role actors at once (a threaded actor; on vLLM the
calls to one engine join one continuously batched engine, so the critic's, corrector's and
validator's requests share forward passes). The evolving critic's engines follow the run's versions: a
swap happens between requests, and every generation names its version.

``EnginePool`` is a role's view of its model's engine replicas: one ``generate`` goes to one replica
(round robin). A host actor that is gone for good (its process or node died and Ray's restarts and
retries are used up) raises ``EngineUnavailable``, which the pipeline treats as a crash (the batch is
sent again), never as a bug in the role.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scrit.backends.base import Generation, SamplingParams
from scrit.factory import EngineHostSpec
from scrit.messages import GenerationBatch, GenerationRequest, decode, encode

if TYPE_CHECKING:  # pragma: no cover
    from scrit.checkpoints import WeightSource

__all__ = ["EngineHost", "EnginePool", "EngineUnavailable", "find_actors", "start_engine_hosts"]


class EngineUnavailable(RuntimeError):
    """A role's engine actor is gone (after Ray's restarts and retries); ``component`` names it."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(component, message)
        self.component = component
        self.message = message

    def __str__(self) -> str:
        return f"{self.component}: {self.message}"


def lower_priority(increment: int) -> None:
    """Add ``increment`` to the OS nice value of every thread of this process. On Linux the nice value is
    per thread (a new thread takes its creator's), so each thread already running is reniced; elsewhere
    ``os.nice`` covers the process. Raising a nice value needs no privilege; lowering it back would."""
    if increment <= 0:
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        os.nice(increment)
        return
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            continue


class EngineHost:
    """The Ray shell of one engine host (see the module docstring)."""

    def __init__(self, spec: EngineHostSpec, run_dir: str | None, weights: WeightSource | None = None) -> None:
        import torch

        from scrit.factory import open_engine
        from scrit.rundir import record_process

        torch.set_num_threads(max(1, math.floor(spec.num_cpus)))  # more threads than CPUs only fight
        lower_priority(spec.nice)  # before the engines start their threads, which inherit it
        if run_dir:
            record_process(run_dir, spec.name)  # a restarted host shows up again: restarts are counted
        self.name = spec.name
        self.engines = {engine.name: open_engine(engine, run_dir, weights=weights) for engine in spec.engines}

    def generate(self, request: bytes) -> bytes:
        """GenerationRequest -> GenerationBatch, as msgpack."""
        asked = decode(request, GenerationRequest)
        engine = self.engines[asked.engine] if asked.engine else next(iter(self.engines.values()))
        return encode(GenerationBatch(generations=engine.generate(asked.prompts, asked.sampling, asked.min_version)))

    def ready(self) -> dict[str, int]:
        """Returns (the version each engine serves) once the engines are loaded."""
        return {name: engine.version for name, engine in self.engines.items()}

    def stats(self) -> dict[str, Any]:
        """Per engine: version, requests, swaps (``scrit.engine.Engine.stats``)."""
        return {name: engine.stats() for name, engine in self.engines.items()}

    def metrics_url(self, run: str, port: int = 0) -> str:
        """Start this host's Prometheus exporter (each engine's swaps and version, by engine label)."""
        from scrit import telemetry

        url = telemetry.start_exporter(port=port, run=run)
        for engine in self.engines.values():
            telemetry.set_version(engine.name, engine.version)
        return url


def start_engine_hosts(hosts: Sequence[EngineHostSpec], run_dir: str | None,
                       actor_options: dict[str, Any] | None = None, prefix: str = "",
                       weights: WeightSource | None = None) -> dict[str, Any]:
    """One actor per host spec, named ``prefix + spec.name`` in Ray (the prefix keeps two runs in one Ray
    namespace apart); not yet waited for. Engines that follow the run take versions from ``weights``
    (Ray's object store) when it has them. Returns the handles by host name."""
    import ray

    remote = ray.remote(EngineHost)
    handles = {}
    for host in hosts:
        options = {"num_cpus": host.num_cpus, "num_gpus": host.num_gpus, "max_concurrency": host.max_concurrency,
                   **(actor_options or {}), "name": prefix + host.name}
        handles[host.name] = remote.options(**options).remote(host, run_dir, weights)
    return handles


def find_actors(names: Sequence[str], timeout_s: float = 60.0) -> list[Any]:
    """Handles of the actors named ``names`` (waiting for a name that is not registered yet). Role actors
    find their engine hosts by name, so a role's constructor holds no actor handle (Ray could not
    restart the role if such an argument were lost)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    handles = []
    for name in names:
        while True:
            try:
                handles.append(ray.get_actor(name))
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    return handles


class EnginePool:
    """A role's client of its model's engine replicas (on ``handles``, one host actor each), with the
    interface roles call (``generate``, ``version``)."""

    def __init__(self, engine: str, handles: Sequence[Any], host_names: Sequence[str] | None = None) -> None:
        if not handles:
            raise ValueError(f"engine {engine!r} has no host actors")
        self.engine = engine
        self.handles = list(handles)
        self.host_names = list(host_names or [f"{engine}-host.{k}" for k in range(len(self.handles))])
        self._turn = itertools.cycle(range(len(self.handles)))
        self.version = 0  # the newest version seen in a result

    def generate(self, prompts: Sequence[str], sampling: SamplingParams, min_version: int = 0) -> list[Generation]:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        index = next(self._turn)
        request = encode(GenerationRequest(prompts=list(prompts), sampling=sampling, min_version=min_version,
                                           engine=self.engine))
        try:
            reply = ray.get(self.handles[index].generate.remote(request))
        except (RayActorError, ActorUnavailableError) as error:
            raise EngineUnavailable(self.host_names[index],
                                    f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
        generations = decode(reply, GenerationBatch).generations
        if generations:
            self.version = max(self.version, *(g.version for g in generations))
        return generations
