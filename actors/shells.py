"""The one Ray shell of every role (``actors/roles.py``): solver, critic, corrector, validator, evaluator.

A role actor builds its role from its ``scrit.factory.RoleSpec`` inside its own process, generating
through its model's engine actors (``actors/engines.py``), and forwards the role's stage: batches cross
actor boundaries as msgspec msgpack bytes (DESIGN.md §3), so the pipeline passes work actor to actor
through the object store and the driver only holds references. Role actors hold no model: they are
small processes (no torch), and the engine does the work.

A stage that raises is re-raised as ``StageFailed`` naming the actor (``solver0-careless.0``), so the
driver reports which role failed whatever Ray calls the method; an engine that is gone surfaces as
``EngineUnavailable`` (a crash: the batch is sent again). Ray is imported only in ``start_role``.
"""

from __future__ import annotations

from typing import Any

from scrit.factory import RoleSpec

__all__ = ["RoleHost", "StageFailed", "start_role"]


class StageFailed(RuntimeError):
    """A role's stage raised (a bug or bad data, not a crash: sending the batch again would not help)."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(component, message)
        self.component = component
        self.message = message

    def __str__(self) -> str:
        return f"{self.component}: {self.message}"


class RoleHost:
    """Hosts one role: ``stage`` (pipeline roles), ``evaluate`` (the evaluator), ``stats``, metrics."""

    def __init__(self, spec: RoleSpec, hosts: list[str], run_dir: str | None, index: int = 0,
                 prefix: str = "") -> None:
        from scrit.actors.engines import EnginePool, find_actors
        from scrit.actors.roles import make_role
        from scrit.rundir import record_process

        self.actor_name = spec.actor_name(index)
        if run_dir:
            record_process(run_dir, self.actor_name)  # a restarted actor shows up again: restarts are counted
        engine = None
        if spec.engine is not None:
            engine = EnginePool(spec.engine.name, find_actors([prefix + host for host in hosts]), hosts)
        self.role = make_role(spec, engine)

    def _call(self, method: str, *args: Any) -> Any:
        from scrit.actors.engines import EngineUnavailable

        try:
            return getattr(self.role, method)(*args)
        except EngineUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - named for the driver; the traceback stays in the cause
            raise StageFailed(self.actor_name, f"{type(error).__name__}: {error}") from error

    def stage(self, *parts: bytes) -> bytes:
        """The role's pipeline stage on msgpack batches (``Solver.stage``, ``Critic.stage``, ...)."""
        return self._call("stage", *parts)

    def evaluate(self, version: int) -> dict[str, Any]:
        """The evaluator's held-out scores of ``version`` (or the newer one its engine serves)."""
        return self._call("evaluate", version)

    def ready(self) -> bool:
        """For ``ray.get(actor.ready.remote())``: returns once the role is built."""
        return True

    def stats(self) -> dict[str, Any]:
        return self.role.stats()

    def metrics_url(self, run: str, port: int = 0) -> str:
        """Start this actor's Prometheus exporter (once; ``scrit.telemetry``) with ``run`` as the run
        label, and return its URL for the driver's targets file."""
        from scrit import telemetry

        url = telemetry.start_exporter(port=port, run=run)
        telemetry.set_version(self.role.name, self.role.version)
        return url


def start_role(spec: RoleSpec, hosts: list[str], run_dir: str | None, index: int = 0,
               actor_options: dict[str, Any] | None = None, prefix: str = "") -> Any:
    """Start role actor ``index`` of ``spec``, which calls its engine on the host actors named ``hosts``
    (``RunPlan.hosts_of``; in Ray ``prefix + host``); ``actor_options`` go to ``.options``."""
    import ray

    options = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, **(actor_options or {})}
    return ray.remote(RoleHost).options(**options).remote(spec, hosts, run_dir, index, prefix)
