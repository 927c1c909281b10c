"""The producer pipeline measured side by side (issue: streaming pipeline). Ratios, never a lone time.

    .venv/bin/python benchmarks/pipeline.py p1    [--backend hf|vllm] [--batches 4] [--in-flight 3]
    .venv/bin/python benchmarks/pipeline.py p4    [--backend ...] [--versions 4] [--seconds 420] [--steps-per-version 30]
    .venv/bin/python benchmarks/pipeline.py sync  [--backend ...] [--seconds 300]

* **p1, pipeline efficiency**: critiques per second of the critic stage fed through the actor pipeline
  (problem and solution batches in the object store, ``--in-flight`` batches at once, the critic role
  actor calling its engine actor, results back as msgpack) vs the same role on the same engine in
  this process on the same batches (same threads, same sampling). The solver outputs are made once
  beforehand and the other stages stay idle, so the ratio is what the pipeline's plumbing costs
  (serialization, object store, scheduling, gaps between batches); with every stage busy on 2 cores
  they would only take CPU from each other.
* **p4, overlap**: critic versions published per minute by the same run with ``buffer.max_staleness``
  1 (generation and training overlap) vs 0 (the paper's synchronous rounds: after each version the
  trainer waits for data made by it), from the registry's publish times (first to last version:
  start-up excluded).
* **sync**: kept examples per minute of the default run with ``run.batches_in_flight: 1`` (the old
  synchronous loop, one stage at a time) vs the default, from the first to the last batch report.

Runs happen one after the other in this process (Ray started here with ``num_cpus=2``); each prints
its numbers and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def backend_overrides(backend: str) -> list[str]:
    return [f"critic.backend={backend}", f"solvers[0].backend={backend}"]


def p1(args: argparse.Namespace) -> None:
    import ray
    import torch
    from rich.console import Console

    from scrit.actors.engines import engine_actor_names, start_engines
    from scrit.actors.roles import make_role
    from scrit.actors.shells import start_role
    from scrit.config import load_config
    from scrit.factory import open_engine, plan_run
    from scrit.messages import ProblemBatch, encode
    from scrit.problems import ProblemSource

    console = Console()
    torch.set_num_threads(1)
    cfg = load_config(None, [*backend_overrides(args.backend), "critic.device=cpu", "solvers[0].device=cpu"])
    plan = plan_run(cfg)
    critic_spec, solver_spec = plan.role("critic"), plan.of_kind("solver")[0]
    # The solutions are made once, by the plan's solver role on an in-process engine.
    solver_engine = open_engine(solver_spec.engine)
    solver = make_role(solver_spec, solver_engine)
    source = ProblemSource(cfg)
    batches = [ProblemBatch(batch_id=i, problems=source.take(cfg.run.problems_per_batch)) for i in range(args.batches)]
    parts = [solver.solve_batch(batch) for batch in batches]
    solver_engine.close()
    engine = open_engine(critic_spec.engine)  # the critic's engine, as an engine actor builds it
    critic = make_role(critic_spec, engine)

    def raw() -> tuple[int, float]:
        started = time.perf_counter()
        critiques = sum(len(critic.critique_batch(b, [p]).critiques) for b, p in zip(batches, parts))
        return critiques, time.perf_counter() - started

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    engines = start_engines(critic_spec.engine, None)
    actor = start_role(critic_spec, engine_actor_names(critic_spec.engine), None)
    ray.get([actor.ready.remote(), *[e.ready.remote() for e in engines]])
    refs = [(ray.put(encode(b)), ray.put(encode(p))) for b, p in zip(batches, parts)]

    def pipelined() -> tuple[int, float]:
        from scrit.messages import CritiqueBatch, decode

        started = time.perf_counter()
        pending, done = list(refs), 0
        in_flight: list[Any] = []
        while pending or in_flight:
            while pending and len(in_flight) < args.in_flight:
                problems, solutions = pending.pop(0)
                in_flight.append(actor.stage.remote(problems, solutions))
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            done += len(decode(ray.get(ready[0]), CritiqueBatch).critiques)
        return done, time.perf_counter() - started

    rows = []
    for round_ in range(args.rounds):  # alternate, so drift on a shared machine hits both sides
        for name, run in (("raw engine, one process", raw), ("actor pipeline", pipelined)):
            n, seconds = run()
            rows.append((round_, name, n, seconds, n / seconds))
            console.print(f"round {round_ + 1} {name}: {n} critiques in {seconds:.1f} s = {n / seconds:.2f}/s")
    ray.shutdown()
    raw_rate = sum(r[4] for r in rows if r[1].startswith("raw")) / args.rounds
    pipe_rate = sum(r[4] for r in rows if r[1].startswith("actor")) / args.rounds
    console.print(f"[bold]P1 pipeline efficiency ({args.backend}): {pipe_rate:.2f} / {raw_rate:.2f} critiques/s "
                  f"= {pipe_rate / raw_rate:.2f}x[/] (goal >= 0.9x)")


def run_once(overrides: list[str], label: str) -> dict[str, Any]:
    """One ``scrit run`` in this process (its own Ray); returns the summary plus the event logs."""
    from scrit.actors.run import SelfPlayRun
    from scrit.config import load_config
    from scrit.rundir import read_events

    cfg = load_config(None, ["serve.enabled=false", "metrics.enabled=false", "run.heldout_eval_items=0", *overrides])
    run_dir = Path(tempfile.mkdtemp(prefix=f"scrit-bench-{label}-"))
    summary = SelfPlayRun(cfg, run_dir / "run").run()
    summary["events"] = read_events(run_dir / "run" / "metrics.jsonl")
    summary["registry"] = [json.loads(line) for line in (run_dir / "run" / "versions" / "registry.jsonl")
                           .read_text().splitlines()] if (run_dir / "run" / "versions" / "registry.jsonl").is_file() else []
    return summary


def p4(args: argparse.Namespace) -> None:
    from rich.console import Console

    console = Console()
    rates = {}
    for staleness in (1, 0):
        summary = run_once([*backend_overrides(args.backend), f"run.versions={args.versions}",
                            f"run.max_wall_seconds={args.seconds}", f"buffer.max_staleness={staleness}",
                            f"train.steps_per_version={args.steps_per_version}"],
                           f"staleness{staleness}")
        times = [r["created_at"] for r in summary["registry"]]
        rate = 60 * (len(times) - 1) / (times[-1] - times[0]) if len(times) >= 2 else 0.0
        rates[staleness] = rate
        console.print(f"max_staleness {staleness}: {len(times)} versions, {rate:.2f} versions/min (v1 -> v{len(times)}), "
                      f"status {summary['status']}, {summary['wall_seconds']:.0f} s")
    ratio = rates[1] / rates[0] if rates[0] else float("inf")
    console.print(f"[bold]P4 overlap ({args.backend}): {rates[1]:.2f} / {rates[0]:.2f} versions/min = {ratio:.2f}x[/] "
                  "(goal >= 1.5x)")


def sync(args: argparse.Namespace) -> None:
    from rich.console import Console

    console = Console()
    rates = {}
    for in_flight in (1, 3):
        summary = run_once([*backend_overrides(args.backend), "run.versions=1000",
                            f"run.max_wall_seconds={args.seconds}", f"run.batches_in_flight={in_flight}"],
                           f"inflight{in_flight}")
        batches = [e for e in summary["events"] if e["kind"] == "batch"]
        span = batches[-1]["t"] - (batches[0]["t"] - batches[0]["latency_s"]) if batches else 0.0
        kept = sum(e["kept"] for e in batches)
        rates[in_flight] = 60 * kept / span if span else 0.0
        console.print(f"batches_in_flight {in_flight}: {len(batches)} batches, {kept} kept in {span:.0f} s = "
                      f"{rates[in_flight]:.1f} kept/min")
    console.print(f"[bold]streaming vs synchronous ({args.backend}): {rates[3]:.1f} / {rates[1]:.1f} kept/min = "
                  f"{rates[3] / rates[1]:.2f}x[/]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("p1", "p4", "sync"))
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--batches", type=int, default=4, help="p1: batches of run.problems_per_batch problems")
    parser.add_argument("--in-flight", type=int, default=3, help="p1: batches in the pipeline at once")
    parser.add_argument("--rounds", type=int, default=2, help="p1: alternating rounds of both sides")
    parser.add_argument("--versions", type=int, default=4, help="p4: versions each run publishes")
    parser.add_argument("--seconds", type=float, default=420.0, help="p4/sync: wall-time limit of each run")
    parser.add_argument("--steps-per-version", type=int, default=30,
                        help="p4: train.steps_per_version of both runs (the default run's 70 make each run ~15 min)")
    args = parser.parse_args()
    {"p1": p1, "p4": p4, "sync": sync}[args.which](args)


if __name__ == "__main__":
    main()
