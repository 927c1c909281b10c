"""The one place a config becomes the run's engines and roles (Ray-free).

``plan_run(cfg)`` turns a ``ScritConfig`` into typed specs: one ``EngineSpec`` per model the run
generates with, one ``RoleSpec`` per role. Engines belong to models, not roles (DESIGN.md §1):

* ``critic`` (``critic-engine`` in metrics): the evolving critic. The critic (critique), the corrector (the critic continuing its
  own critique, as in the paper), the validator (the same critic without the reference) and the
  in-run evaluator all call this one pool of ``critic.engines`` replicas, which follows the run's
  published versions: a version is loaded once per engine replica, whatever the number of roles.
* ``solver<i>-<model>``: one pool per configured solver model (fixed weights).
* ``corrector``: only when ``corrector.model`` names a separate model.

The Serve replicas hold engines of their own (``serve_role``): they answer users, so a run's
training traffic never queues behind them, nor they behind it.

Everything a role needs to be built anywhere comes from here: the backend (``build_backend``), the
prompt style and chat template, the sampling, and the follower (``open_engine``). Names come from the
specs too: a role's name is its actor name prefix (``critic.0``), its Prometheus ``role`` label, and
the component a failure names; an engine's label (``critic-engine``) names its actors
(``critic-engine.0``) and labels its follower's swap and version metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import msgspec

from scrit.backends.base import SamplingParams
from scrit.config import Backend, ScritConfig, VLLMConfig

if TYPE_CHECKING:  # pragma: no cover
    from scrit.checkpoints import WeightSource
    from scrit.engine import Engine

__all__ = [
    "CorrectorSettings",
    "CriticSettings",
    "EngineHostSpec",
    "EngineSpec",
    "EvaluatorSettings",
    "RoleSpec",
    "RunPlan",
    "SolverSettings",
    "ValidatorSettings",
    "backend_arguments",
    "build_backend",
    "engine_hosts",
    "engine_spec",
    "open_engine",
    "plan_run",
    "run_demands",
    "serve_role",
]

RoleKind = Literal["solver", "critic", "corrector", "validator", "evaluator", "serve"]
CRITIC_ENGINE = "critic"


class EngineSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How to build one model's engine. Roles whose engine specs are equal share one engine pool."""

    name: str  # "critic" (the evolving critic), "solver0-careless", "corrector", "serve"
    model: str  # a checkpoint directory, or the URL of an OpenAI-compatible server
    backend: Backend = "hf"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16  # HF: prompts per forward pass; http: requests at once; vLLM schedules its own
    chat_template: bool = False  # wrap prompts in the model's chat template (instruct models)
    follows: bool = False  # moves to every critic version the run publishes
    vllm: VLLMConfig = msgspec.field(default_factory=VLLMConfig)
    replicas: int = 1  # engine actors in the pool
    num_cpus: float = 0.25  # per engine actor
    num_gpus: float = 0.0
    max_concurrency: int = 16  # calls an engine actor serves at once (continuous batching on vLLM)
    nice: int = 0  # added to the engine actor's OS nice value (resources.engine_nice)

    @property
    def label(self) -> str:
        """The engine's name in metrics and logs (``critic-engine``), apart from its roles' names."""
        return f"{self.name}-engine"


class EngineHostSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One engine actor: the engines it holds in its process, one per model. With
    ``resources.colocate_engines`` (the CPU default) replica k of every model shares host ``engines.k``:
    one copy of torch and vLLM per process, not per model (measured: a second vLLM engine in a process
    adds ~0.5 GB, a second process ~1.2 GB). On GPU clusters each engine replica has its own host."""

    name: str  # the actor name: ``critic-engine.0``, or ``engines.0`` for colocated models
    engines: list[EngineSpec]
    num_cpus: float
    num_gpus: float
    max_concurrency: int
    nice: int = 0  # added to the actor process's OS nice value (the largest of its engines')


class SolverSettings(msgspec.Struct, frozen=True, kw_only=True, tag="solver"):
    samples_per_problem: int = 2


class CriticSettings(msgspec.Struct, frozen=True, kw_only=True, tag="critic"):
    """How the critic pairs a batch's solutions (``actors/roles.py: pair_solutions``)."""

    mode: str = "contrastive"
    max_per_class: int = 1
    reference_as_correct: bool = True
    seed: int = 0


class CorrectorSettings(msgspec.Struct, frozen=True, kw_only=True, tag="corrector"):
    continue_critique: bool = True  # the critic continues its own critique (a separate model: False)


class ValidatorSettings(msgspec.Struct, frozen=True, kw_only=True, tag="validator"):
    require_answer_match: bool = True
    require_verdict_match: bool = True
    rejudge_correct: bool = False


