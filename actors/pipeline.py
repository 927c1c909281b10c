"""The self-play run behind ``scrit run``: actors, the producer loop, the trainer thread, evaluations.

The driver owns no model. It starts the named registry and replay-buffer actors, one solver actor
per configured solver, the critic actor (critique, correction by continuation, validation on one
copy of the evolving weights), an evaluator actor, and Ray Train in a background thread. Then it
loops: take problems -> solve -> pair (final answers only) -> critique + correct -> validate ->
put kept examples in the buffer, while the trainer samples the buffer, publishes versions and every
critic-following actor swaps to them between batches. Each published version is scored on held-out
arith problems by the evaluator, in parallel with the loop.

Everything the run produces lives under ``run_dir``: ``config.yaml``, ``buffer/`` (the durable
example log), ``versions/`` (checkpoints + ``registry.jsonl``), ``metrics.jsonl``,
``train_metrics.jsonl``, ``summary.json`` and ``report.md`` with plots.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from scrit import telemetry
from scrit.config import ScritConfig, config_to_dict, dump_yaml
from scrit.messages import Problem

BUFFER_NAME = "scrit-buffer"
REGISTRY_NAME = "scrit-registry"


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block is done, then raise KeyboardInterrupt (only the main thread can)."""
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
        holding = True
    except ValueError:  # not the main thread: signals are not ours to hold
        holding = False
    try:
        yield
    finally:
        if holding:
            signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists without --resume, or missing with it)."""


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    registry_file = run_dir / "versions" / "registry.jsonl"
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"--resume: run directory {run_dir} does not exist")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        hint = " (it holds a run: add --resume to continue it)" if registry_file.exists() else ""
        raise RunDirError(f"run directory {run_dir} is not empty{hint}; choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)


class ProblemSource:
    """Endless training problems. arith: the 'train' hash bucket only; gsm8k: the configured JSONL."""

    def __init__(self, cfg: ScritConfig, skip: int = 0) -> None:
        self.cfg = cfg
        self.pool = self._load_pool()
        self.position = skip % len(self.pool)

    def _load_pool(self) -> list[Problem]:
        domain = self.cfg.domain
        if domain.name == "arith":
            from scrit.domains.arith import render_solution
            from scrit.seed.corpus import generate_split_problem

            rng = random.Random(self.cfg.run.seed)
            pool = []
            for i in range(domain.num_problems):
                problem = generate_split_problem(rng, "train", domain.min_ops, domain.max_ops)
                pool.append(Problem(id=f"arith-train-{self.cfg.run.seed}-{i}", domain="arith",
                                    question=problem.text, answer=str(problem.answer),
                                    reference=render_solution(problem.correct_steps())))
            return pool
        from scrit.domains.gsm8k import load_gsm8k

        if not domain.data_path:
            raise ValueError("domain.data_path must point at a GSM8K JSONL file for domain gsm8k")
        pool = load_gsm8k(domain.data_path, limit=domain.num_problems)
        if not pool:
            raise ValueError(f"no problems in {domain.data_path}")
        return pool

    def take(self, n: int) -> list[Problem]:
        batch = []
        for _ in range(n):
            batch.append(self.pool[self.position])
            self.position = (self.position + 1) % len(self.pool)
        return batch


class MetricsLog:
    """Append-only JSON lines; each event gets ``t`` (seconds since the run started)."""

    def __init__(self, path: Path, started: float) -> None:
        self.path = path
        self.started = started
        self.lock = threading.Lock()

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"kind": kind, "t": round(time.time() - self.started, 2), **fields}
        with self.lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
        telemetry.record_event(event)  # Prometheus: pipeline counters, pass rate, eval scores
        return event


class Evaluator:
    """Scores critic versions on held-out items (direct mode: no reference), off the main loop."""

    def __init__(self, model: str, items_spec: dict[str, Any], style: str, batch_size: int,
                 max_new_tokens: int, torch_threads: int = 1, backend_options: dict[str, Any] | None = None) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        from scrit.backends import make_backend
        from scrit.evaluate import build_arith_evalset

        self.backend = make_backend(model, **(backend_options or {}))
        self.items = build_arith_evalset(n=items_spec["n"], seed=items_spec["seed"])
        self.style = style
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def metrics_url(self, run: str) -> str:
        """Start this actor's Prometheus exporter; generations count under role ``evaluator``."""
        if not isinstance(self.backend, telemetry.MeteredBackend):
            self.backend = telemetry.MeteredBackend(self.backend, "evaluator")
        return telemetry.start_exporter(run=run)

    def evaluate_version(self, version: int, uri: str) -> dict[str, Any]:
        from scrit.evaluate import evaluate

        if version != self.backend.version:
            self.backend.load_weights(version, uri)
        report = evaluate(self.backend, self.items, mode="direct", batch_size=self.batch_size,
                          max_new_tokens=self.max_new_tokens, style=self.style)
        return {"version": version, **report["average"]}


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
        self.trainer_error: BaseException | None = None
        self.trainer_done = threading.Event()
        self.evals: dict[int, dict[str, Any]] = {}
        self.pending_evals: dict[Any, int] = {}
        self.counts = {"problems": 0, "solutions": 0, "solutions_correct": 0, "critiques": 0,
                       "parsed": 0, "consistent": 0, "validated": 0, "kept": 0}

    # ----------------------------------------------------------------------------------- set-up
    def _start_actors(self) -> None:
        import ray

        from scrit.actors.registry import weight_registry_actor
        from scrit.actors.replay_buffer import buffer_options, replay_buffer_actor
        from scrit.actors.shells import critic_actor, solver_actor
        from scrit.backends import resolve_model_path, role_backend
        from scrit.prompts import resolve_prompt_style, use_chat_template

        cfg, res = self.cfg, self.cfg.resources
        self.seed_uri = resolve_model_path(cfg.critic.model)
        self.style = resolve_prompt_style(self.seed_uri, cfg.critic.prompt_style)
        # Instruct models get their chat template, in generation and (same flag) in training.
        self.chat_template = use_chat_template(self.seed_uri, self.style)
        actor = {"num_cpus": res.actor_num_cpus, "num_gpus": res.actor_num_gpus}
        vllm_options = msgspec.structs.asdict(cfg.vllm)
        critic_spec, backend_options = role_backend(
            self.seed_uri, cfg.critic.backend, device=cfg.critic.device, dtype=cfg.critic.dtype,
            batch_size=cfg.critic.batch_size, use_chat_template=self.chat_template, vllm_options=vllm_options)
        self.registry = weight_registry_actor(self.run_dir, self.seed_uri, num_cpus=0.05, name=REGISTRY_NAME)
        self.buffer = replay_buffer_actor(
            num_cpus=0.05, actor_options={"name": BUFFER_NAME},
            run_dir=str(self.run_dir), seed=cfg.run.seed, **buffer_options(cfg.buffer),
        )
        critic_sampling = {"max_new_tokens": cfg.critic.max_new_tokens, "temperature": cfg.critic.temperature}
        self.critic = critic_actor(
            critic_spec, **actor, domain=cfg.domain.name, style=self.style, backend_options=backend_options,
            sampling=critic_sampling, correction_sampling=critic_sampling, validation_sampling=critic_sampling,
            require_answer_match=cfg.validator.require_answer_match, registry=self.registry, follow_registry=True,
        )
        self.corrector = None
        if cfg.corrector.model:
            from scrit.actors.shells import corrector_actor

            corrector_model = resolve_model_path(cfg.corrector.model)
            corrector_spec, corrector_options = role_backend(
                corrector_model, cfg.corrector.backend, batch_size=cfg.critic.batch_size,
                use_chat_template=use_chat_template(corrector_model, self.style), vllm_options=vllm_options)
            self.corrector = corrector_actor(
                corrector_spec, **actor, domain=cfg.domain.name, style=self.style, backend_options=corrector_options,
                sampling={"max_new_tokens": cfg.corrector.max_new_tokens, "temperature": 0.0},
            )
        self.solvers = []
        for index, spec in enumerate(cfg.solvers):
            model = resolve_model_path(spec.model)
            solver_style = resolve_prompt_style(model, cfg.critic.prompt_style)
            solver_spec, solver_options = role_backend(
                model, spec.backend, device=spec.device, dtype=spec.dtype, batch_size=cfg.critic.batch_size,
                use_chat_template=use_chat_template(model, solver_style), vllm_options=vllm_options)
            self.solvers.append(solver_actor(
                solver_spec, **actor, domain=cfg.domain.name, name=f"solver{index}",
                samples_per_problem=spec.samples_per_problem, style=solver_style, backend_options=solver_options,
                sampling={"max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature,
                          "seed": cfg.run.seed * 1000 + index},
            ))
        self.evaluator = None
        if cfg.run.heldout_eval_items > 0 and cfg.domain.name == "arith":
            remote = ray.remote(Evaluator).options(num_cpus=res.actor_num_cpus, num_gpus=res.actor_num_gpus)
            self.evaluator = remote.remote(critic_spec, {"n": cfg.run.heldout_eval_items,
                                                         "seed": cfg.domain.heldout_seed},
                                           self.style, cfg.critic.batch_size, cfg.critic.max_new_tokens,
                                           backend_options=backend_options)
        ray.get([self.critic.ready.remote(), *[s.ready.remote() for s in self.solvers]])

    def _start_metrics(self) -> None:
        """Prometheus (``metrics.enabled``): the driver's exporter on ``metrics.port``, one exporter per
        actor process on a free port, all listed in ``RUN_DIR/prometheus_targets.json`` (file_sd)."""
        self.metrics_targets: dict[str, str] = {}
        if not self.cfg.metrics.enabled:
            return
        import ray

        run = self.cfg.run.name
        targets = {"driver": telemetry.start_exporter(port=self.cfg.metrics.port, run=run)}
        actors = {"critic": self.critic, "corrector": self.corrector, "buffer": self.buffer,
                  "evaluator": self.evaluator, **{f"solver{i}": s for i, s in enumerate(self.solvers)}}
        names = [name for name, actor in actors.items() if actor is not None]
        targets.update(zip(names, ray.get([actors[name].metrics_url.remote(run) for name in names])))
        self.metrics_lock = threading.Lock()
        self._write_metrics_targets(targets)
        threading.Thread(target=self._watch_metrics_targets, name="scrit-metrics-targets", daemon=True).start()

    def _watch_metrics_targets(self, poll_s: float = 1.0) -> None:
        """Until the trainer is done: pick up exporters that registered with the registry actor (the
        trainer's rank 0) within a second, not only between pipeline passes (which can take minutes)."""
        import ray

        while not self.trainer_done.wait(poll_s):
            try:
                if not ray.is_initialized():
                    return
                self._refresh_metrics_targets(None)
            except Exception:  # noqa: BLE001 - metrics must never stop the run; the loop refreshes too
                return

    def _refresh_metrics_targets(self, latest_version: int | None) -> None:
        """Add exporters that registered with the registry actor (the trainer's rank 0) to the targets."""
        if not getattr(self, "metrics_targets", None):
            return
        import ray

        if latest_version is not None:
            telemetry.set_version("published", latest_version)
        registered = ray.get(self.registry.metrics_targets.remote(), timeout=30)
        with self.metrics_lock:
            if any(self.metrics_targets.get(name) != url for name, url in registered.items()):
                self._write_metrics_targets({**self.metrics_targets, **registered})

    def _write_metrics_targets(self, targets: dict[str, str]) -> None:
        import sys

        path = telemetry.write_targets(self.run_dir / telemetry.TARGETS_FILE, targets)
        new = {name: url for name, url in targets.items() if self.metrics_targets.get(name) != url}
        self.metrics_targets = dict(targets)
        print(f"metrics ({path}): " + "  ".join(f"{name} {url}" for name, url in sorted(new.items())),
              file=sys.stderr, flush=True)

    def _start_endpoint(self) -> None:
        """The critic's HTTP endpoint (``serve.enabled``), following this run's versions as they appear.

        Its URL goes to ``RUN_DIR/endpoint.json`` and the live output. A failure to start (say, the
        port is taken) is reported and the run goes on: the endpoint is a window on the run, and
        losing it must not cost the training.
        """
        self.endpoint_url: str | None = None
        if not self.cfg.serve.enabled:
            return
        from scrit.serve import start_critic_endpoint

        try:
            self.endpoint_url = start_critic_endpoint(self.cfg, self.seed_uri, self.run_dir)
        except Exception as error:  # noqa: BLE001 - see the docstring
            self.on_event(self.metrics.write("endpoint_error", error=f"{type(error).__name__}: {error}"))
            return
        (self.run_dir / "endpoint.json").write_text(json.dumps({"url": self.endpoint_url}) + "\n")
        self.on_event(self.metrics.write("endpoint", url=self.endpoint_url))

    def _serve_until_interrupted(self) -> None:
        """``run.keep_serving``: the run is over but its endpoint stays up (final version) until Ctrl-C."""
        try:
            self.on_event({"kind": "serving", "url": self.endpoint_url})
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass

    def _start_trainer(self, start_version: int) -> threading.Thread:
        from scrit.train.trainer import run_training

        def target() -> None:
            try:
                run_training(self.cfg, self.run_dir, BUFFER_NAME, REGISTRY_NAME, start_version,
                             namespace=self.namespace, chat_template=self.chat_template)
            except BaseException as error:  # surfaced by the producer loop
                self.trainer_error = error
            finally:
                self.trainer_done.set()

        thread = threading.Thread(target=target, name="scrit-trainer", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------------------ evaluation
    def _load_previous_evals(self) -> None:
        from scrit.report import read_metrics

        for event in read_metrics(self.run_dir / "metrics.jsonl"):
            if event.get("kind") == "eval":
                self.evals[event["version"]] = event

    def _problems_done(self) -> int:
        """Problems taken by earlier passes of this run (a resumed run continues after them)."""
        from scrit.report import read_metrics

        return sum(e.get("problems", 0) for e in read_metrics(self.run_dir / "metrics.jsonl") if e.get("kind") == "batch")

    def _schedule_evals(self, latest_version: int) -> None:
        if self.evaluator is None:
            return
        import ray

        queued = set(self.pending_evals.values())
        for version in range(0, latest_version + 1):
            if version in self.evals or version in queued:
                continue
            if version not in (0, latest_version) and not self.cfg.run.eval_every_version:
                continue
            weights = ray.get(self.registry.get.remote(version))
            if weights is None:
                continue
            self.pending_evals[self.evaluator.evaluate_version.remote(version, weights.uri)] = version

    def _collect_evals(self, wait: bool = False) -> None:
        import ray

        while self.pending_evals:
            ready, _ = ray.wait(list(self.pending_evals), num_returns=1, timeout=None if wait else 0)
            if not ready:
                return
            version = self.pending_evals.pop(ready[0])
            scores = ray.get(ready[0])
            self.evals[version] = self.metrics.write("eval", **scores)
            self.on_event(self.evals[version])

    # ------------------------------------------------------------------------------- producing
    def _produce_once(self, problems: list[Problem]) -> dict[str, Any]:
        """One pipeline pass over ``problems``; returns counts for the metrics log."""
        import ray

        from scrit.actors.shells import pack, unpack
        from scrit.selfplay import (complete_critique, corrected_solution, get_domain, make_requests,
                                    reference_solution, select_for_critique, training_example,
                                    verdict_matches_label)

        cfg = self.cfg
        domain = get_domain(cfg.domain.name)
        by_id = {p.id: p for p in problems}
        solutions_by_problem: dict[str, list] = {p.id: [] for p in problems}
        for batch in ray.get([solver.solve.remote(pack(problems)) for solver in self.solvers]):
            for solution in unpack(batch):
                solutions_by_problem[solution.problem_id].append(solution)
        all_solutions = [s for group in solutions_by_problem.values() for s in group]
        if cfg.run.reference_as_correct:
            for problem in problems:
                reference = reference_solution(domain, problem)
                if reference is not None and reference.correct:
                    solutions_by_problem[problem.id].append(reference)
        selected = select_for_critique(solutions_by_problem, cfg.run.max_per_class, self.rng)
        requests = [r for pid, sols in selected.items()
                    for r in make_requests(by_id[pid], sols, self.rng, cfg.critic.mode, domain)]
        counts = {"problems": len(problems), "solutions": len(all_solutions),
                  "solutions_correct": sum(s.correct for s in all_solutions),
                  "critiques": len(requests), "parsed": 0, "consistent": 0, "validated": 0, "kept": 0}
        if not requests:
            return counts
        if self.corrector is None:
            critique_bytes, correction_bytes = ray.get(self.critic.critique_and_correct.remote(pack(requests)))
        else:
            critique_bytes = ray.get(self.critic.critique.remote(pack(requests)))
            correction_bytes = ray.get(self.corrector.correct.remote(pack(requests), critique_bytes))
        critiques, corrections = unpack(critique_bytes), unpack(correction_bytes)
        candidates = []
        for request, critique, correction in zip(requests, critiques, corrections):
            full = complete_critique(critique, correction)
            if not full.parsed:
                continue
            candidates.append((request, full, corrected_solution(domain, request.solution, full)))
        counts["parsed"] = len(candidates)
        if cfg.validator.require_verdict_match:
            candidates = [c for c in candidates if verdict_matches_label(c[1], c[0].solution)]
        counts["consistent"] = len(candidates)
        if not candidates:
            return counts
        if cfg.validator.enabled:
            validations = unpack(ray.get(self.critic.validate.remote(
                pack([request.problem for request, _, _ in candidates]), [text for _, _, text in candidates])))
            kept = [c for c, v in zip(candidates, validations) if v.passed]
        else:
            kept = candidates
        counts["validated"] = len(kept)
        examples = [training_example(request.problem, request.solution, full.raw_text, full.version, self.style)
                    for request, full, _ in kept]
        counts["kept"] = ray.get(self.buffer.put.remote(examples)) if examples else 0
        counts["critic_version"] = max(full.version for _, full, _ in candidates)
        return counts

    # ------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        import ray

        prepare_run_dir(self.run_dir, self.resume)
        (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.started)
        self.rng = random.Random(self.cfg.run.seed)
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, namespace=self.namespace,
                     log_to_driver=False, include_dashboard=False)
        else:
            self.namespace = ray.get_runtime_context().namespace
        interrupted = False
        try:
            self._start_actors()
            self._start_metrics()
            self._start_endpoint()
            latest = ray.get(self.registry.latest.remote())
            if self.resume:
                self._load_previous_evals()
            start_version = latest.version
            self.source = ProblemSource(self.cfg, skip=self._problems_done())
            self._schedule_evals(latest.version)
            self._start_trainer(start_version)
            self._loop()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            summary = self._finish(interrupted, started_ray)
        return summary

    def _loop(self) -> None:
        import ray

        cfg = self.cfg
        deadline = self.started + cfg.run.max_wall_seconds
        while True:
            latest = ray.get(self.registry.latest.remote())
            self._refresh_metrics_targets(latest.version)
            self._schedule_evals(latest.version)
            self._collect_evals()
            if latest.version >= cfg.run.versions:
                break
            if self.trainer_done.is_set():
                if self.trainer_error is not None:
                    raise RuntimeError(f"the trainer failed: {self.trainer_error}") from self.trainer_error
                break
            if time.time() > deadline:
                self.metrics.write("stop", reason="max_wall_seconds")
                break
            room = ray.get(self.buffer.wait_for_room.remote(timeout=2.0))
            if room <= 0:
                continue
            counts = self._produce_once(self.source.take(cfg.run.problems_per_batch))
            for key in self.counts:
                self.counts[key] += counts.get(key, 0)
            stats = ray.get(self.buffer.stats.remote())
            event = self.metrics.write(
                "batch", **counts,
                pass_rate=(counts["validated"] / counts["consistent"]) if counts["consistent"] else None,
                buffer_size=stats["size"], buffer_balance=stats["balance"],
                staleness_mean=stats["staleness_mean"], latest_version=latest.version,
            )
            self.on_event(event)

    def _finish(self, interrupted: bool, started_ray: bool) -> dict[str, Any]:
        import ray

        summary: dict[str, Any] = {}
        try:
            if hasattr(self, "registry"):
                ray.get(self.registry.request_stop.remote())
                self.trainer_done.wait(timeout=120)
                latest = ray.get(self.registry.latest.remote())
                if not interrupted:
                    self._schedule_evals(latest.version)
                    self._collect_evals(wait=True)
                with _interrupts_deferred():  # a Ctrl-C now waits until the report and summary are written
                    summary = self._summary(latest, interrupted)
                if getattr(self, "endpoint_url", None) and self.cfg.run.keep_serving and not interrupted:
                    self._serve_until_interrupted()
        except KeyboardInterrupt:
            if not summary:  # Ctrl-C before the run's outputs were written: the caller sees it
                raise
            # Ctrl-C once summary.json exists (e.g. the moment --keep-serving begins): the run is complete.
        finally:
            if getattr(self, "endpoint_url", None):
                from scrit.serve import stop_critic_endpoint

                stop_critic_endpoint()  # also when joining a cluster, where ray.shutdown() would leave it up
            if started_ray:
                ray.shutdown()
        return summary

    def _summary(self, latest: Any, interrupted: bool) -> dict[str, Any]:
        from scrit.report import write_report

        from scrit.report import read_metrics

        train_events = read_metrics(self.run_dir / "train_metrics.jsonl")
        summary = {
            "run_name": self.cfg.run.name,
            "versions": latest.version,
            "seed_model": self.seed_uri,
            "final_model": latest.uri,
            "wall_seconds": round(time.time() - self.started, 1),
            "interrupted": interrupted,
            "resumed": self.resume,
            "validator_enabled": self.cfg.validator.enabled,
            "require_answer_match": self.cfg.validator.require_answer_match,
            "require_verdict_match": self.cfg.validator.require_verdict_match,
            "endpoint": getattr(self, "endpoint_url", None),
            "counts": self.counts,
            "train": train_events,
            "evals": [self.evals[v] for v in sorted(self.evals)],
            "config": config_to_dict(self.cfg, redact=True),
        }
        # summary.json marks a finished run (scripts and tests wait for it): written last, and whole.
        write_report(self.run_dir, summary)
        staging = self.run_dir / "summary.json.tmp"
        staging.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(staging, self.run_dir / "summary.json")
        return summary
