"""``scrit run``: the driver of one self-play run. It starts, watches and stops; it carries no data.

Read it top to bottom, as a run goes:

1. **Set-up** (``_start``): the run directory, Ray, a check that the cluster can hold the run, the
   weight registry and replay-buffer actors (on the driver's node: the run's state lives with the
   process it cannot lose anyway), the producer pipeline (``actors/pipeline.py``: solver -> critic ->
   validator -> buffer actors, spread over the nodes), the evaluator, the metrics exporters, the
   critic endpoint, and Ray Train in a background thread.
2. **Watch** (``_watch``): keep batches flowing while the buffer has room, log each finished batch
   (``metrics.jsonl``), score every new version on held-out problems, note every node lost (and fail
   if what is left cannot hold the run), stop at the last version or the deadline, fail when a
   component cannot go on.
3. **Finish** (``_finish``): stop the trainer, let the batches in flight reach the buffer, wait for
   the evaluations, write ``report.md`` and then ``summary.json`` (``status``: completed |
   interrupted | failed, the error and its component, the counts, where each component ran and every
   restart with its reason). A failure's full traceback goes to ``RUN_DIR/run.log``.

Everything the run produces lives under the run directory (``scrit/rundir.py``).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scrit.config import ScritConfig, config_to_dict, dump_yaml
from scrit.evaluate import eval_due
from scrit.rundir import (
    EventLog,
    RunDirError,
    interrupts_deferred,
    prepare_run_dir,
    process_records,
    read_events,
    record_process,
    write_json_atomic,
)

__all__ = ["RunDirError", "RunFailed", "SelfPlayRun"]

log = logging.getLogger(__name__)

BUFFER_NAME = "scrit-buffer"
REGISTRY_NAME = "scrit-registry"
NO_PLACEMENT: dict[str, Any] = {"restarts": {}, "restart_log": [], "placement": {}, "nodes": {}}
EVAL_RETRIES = 5  # an evaluation lost with its actor, engine or node is asked again this often
COUNTS = ("problems", "solutions", "solutions_correct", "critiques", "parsed", "consistent", "validated", "kept")


class RunFailed(RuntimeError):
    """A component failed in a way the run cannot go on from; ``component`` names it."""

    def __init__(self, component: str, error: BaseException | str) -> None:
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(f"{component}: {message}")
        self.component = component
        self.message = message


class SelfPlayRun:
    """One ``scrit run``: call :meth:`run` (blocks) and read the returned summary."""

    def __init__(self, cfg: ScritConfig, run_dir: str | Path, resume: bool = False,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.resume = resume
        self.on_event = on_event or (lambda event: None)
        self.started = time.time()
        self.namespace = f"scrit-{uuid.uuid4().hex[:8]}"
        self.counts = dict.fromkeys(COUNTS, 0)
        self.batch_retries = 0
        self.evals: dict[int, dict[str, Any]] = {}
        self.pending_evals: dict[Any, int] = {}  # evaluation ref -> the version asked for
        self.skipped_evals: set[int] = set()
        self.eval_losses: dict[int, int] = {}  # version -> evaluations of it lost with their actor or node
        self.registry: Any = None
        self.buffer: Any = None
        self.evaluator: Any = None
        self.trainer: Any = None
        self.pipeline: Any = None
        self.endpoint_url: str | None = None
        self.metrics_targets: Any = None
        self.weights: Any = None  # ObjectStoreWeights: how versions reach the engines and Serve replicas
        self.nodes: Any = None  # actors/nodes.py: NodeWatch, once Ray is up
        self.demands: list[tuple[str, dict[str, float]]] = []  # what the run needs of the cluster
        self.trainer_restarts_seen = 0

    # ====================================================================================== run
    def run(self) -> dict[str, Any]:
        import ray

        prepare_run_dir(self.run_dir, self.resume)
        (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        self.events = EventLog(self.run_dir / "metrics.jsonl", self.started)
        started_ray = not ray.is_initialized()
        if started_ray:
            # torch loads before Ray starts: as a Ray job's driver on a cluster built by
            # ray.cluster_utils (tests/test_multinode.py), loading libtorch after ray.init() aborts the
            # process ("Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so", then a segfault);
            # loaded before, it works. Cause not found; the driver needs torch later anyway.
            import torch  # noqa: F401

            # Ray Serve's controller polls its deployments every 0.1 s: 5 % of a core, idle, here; every
            # second halves that and still follows a replica's death within its health-check period (10 s).
            # Only a Ray this process starts sees it (a cluster's controller runs in the cluster's env).
            os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "1.0")
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, namespace=self.namespace,
                     log_to_driver=False, include_dashboard=False)
        else:
            self.namespace = ray.get_runtime_context().namespace
        record_process(self.run_dir, "driver")
        status, failure = "completed", None
        try:
            self._start()
            self._watch()
        except KeyboardInterrupt:
            status = "interrupted"
        except Exception as error:  # noqa: BLE001 - every failure ends in summary.json, never a bare traceback
            status, failure = "failed", error if isinstance(error, RunFailed) else RunFailed("driver", error)
            self._log_failure(error)
        return self._finish(status, failure, started_ray)

    # ================================================================================== set-up
    def _start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from scrit.actors.nodes import NodeWatch
        from scrit.actors.pipeline import ProducerPipeline
        from scrit.actors.registry import ObjectStoreWeights, weight_registry_actor
        from scrit.actors.replay_buffer import buffer_options, replay_buffer_actor
        from scrit.checkpoints import RegistryError, read_registry, remove_unpublished_checkpoints
        from scrit.factory import CRITIC_ENGINE, plan_run, run_demands
        from scrit.problems import ProblemSource
        from scrit.train.budget import training_deadline
        from scrit.train.trainer import TrainerThread

        cfg = self.cfg
        plan = plan_run(cfg)
        self.nodes = NodeWatch()
        self.demands = run_demands(cfg, plan)
        self._check_fits()  # a cluster too small for the run fails now, not after a wait that never ends
        critic_engine = next(engine for engine in plan.engines if engine.name == CRITIC_ENGINE)
        self.seed_uri = critic_engine.model
        # Instruct models get their chat template, in generation and (same flag) in training.
        self.chat_template = critic_engine.chat_template
        if self.resume:
            try:  # a corrupt registry names its file and byte here, before any actor depends on it
                read_registry(self.run_dir)
            except RegistryError as error:
                raise RunFailed("registry", error) from error
            remove_unpublished_checkpoints(self.run_dir)  # a killed trainer's half-written versions
        # Actors restart after a crash (or on another node after theirs is lost) and rebuild their state
        # from the run directory's files.
        restarts = {"max_restarts": cfg.faults.actor_max_restarts, "max_task_retries": cfg.faults.actor_task_retries}
        # The run's state lives on the driver's node. Hard affinity when it needs no CPUs (it always fits
        # there): Ray places a soft-affine actor that asks for no resources on a random node (ray#25360
        # fixed only hard affinity), so a lost worker node would take the buffer and registry with it.
        # With state_num_cpus > 0 soft, so a driver's node without room does not leave them unplaced.
        state = {**restarts, "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=cfg.resources.state_num_cpus > 0)}
        self.registry = weight_registry_actor(self.run_dir, self.seed_uri, num_cpus=cfg.resources.state_num_cpus,
                                              name=REGISTRY_NAME, actor_options=state)
        self.buffer = replay_buffer_actor(num_cpus=cfg.resources.state_num_cpus,
                                          actor_options={"name": BUFFER_NAME, **state},
                                          run_dir=str(self.run_dir), seed=cfg.run.seed, **buffer_options(cfg.buffer))
        # Engines and roles spread over the nodes, so a lost node takes only its share of them.
        workers = {**restarts, **({"scheduling_strategy": "SPREAD"} if cfg.resources.placement == "spread" else {})}
        self.weights = (ObjectStoreWeights(registry=REGISTRY_NAME, namespace=self.namespace)
                        if cfg.run.weight_transport == "object_store" else None)
        latest = ray.get(self.registry.latest.remote())
        buffer_stats = ray.get(self.buffer.stats.remote())
        if buffer_stats["torn_bytes"]:  # a crash mid-append: the torn tail was cut off and kept aside
            self.on_event(self.events.write("buffer_repaired", torn_bytes=buffer_stats["torn_bytes"],
                                            kept_aside=buffer_stats["torn_path"], examples=buffer_stats["total_appended"]))
        events = read_events(self.run_dir / "metrics.jsonl")
        previous = [e for e in events if e.get("kind") == "batch"]
        self.evals = {e["version"]: e for e in events if e.get("kind") == "eval"}
        # A resumed run goes on after the last batch the buffer or the log has seen (the driver may
        # have died between a batch's put and its log line).
        last_batch = max([e.get("batch_id", -1) for e in previous] + [buffer_stats["last_batch_id"]])
        self.pipeline = ProducerPipeline(
            cfg, plan, self.run_dir, self.buffer,
            ProblemSource(cfg, skip=sum(e.get("problems", 0) for e in previous)), first_batch_id=last_batch + 1,
            actor_options=workers, weights=self.weights)
        evaluators = plan.of_kind("evaluator")  # arith with heldout_eval_items > 0: one, on the critic's engines
        if evaluators:
            self.evaluator = self.pipeline.start_role(evaluators[0], self.run_dir, 0, workers)
        self.pipeline.wait_ready()
        if cfg.metrics.enabled:
            from scrit.actors.metrics_targets import MetricsTargets

            self.metrics_targets = MetricsTargets(self.run_dir, cfg.run.name, self.registry, cfg.metrics.port)
            self.metrics_targets.add_actors({**self.pipeline.actors(), "buffer": self.buffer,
                                             **({"evaluator.0": self.evaluator} if self.evaluator else {})})
            self.metrics_targets.watch()
        self._start_endpoint()
        self._schedule_evals(latest.version)
        deadline = training_deadline(self.started, cfg.run.max_wall_seconds) if cfg.train.fit_wall_budget else None
        self.trainer = TrainerThread(cfg, self.run_dir, BUFFER_NAME, REGISTRY_NAME, latest.version,
                                     namespace=self.namespace, chat_template=self.chat_template, deadline=deadline)

    def _start_endpoint(self) -> None:
        """The critic's HTTP endpoint (``serve.enabled``), following this run's versions as they appear.

        Its URL goes to ``RUN_DIR/endpoint.json`` and the live output. A failure to start (say, the
        port is taken) is reported and the run goes on: the endpoint is a window on the run, and
        losing it must not cost the training.
        """
        if not self.cfg.serve.enabled:
            return
        from scrit.serve import start_critic_endpoint

        try:
            self.endpoint_url = start_critic_endpoint(self.cfg, self.seed_uri, self.run_dir, weights=self.weights)
        except Exception as error:  # noqa: BLE001 - see the docstring
            self.on_event(self.events.write("endpoint_error", error=f"{type(error).__name__}: {error}"))
            return
        write_json_atomic(self.run_dir / "endpoint.json", {"url": self.endpoint_url})
        self.on_event(self.events.write("endpoint", url=self.endpoint_url))

    # =================================================================================== watch
    def _watch(self) -> None:
        import ray

        from scrit.actors.pipeline import BatchFailed

        cfg = self.cfg
        deadline = self.started + cfg.run.max_wall_seconds
        published = -1
        while True:
            latest = ray.get(self.registry.latest.remote())
            if latest.version != published:
                published = latest.version
                # metrics.jsonl and Prometheus (scrit_critic_version{role="published"}) see each publish
                self.on_event(self.events.write("version", version=latest.version, target=cfg.run.versions))
            self._schedule_evals(latest.version)
            self._collect_evals()
            self._watch_nodes()
            if latest.version >= cfg.run.versions:
                return
            if self.trainer.done.is_set():
                raise RunFailed("trainer", self.trainer.error or "stopped before the last version")
            if time.time() > deadline:
                self.events.write("stop", reason="max_wall_seconds")
                return
            self.pipeline.fill(ray.get(self.buffer.room.remote()))
            try:
                reports = self.pipeline.collect(timeout=1.0)
            except BatchFailed as error:
                raise RunFailed(error.component, error.error) from error
            for retry in self.pipeline.retries:
                self.batch_retries += 1
                self.on_event(self.events.write("retry", **retry))
            self.pipeline.retries.clear()
            for report in reports:
                self._record_batch(report, latest.version)

    def _watch_nodes(self) -> None:
        """Log each node lost and each restart of Ray Train's controller; fail the run, naming what no
        longer fits, when the nodes left cannot hold it (Ray would wait for them forever)."""
        for node in self.nodes.poll():
            self.on_event(self.events.write("node_lost", node=self.nodes.name(node)))
            self._check_fits(f"after losing node {self.nodes.name(node)}, ")
        for restart in self.trainer.restarts[self.trainer_restarts_seen:]:
            self.trainer_restarts_seen += 1
            self.on_event(self.events.write("trainer_restart", error=restart["error"]))

    def _check_fits(self, context: str = "") -> None:
        from scrit.actors.nodes import unplaceable

        capacities = self.nodes.capacities()
        missing = unplaceable(self.demands, capacities)
        if missing:
            cpus = sum(node.get("CPU", 0.0) for node in capacities)
            gpus = sum(node.get("GPU", 0.0) for node in capacities)
            needed = {kind: round(sum(need.get(kind, 0.0) for _, need in self.demands), 3) for kind in ("CPU", "GPU")}
            raise RunFailed("cluster", f"the cluster is too small for this run: {context}{len(capacities)} live "
                                       f"nodes have {cpus:g} CPUs and {gpus:g} GPUs, the run needs {needed['CPU']:g} "
                                       f"CPUs and {needed['GPU']:g} GPUs; no room for {', '.join(missing)} "
                                       f"(resources.* and train.min_workers size it)")

    def _record_batch(self, report: dict[str, Any], latest_version: int) -> None:
        for key in COUNTS:
            self.counts[key] += report.get(key, 0)
        consistent = report.get("consistent", 0)
        event = self.events.write(
            "batch", **{k: v for k, v in report.items() if k != "timings"},
            pass_rate=report.get("validated", 0) / consistent if consistent else None,
            latest_version=latest_version if latest_version >= 0 else None,  # -1: drained after the end
            in_flight=self.pipeline.moving, totals=dict(self.counts),
            stages={t["stage"]: round(t["end"] - t["start"], 2) for t in report.get("timings", [])},
            tokens=sum(t.get("tokens", 0) for t in report.get("timings", [])),
        )
        self.on_event(event)

    # ------------------------------------------------------------------------------ evaluation
    def _schedule_evals(self, latest_version: int, final: bool = False) -> None:
        """Queue a held-out evaluation for every due version not yet scored: the seed, every
        ``run.eval_every``-th version, the last one planned and, once the run ends (``final``), the last
        one published. The evaluator scores what the critic's engine serves, at least the version asked
        for: a version the engine had already moved past is skipped."""
        if self.evaluator is None:
            return
        queued = set(self.pending_evals.values())
        for version in range(0, latest_version + 1):
            if version in self.evals or version in queued or version in self.skipped_evals:
                continue
            if not eval_due(version, self.cfg.run.eval_every, self.cfg.run.versions,
                            latest_version if final else None):
                continue
            self.pending_evals[self.evaluator.evaluate.remote(version)] = version

    def _collect_evals(self, wait: bool = False) -> None:
        """Record finished evaluations. One lost with its evaluator or engine (a process died, a node was
        lost) is asked again, up to ``EVAL_RETRIES`` times (``eval_retry``); one that fails otherwise is
        logged (``eval_error``) and the run goes on: the scores are a window on the run, like the endpoint."""
        import ray

        while self.pending_evals:
            ready, _ = ray.wait(list(self.pending_evals), num_returns=1, timeout=None if wait else 0)
            if not ready:
                return
            asked = self.pending_evals.pop(ready[0])
            try:
                scores = ray.get(ready[0])
            except Exception as error:  # noqa: BLE001 - see the docstring
                lost = self.eval_losses.get(asked, 0)
                if _lost_process(error) and lost < EVAL_RETRIES:  # its actor, engine or node went: ask again
                    self.eval_losses[asked] = lost + 1
                    self.on_event(self.events.write("eval_retry", version=asked, attempt=lost + 1,
                                                    error=f"{type(error).__name__}: {str(error).splitlines()[0]}"))
                    continue  # _schedule_evals queues it again on the restarted evaluator
                self.skipped_evals.add(asked)
                self._log_failure(error)
                self.on_event(self.events.write("eval_error", version=asked,
                                                error=f"{type(error).__name__}: {str(error).splitlines()[0]}"))
                continue
            for skipped in range(asked, scores["version"]):
                self.skipped_evals.add(skipped)  # the engine had moved past it before it was scored
            if scores["version"] not in self.evals:
                self.evals[scores["version"]] = self.events.write("eval", **scores)
                self.on_event(self.evals[scores["version"]])

    # ================================================================================== finish
    def _finish(self, status: str, failure: RunFailed | None, started_ray: bool) -> dict[str, Any]:
        import ray

        summary: dict[str, Any] = {}
        try:
            if self.trainer is not None:
                ray.get(self.registry.request_stop.remote())
                # a failed run's trainer may never have been placed (the cluster is too small): do not wait long
                self.trainer.done.wait(timeout=10 if status == "failed" else 120)
            if self.pipeline is not None and status != "failed":
                for report in self.pipeline.drain(timeout=60 if status == "completed" else 10):
                    self._record_batch(report, -1)
            latest = ray.get(self.registry.latest.remote()) if self.registry is not None else None
            if status == "completed" and latest is not None:
                for _ in range(EVAL_RETRIES + 1):  # an evaluation lost with its node is asked again
                    self._schedule_evals(latest.version, final=True)
                    if not self.pending_evals:
                        break
                    self._collect_evals(wait=True)
        except KeyboardInterrupt:
            status = "interrupted"
        except Exception as error:  # noqa: BLE001 - finishing must still write the summary
            self._log_failure(error)
            if failure is None:
                status, failure = "failed", error if isinstance(error, RunFailed) else RunFailed("driver", error)
            latest = None
        try:
            with interrupts_deferred():  # a Ctrl-C now waits until the report and summary are written
                summary = self._summary(latest, status, failure)
            if self.endpoint_url and self.cfg.run.keep_serving and status == "completed":
                self._serve_until_interrupted()
        except KeyboardInterrupt:
            if not summary:  # Ctrl-C before the run's outputs were written: the caller sees it
                raise
            # Ctrl-C once summary.json exists (e.g. the moment --keep-serving begins): the run is complete.
        finally:
            if self.metrics_targets is not None:
                self.metrics_targets.stop()
            if self.endpoint_url:
                from scrit.serve import stop_critic_endpoint

                stop_critic_endpoint()  # also when joining a cluster, where ray.shutdown() would leave it up
            if started_ray:
                ray.shutdown()
        return summary

    def _serve_until_interrupted(self) -> None:
        """``run.keep_serving``: the run is over but its endpoint stays up (final version) until Ctrl-C."""
        try:
            self.on_event({"kind": "serving", "url": self.endpoint_url})
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass

    def _log_failure(self, error: BaseException) -> None:
        """The full traceback goes to ``RUN_DIR/run.log``; the screen gets one line (``scrit run``)."""
        with open(self.run_dir / "run.log", "a", encoding="utf-8") as handle:
            handle.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} failure\n")
            handle.write("".join(traceback.format_exception(error)))

    def _summary(self, latest: Any, status: str, failure: RunFailed | None) -> dict[str, Any]:
        from scrit.report import kept_error_kinds, write_report

        summary = {
            "run_name": self.cfg.run.name,
            "status": status,
            "error": None if failure is None else {"component": failure.component, "message": failure.message},
            "versions": latest.version if latest is not None else None,
            "seed_model": getattr(self, "seed_uri", self.cfg.critic.model),
            "final_model": latest.uri if latest is not None else None,
            "started_at": self.started,  # epoch seconds; metrics.jsonl's ``t`` counts from here
            "wall_seconds": round(time.time() - self.started, 1),
            "interrupted": status == "interrupted",
            "resumed": self.resume,
            "validator_enabled": self.cfg.validator.enabled,
            "require_answer_match": self.cfg.validator.require_answer_match,
            "require_verdict_match": self.cfg.validator.require_verdict_match,
            "endpoint": self.endpoint_url,
            "counts": self.counts,
            **self._reported(self._placement, dict(NO_PLACEMENT)),
            "engines": self._reported(self._engine_stats, {}),
            "batch_retries": self.batch_retries,
            "kept_error_kinds": self._reported(kept_error_kinds, {}) if self.cfg.domain.name == "arith" else {},
            "train": read_events(self.run_dir / "train_metrics.jsonl"),
            "evals": [self.evals[v] for v in sorted(self.evals)],
            "config": config_to_dict(self.cfg, redact=True),
        }
        # summary.json marks a finished run (scripts and tests wait for it): written last, and whole.
        self._reported(lambda run_dir: write_report(run_dir, summary), None)
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def _placement(self, run_dir: Path) -> dict[str, Any]:
        """``restarts`` (count per component), ``restart_log`` (each with its reason: node lost or process
        died), ``placement`` (the node each component runs on now) and ``nodes`` (every node seen)."""
        from scrit.actors.nodes import component_history

        if self.nodes is None:  # Ray never came up
            return dict(NO_PLACEMENT)
        records = process_records(run_dir, self.started)
        self.nodes.poll()
        placement, restart_log = component_history(records, self.nodes, self.started)
        restarts: dict[str, int] = {}
        for restart in restart_log:
            restarts[restart["component"]] = restarts.get(restart["component"], 0) + 1
        return {"restarts": restarts, "restart_log": restart_log, "placement": placement,
                "nodes": self.nodes.summary()}

    def _engine_stats(self, run_dir: Path) -> dict[str, Any]:
        """Each engine host's engines at the end: version, requests, swaps and how each version arrived
        (``transports``: object store or disk)."""
        import ray

        if self.pipeline is None:
            return {}
        hosts = self.pipeline.hosts
        return dict(zip(hosts, ray.get([host.stats.remote() for host in hosts.values()], timeout=10)))

    def _reported(self, make: Callable[[Path], Any], fallback: Any) -> Any:
        """A report's statistic or plot; one that fails goes to run.log and never costs the run its summary."""
        try:
            return make(self.run_dir)
        except Exception as error:  # noqa: BLE001 - the summary of a 15-minute run matters more
            self._log_failure(error)
            return fallback


def _lost_process(error: BaseException) -> bool:
    """Whether ``error`` says a process the call ran in, or called, went away (died, or its node was
    lost) rather than that the call itself failed: then asking again, once it restarted, is right."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    from scrit.actors.engines import EngineUnavailable

    if isinstance(error, (RayActorError, ActorUnavailableError, EngineUnavailable)):
        return True
    return isinstance(error, RayTaskError) and isinstance(getattr(error, "cause", None), EngineUnavailable)