class EvaluatorSettings(msgspec.Struct, frozen=True, kw_only=True, tag="evaluator"):
    """The in-run held-out sets: ``items`` like the loop's problems, ``hard_items`` longer (6-8 operations),
    both from the held-out hash bucket, drawn with ``seed`` (``seed + 1`` for the harder set)."""

    items: int = 64
    hard_items: int = 32
    seed: int = 1_000_003


RoleSettings = Union[SolverSettings, CriticSettings, CorrectorSettings, ValidatorSettings, EvaluatorSettings]


class RoleSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One role: what it does (``kind``, ``settings``), with which engine, prompts and sampling, and how
    many actors of what size. ``engine=None`` is a role that generates nothing (a disabled validator)."""

    name: str  # unique in the run: actor names ``NAME.k``, the metrics label, the failing component
    kind: RoleKind
    engine: EngineSpec | None
    style: str = "compact"  # prompt style (scrit.prompts)
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    domain: str = "arith"
    settings: RoleSettings | None = None
    replicas: int = 1  # role actors
    num_cpus: float = 0.05  # per role actor (its engine does the work)
    num_gpus: float = 0.0

    def actor_name(self, index: int) -> str:
        return f"{self.name}.{index}"


class RunPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A run's engines, the actors that host them, and its roles in pipeline order (solvers, critic,
    corrector, validator, evaluator)."""

    engines: list[EngineSpec]
    hosts: list[EngineHostSpec]
    roles: list[RoleSpec]

    def hosts_of(self, engine: EngineSpec) -> list[str]:
        """The names of the host actors that hold a replica of ``engine`` (one per replica)."""
        return [host.name for host in self.hosts if any(e.name == engine.name for e in host.engines)]

    def role(self, name: str) -> RoleSpec:
        for role in self.roles:
            if role.name == name:
                return role
        raise KeyError(f"no role {name!r} in this run (roles: {', '.join(r.name for r in self.roles)})")

    def of_kind(self, kind: RoleKind) -> list[RoleSpec]:
        return [role for role in self.roles if role.kind == kind]


# --------------------------------------------------------------------------------------------------
# Config -> specs


def engine_spec(cfg: ScritConfig, name: str, model: str, backend: Backend, style: str, *, device: str = "auto",
                dtype: str = "auto", batch_size: int | None = None, follows: bool = False, replicas: int = 1,
                num_cpus: float | None = None, num_gpus: float | None = None) -> EngineSpec:
    """An engine for ``model`` (a spec such as ``seed`` or a path; resolved here) as ``cfg`` sizes it."""
    from scrit.backends import resolve_model_path
    from scrit.prompts import use_chat_template

    resolved = resolve_model_path(model)
    if not resolved.startswith(("http://", "https://")) and Path(resolved).exists():
        resolved = str(Path(resolved).resolve())
    res = cfg.resources
    return EngineSpec(
        name=name, model=resolved, backend=backend, device=device, dtype=dtype,
        batch_size=batch_size or cfg.critic.batch_size, chat_template=use_chat_template(resolved, style),
        follows=follows, vllm=cfg.vllm, replicas=replicas,
        num_cpus=res.engine_num_cpus if num_cpus is None else num_cpus,
        num_gpus=res.engine_num_gpus if num_gpus is None else num_gpus,
        max_concurrency=res.engine_max_concurrency, nice=res.engine_nice,
    )


def critic_style(cfg: ScritConfig) -> str:
    from scrit.backends import resolve_model_path
    from scrit.prompts import resolve_prompt_style

    return resolve_prompt_style(resolve_model_path(cfg.critic.model), cfg.critic.prompt_style)


def plan_run(cfg: ScritConfig) -> RunPlan:
    """The run's engines and roles from its config (see the module docstring for who shares what)."""
    from scrit.backends import resolve_model_path
    from scrit.prompts import resolve_prompt_style

    critic, res = cfg.critic, cfg.resources
    style = critic_style(cfg)
    critic_engine = engine_spec(cfg, CRITIC_ENGINE, critic.model, critic.backend, style, device=critic.device,
                                dtype=critic.dtype, follows=True, replicas=critic.engines)
    critique = SamplingParams(max_new_tokens=critic.max_new_tokens, temperature=critic.temperature)
    role = {"domain": cfg.domain.name, "num_cpus": res.actor_num_cpus, "num_gpus": res.actor_num_gpus}
    engines = [critic_engine]
    roles: list[RoleSpec] = []
    for index, solver in enumerate(cfg.solvers):
        name = f"solver{index}-{Path(solver.model).name}"  # e.g. solver0-careless: reports say which model
        solver_style = resolve_prompt_style(resolve_model_path(solver.model), critic.prompt_style)
        engine = engine_spec(cfg, name, solver.model, solver.backend, solver_style, device=solver.device,
                             dtype=solver.dtype, replicas=solver.engines)
        engines.append(engine)
        roles.append(RoleSpec(
            name=name, kind="solver", engine=engine, style=solver_style, replicas=solver.num_actors,
            sampling=SamplingParams(max_new_tokens=solver.max_new_tokens, temperature=solver.temperature,
                                    seed=cfg.run.seed * 1000 + index),
            settings=SolverSettings(samples_per_problem=solver.samples_per_problem), **role))
    roles.append(RoleSpec(
        name="critic", kind="critic", engine=critic_engine, style=style, sampling=critique,
        replicas=critic.num_actors, settings=CriticSettings(
            mode=critic.mode, max_per_class=cfg.run.max_per_class,
            reference_as_correct=cfg.run.reference_as_correct, seed=cfg.run.seed), **role))
    corrector = cfg.corrector
    if corrector.model is None:  # the critic continues its own critique, on the critic's engine
        roles.append(RoleSpec(name="corrector", kind="corrector", engine=critic_engine, style=style,
                              sampling=critique, replicas=corrector.num_actors,
                              settings=CorrectorSettings(continue_critique=True), **role))
    else:
        engine = engine_spec(cfg, "corrector", corrector.model, corrector.backend, style)
        engines.append(engine)
        roles.append(RoleSpec(name="corrector", kind="corrector", engine=engine, style=style,
                              sampling=SamplingParams(max_new_tokens=corrector.max_new_tokens),
                              replicas=corrector.num_actors, settings=CorrectorSettings(continue_critique=False),
                              **role))
    validator = cfg.validator
    roles.append(RoleSpec(
        name="validator", kind="validator", engine=critic_engine if validator.enabled else None, style=style,
        sampling=critique, replicas=validator.num_actors, settings=ValidatorSettings(
            require_answer_match=validator.require_answer_match,
            require_verdict_match=validator.require_verdict_match, rejudge_correct=validator.rejudge_correct),
        **role))
    if cfg.run.heldout_eval_items > 0 and cfg.domain.name == "arith":  # the held-out bucket is arith's
        roles.append(RoleSpec(
            name="evaluator", kind="evaluator", engine=critic_engine, style=style,
            sampling=SamplingParams(max_new_tokens=critic.max_new_tokens),
            settings=EvaluatorSettings(items=cfg.run.heldout_eval_items, hard_items=cfg.run.heldout_hard_items,
                                       seed=cfg.domain.heldout_seed), **role))
    return RunPlan(engines=engines, hosts=engine_hosts(engines, res.colocate_engines), roles=roles)


def engine_hosts(engines: list[EngineSpec], colocate: bool) -> list[EngineHostSpec]:
    """The engine actors for ``engines``: one per engine replica, or with ``colocate`` one per replica
    index holding that replica of every model (sizes add up)."""
    if not colocate:
        return [EngineHostSpec(name=f"{engine.label}.{k}", engines=[engine], num_cpus=engine.num_cpus,
                               num_gpus=engine.num_gpus, max_concurrency=engine.max_concurrency, nice=engine.nice)
                for engine in engines for k in range(engine.replicas)]
    hosts = []
    for k in range(max(engine.replicas for engine in engines)):
        held = [engine for engine in engines if engine.replicas > k]
        hosts.append(EngineHostSpec(name=f"engines.{k}", engines=held, num_cpus=sum(e.num_cpus for e in held),
                                    num_gpus=sum(e.num_gpus for e in held),
                                    max_concurrency=sum(e.max_concurrency for e in held),
                                    nice=max(e.nice for e in held)))
    return hosts


def run_demands(cfg: ScritConfig, plan: RunPlan) -> list[tuple[str, dict[str, float]]]:
    """What a run needs of the cluster to go on: ``(component, {"CPU": .., "GPU": ..})`` per actor, for
    the engine hosts, role actors (the evaluator's too), the buffer and registry, and Ray Train's workers
    (``train.min_workers`` of them when training is elastic). The driver checks that these fit the
    cluster's nodes before it starts them and after a node is lost. The Serve replicas are left out:
    the endpoint is a window on the run, and one that cannot be placed must not stop the training."""
    res = cfg.resources

    def need(cpus: float, gpus: float) -> dict[str, float]:
        return {"CPU": cpus, "GPU": gpus}

    out = [(host.name, need(host.num_cpus, host.num_gpus)) for host in plan.hosts]
    out += [(role.actor_name(k), need(role.num_cpus, role.num_gpus)) for role in plan.roles for k in range(role.replicas)]
    out += [(name, need(res.state_num_cpus, 0.0)) for name in ("buffer", "registry")]
    workers = cfg.train.min_workers or cfg.train.num_workers
    out += [(f"trainer.rank{k}", need(res.train_worker_num_cpus, res.train_worker_num_gpus)) for k in range(workers)]
    return out


def serve_role(cfg: ScritConfig, model: str, *, follows: bool) -> RoleSpec:
    """The Serve replicas' role: the critic's model, prompt style and backend, on engines of their own
    (one per replica; ``follows``: the run's versions). Its sampling is the ``/v1/critique`` one."""
    from scrit.prompts import resolve_prompt_style

    style = resolve_prompt_style(model, cfg.critic.prompt_style)
    critic, res = cfg.critic, cfg.resources
    engine = engine_spec(cfg, "serve", model, critic.backend, style, device=critic.device, dtype=critic.dtype,
                         batch_size=max(critic.batch_size, cfg.serve.max_batch_size), follows=follows,
                         replicas=res.serve_replicas, num_cpus=res.serve_replica_num_cpus,
                         num_gpus=res.serve_replica_num_gpus)
    return RoleSpec(name="serve", kind="serve", engine=engine, style=style,
                    sampling=SamplingParams(max_new_tokens=critic.max_new_tokens), domain=cfg.domain.name,
                    replicas=res.serve_replicas, num_cpus=res.serve_replica_num_cpus,
                    num_gpus=res.serve_replica_num_gpus)


# --------------------------------------------------------------------------------------------------
# Specs -> engines


def backend_arguments(engine: EngineSpec, model: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(spec, options)`` for ``scrit.backends.make_backend``: each backend takes different options (vLLM
    has no ``device`` or ``batch_size``: it schedules its own batches; the HTTP client has a request
    ``concurrency``), so the spec's one set of keys is translated here and nowhere else."""
    model = model or engine.model
    if engine.backend == "http" or model.startswith(("http://", "https://")):
        return model, {"concurrency": engine.batch_size}
    if engine.backend == "vllm":
        return f"vllm:{model}", {"dtype": engine.dtype, "use_chat_template": engine.chat_template,
                                 **msgspec.structs.asdict(engine.vllm)}
    return model, {"device": engine.device, "dtype": engine.dtype, "batch_size": engine.batch_size,
                   "use_chat_template": engine.chat_template}


_WARMUP_PROMPT = "Critique the student solution.\n"


def build_backend(engine: EngineSpec, model: str | None = None, version: int = 0) -> Any:
    """The inference backend of ``engine`` in this process, on ``model`` (default: the spec's) as
    version ``version``, warmed up with one token (first-call costs are paid before it serves, and a
    checkpoint whose weights load but cannot generate fails here)."""
    from scrit.backends import make_backend

    spec, options = backend_arguments(engine, model)
    if spec.startswith(("http://", "https://")):
        return make_backend(spec, **options)  # a server's weights are its own; nothing to warm up here
    backend = make_backend(spec, version=version, **options)
    backend.generate([_WARMUP_PROMPT], SamplingParams(max_new_tokens=1))
    return backend


def open_engine(engine: EngineSpec, run_dir: str | Path | None = None, *, base_version: int = 0,
                verify_checksum: bool = True, poll_s: float = 0.2, label: str | None = None,
                weights: WeightSource | None = None) -> Engine:
    """``engine`` built in this process. One that ``follows`` (and has a ``run_dir``) starts on the run's
    newest published version that verifies and loads (the spec's model as ``base_version`` when none
    does), through the same ``VersionFollower`` that then keeps it current: a restarted engine rejoins
    on the latest version. ``weights`` is where the follower gets versions in memory (in a run: Ray's
    object store); without it, or for a version it lacks, the checkpoint is read. ``label`` names it in
    metrics and logs (default: ``engine.label``)."""
    from scrit.checkpoints import VersionFollower
    from scrit.engine import Engine
    from scrit.messages import WeightVersion

    label = label or engine.label
    if not (engine.follows and run_dir is not None):
        return Engine(label, build_backend(engine, version=base_version))
    follower = VersionFollower(run_dir, None, label, verify_checksum=verify_checksum, weights=weights)
    base = WeightVersion(version=base_version, uri=engine.model, checksum="", created_at=0.0)
    follower.open(lambda version: build_backend(engine, version.uri, version.version), base)
    return Engine(label, follower.backend, follower, poll_s=poll_s)
