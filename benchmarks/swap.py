"""Hot swap under load: N concurrent clients hammer /v1/critique while new critic versions are published.

    .venv/bin/python benchmarks/swap.py [--clients 32] [--swaps 3] [--replicas 1] [--duration 40] [--control]

What it does (all on this machine, Ray started here with ``num_cpus=2``):

1. writes ``--swaps`` stand-in versions (the seed's weights plus 1% Gaussian noise, saved like the
   trainer saves) into a temporary run directory;
2. starts the critic endpoint (``start_critic_endpoint``) following that run, ``--replicas`` replicas;
3. warms up until every replica has answered (responses carry ``x-critic-replica``), then runs two
   phases of ``--duration`` seconds each with the clients busy all along: a **no-swap** phase, then a
   **swap** phase during which a publisher appends the versions to ``versions/registry.jsonl``
   through ``WeightRegistry.publish``, evenly spaced;
4. prints one table.

Swap latency is per published version, from ``publish()`` returning to *every* replica serving it:
each response carries its version, its replica and ``x-critic-version-since`` (when that replica
started serving that version), so for every replica the moment it switched to the version (or a
later one) is known exactly; the latency is the slowest replica's. The set of replicas is the one
observed during warm-up and must match ``--replicas``. A second figure, publish -> first *response*
on the new version from every replica, adds the time the first batch on it takes.

Each request is a held-out arith solution drawn uniformly at random (per-client seeded), so both
phases get the same mix of short and long critiques. Requests count in the phase in which they
complete; failures are non-200 answers, transport errors, and answers whose body and header disagree
on the version. "version regressions" counts responses older than an earlier response the same
client got from the same replica (0 expected). Throughput on a shared machine moves with whatever
else runs there, so the table also gives the replicas' own CPU time per generated token (psutil on
the replica processes), which does not; ``--control`` runs the same two phases without publishing
anything, to see how much the two phases differ by themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Result:
    client: int
    started: float
    finished: float
    ok: bool
    status: int | None = None
    version: int | None = None
    replica: str | None = None
    since: float | None = None
    problem: str | None = None
    tokens: int = 0  # completion tokens the critic generated


@dataclass
class State:
    results: list[Result] = field(default_factory=list)
    stop: bool = False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def payloads(n: int = 64) -> list[dict]:
    """Direct critiques of held-out arith solutions (half with one wrong step), as steps lists."""
    from scrit.evaluate import build_arith_evalset

    return [{"problem": item.problem, "steps": list(item.steps)} for item in build_arith_evalset(n=n)]


async def client_loop(index: int, url: str, items: list[dict], state: State, http) -> None:
    import httpx

    rng = random.Random(index)  # uniform draws: both phases see the same mix of short and long items
    while not state.stop:
        body = rng.choice(items)
        started = time.time()
        try:
            response = await http.post(f"{url}/v1/critique", json=body)
        except httpx.HTTPError as error:
            state.results.append(Result(index, started, time.time(), False, problem=f"{type(error).__name__}: {error}"))
            continue
        finished = time.time()
        header = response.headers.get("x-critic-version")
        result = Result(index, started, finished, response.status_code == 200, response.status_code,
                        int(header) if header is not None else None, response.headers.get("x-critic-replica"),
                        float(response.headers.get("x-critic-version-since") or 0) or None)
        if result.ok:
            try:
                payload = response.json()
                body_version = payload["critic_version"]
                result.tokens = int(payload["usage"]["completion_tokens"])
            except (ValueError, KeyError, TypeError):
                body_version = None
            if body_version != result.version:
                result.ok, result.problem = False, f"header version {header} but body {body_version}"
        else:
            result.problem = response.text[:200]
        state.results.append(result)


async def replica_pids(http, url: str, replicas: set[str]) -> dict[str, int]:
    """Process ids of the replicas (all local here), from /healthz answers (routed to any replica)."""
    pids: dict[str, int] = {}
    for _ in range(200):
        health = (await http.get(f"{url}/healthz")).json()
        pids[health["replica"]] = health["pid"]
        if set(pids) >= replicas:
            return pids
    raise RuntimeError(f"/healthz reached only replicas {sorted(pids)}")


def replica_cpu(pids: dict[str, int]) -> float:
    """CPU seconds (user + system) used so far by all replica processes together."""
    import psutil

    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids.values())


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def run_benchmark(args: argparse.Namespace) -> dict:
    import httpx
    import ray

    from scrit.actors.registry import WeightRegistry
    from scrit.config import default_config
    from scrit.serve.app import start_critic_endpoint, stop_critic_endpoint
    from scrit.serve.testing import publish, save_perturbed

    run_dir = Path(tempfile.mkdtemp(prefix="scrit-swap-bench-"))
    registry = WeightRegistry(run_dir, "seed")
    t0 = time.time()
    checkpoints = [save_perturbed("seed", run_dir / "versions" / f"v{v:04d}", seed=v) for v in range(1, args.swaps + 1)]
    print(f"wrote {len(checkpoints)} versions in {time.time() - t0:.1f}s", file=sys.stderr)

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    cfg = default_config()
    port = args.port or free_port()
    url = start_critic_endpoint(cfg, "seed", run_dir, port=port, replicas=args.replicas)
    print(f"endpoint up at {url} after {time.time() - t0:.1f}s", file=sys.stderr)
    items = payloads()
    state = State()
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    pending: set = set()
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as http:
            tasks = [asyncio.create_task(client_loop(i, url, items, state, http)) for i in range(args.clients)]
            # warm-up: until every replica answered (and at least 5 s)
            warm_start = time.time()
            while True:
                await asyncio.sleep(1.0)
                seen = {r.replica for r in state.results if r.replica}
                if len(seen) >= args.replicas and time.time() - warm_start >= 5:
                    break
                if time.time() - warm_start > 180:
                    raise RuntimeError(f"only replicas {sorted(seen)} answered during warm-up")
            replicas = {r.replica for r in state.results if r.replica}
            if len(replicas) != args.replicas:
                raise RuntimeError(f"expected {args.replicas} replicas, saw {sorted(replicas)}")
            print(f"warm-up done after {time.time() - warm_start:.1f}s; replicas {sorted(replicas)}", file=sys.stderr)
            pids = await replica_pids(http, url, replicas)

            cpu_0 = replica_cpu(pids)
            phase_a = (time.time(), time.time() + args.duration)
            await asyncio.sleep(args.duration)
            load_a = os.getloadavg()[0]
            cpu_1 = replica_cpu(pids)
            phase_b_start = time.time()
            phase_b = (phase_b_start, phase_b_start + args.duration)
            published: dict[int, float] = {}
            for k, path in enumerate(checkpoints if not args.control else [], start=1):
                await asyncio.sleep(max(0.0, phase_b_start + k * args.duration / (args.swaps + 1) - time.time()))
                await asyncio.to_thread(publish, registry, k, path)
                published[k] = time.time()
                print(f"published v{k} at +{published[k] - phase_b_start:.1f}s", file=sys.stderr)
            await asyncio.sleep(max(0.0, phase_b[1] - time.time()))
            load_b = os.getloadavg()[0]
            cpu_2 = replica_cpu(pids)
            state.stop = True
            drain_start = time.time()
            done, pending = await asyncio.wait(tasks, timeout=args.drain)
            for task in pending:  # requests still queued: abandoned (not failures; the phases are over)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            print(f"drained in {time.time() - drain_start:.1f}s; {len(pending)} requests abandoned", file=sys.stderr)
            final_by_replica: dict[str, dict] = {}
            for _ in range(200):  # /healthz is routed to any replica: ask until each has answered
                health = httpx.get(f"{url}/healthz", timeout=60).json()
                final_by_replica[health["replica"]] = health
                if set(final_by_replica) >= replicas:
                    break
            final = list(final_by_replica.values())
    finally:
        stop_critic_endpoint()
        ray.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)

    results = state.results

    def phase(window: tuple[float, float]) -> dict:
        inside = [r for r in results if window[0] <= r.finished < window[1]]
        ok = [r for r in inside if r.ok]
        latencies = [r.finished - r.started for r in ok]
        return {"served": len(ok), "failed": len(inside) - len(ok), "throughput": len(ok) / (window[1] - window[0]),
                "tokens": sum(r.tokens for r in ok), "tokens_per_s": sum(r.tokens for r in ok) / (window[1] - window[0]),
                "latency_p50": percentile(latencies, 0.5), "latency_p99": percentile(latencies, 0.99),
                "versions": sorted({r.version for r in ok if r.version is not None})}

    switched, first_response = {}, {}
    for version, at in published.items():
        per_replica_switch, per_replica_first = [], []
        for replica in replicas:
            mine = [r for r in results if r.ok and r.replica == replica and r.version is not None and r.version >= version]
            if not mine:
                per_replica_switch = per_replica_first = None
                break
            per_replica_switch.append(min(r.since for r in mine if r.since) - at)
            per_replica_first.append(min(r.finished for r in mine) - at)
        switched[version] = max(per_replica_switch) if per_replica_switch else None
        first_response[version] = max(per_replica_first) if per_replica_first else None

    regressions = 0
    last: dict[tuple[int, str | None], int] = {}
    for r in sorted((r for r in results if r.ok), key=lambda r: r.finished):
        key = (r.client, r.replica)
        if r.version < last.get(key, -1):
            regressions += 1
        last[key] = max(last.get(key, -1), r.version)
    failures = [r for r in results if not r.ok]
    summary = {
        "control": args.control, "clients": args.clients, "replicas": args.replicas, "num_cpus": args.num_cpus,
        "replica_num_cpus": cfg.resources.serve_replica_num_cpus,
        "max_batch_size": cfg.serve.max_batch_size, "duration_s": args.duration, "swaps": args.swaps,
        "no_swap": {**phase(phase_a), "load_avg_1m": load_a, "replica_cpu_s": cpu_1 - cpu_0},
        "swap": {**phase(phase_b), "load_avg_1m": load_b, "replica_cpu_s": cpu_2 - cpu_1},
        "abandoned_at_end": len(pending),
        "total_served": sum(r.ok for r in results), "total_failed": len(failures),
        "served_in_warm_up": sum(r.ok for r in results if r.finished < phase_a[0]),
        "served_in_drain": sum(r.ok for r in results if r.finished >= phase_b[1]),
        "failure_examples": [r.problem for r in failures[:5]],
        "swap_latency_s": switched, "first_response_latency_s": first_response,
        "version_regressions": regressions,
        "timeline_5s": [sum(1 for r in results if r.ok and phase_a[0] + 5 * k <= r.finished < phase_a[0] + 5 * (k + 1))
                        for k in range(int(2 * args.duration // 5))],
        "published_at_s": {k: round(at - phase_a[0], 2) for k, at in published.items()},
        "final_versions": sorted({h["critic_version"] for h in final}),
        "load_s": [swap["load_s"] for h in final for swap in h.get("recent_swaps", [])],
        "replica_ids": sorted(replicas),
    }
    return summary


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    a, b = summary["no_swap"], summary["swap"]
    switched = [v for v in summary["swap_latency_s"].values() if v is not None]
    first = [v for v in summary["first_response_latency_s"].values() if v is not None]
    table = Table(title=f"Hot swap under load: {summary['clients']} clients, {summary['replicas']} replica(s), "
                        f"{summary['swaps']} swaps, 2 x {summary['duration_s']:.0f} s")
    table.caption = (f"{os.cpu_count()} CPU cores, ray.init(num_cpus={summary['num_cpus']}), "
                     f"{summary['replicas']} x {summary['replica_num_cpus']} CPU replicas, seed critic, "
                     f"max_batch_size {summary['max_batch_size']}")
    table.add_column("metric")
    table.add_column("no-swap phase", justify="right")
    table.add_column("swap phase" if not summary.get("control") else "2nd phase (control: no swaps)",
                     justify="right")
    table.add_row("requests served", str(a["served"]), str(b["served"]))
    table.add_row("failed requests", str(a["failed"]), str(b["failed"]))
    table.add_row("throughput (req/s)", fmt(a["throughput"]), fmt(b["throughput"]))
    table.add_row("request latency p50 / p99 (s)", f"{fmt(a['latency_p50'])} / {fmt(a['latency_p99'])}",
                  f"{fmt(b['latency_p50'])} / {fmt(b['latency_p99'])}")
    table.add_row("generated tokens/s (critique tokens per request)",
                  f"{fmt(a['tokens_per_s'], 0)} ({fmt(a['tokens'] / a['served'] if a['served'] else None, 0)})",
                  f"{fmt(b['tokens_per_s'], 0)} ({fmt(b['tokens'] / b['served'] if b['served'] else None, 0)})")
    table.add_row("replica CPU ms per generated token",
                  fmt(1000 * a["replica_cpu_s"] / a["tokens"] if a["tokens"] else None),
                  fmt(1000 * b["replica_cpu_s"] / b["tokens"] if b["tokens"] else None))
    table.add_row("machine load average (1 min) at phase end", fmt(a["load_avg_1m"], 1), fmt(b["load_avg_1m"], 1))
    table.add_row("versions served", ", ".join(map(str, a["versions"])), ", ".join(map(str, b["versions"])))
    table.add_row("swap latency p50 / p99 (s): publish -> every replica switched", "",
                  f"{fmt(percentile(switched, 0.5))} / {fmt(percentile(switched, 0.99))}")
    table.add_row("  per version", "", ", ".join(f"v{k}: {fmt(v)}" for k, v in summary["swap_latency_s"].items()))
    loads = summary["load_s"]
    table.add_row("verify + load + warm-up per swap and replica, mean / max (s)", "",
                  f"{fmt(statistics.mean(loads) if loads else None)} / {fmt(max(loads) if loads else None)}")
    table.add_row("publish -> first response on it from every replica p50 / p99 (s)", "",
                  f"{fmt(percentile(first, 0.5))} / {fmt(percentile(first, 0.99))}")
    table.add_row("version regressions (same client, same replica)", "", str(summary["version_regressions"]))
    table.add_row("all requests (incl. warm-up, drain): served / failed / abandoned at the end", "",
                  f"{summary['total_served']} / {summary['total_failed']} / {summary['abandoned_at_end']}")
    table.add_row("final version on every replica", "", ", ".join(map(str, summary["final_versions"])))
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per phase (no-swap, swap)")
    parser.add_argument("--drain", type=float, default=30.0,
                        help="seconds to let in-flight requests finish after the phases (the rest are abandoned)")
    parser.add_argument("--control", action="store_true",
                        help="publish nothing in the second phase: measures the drift between two no-swap phases")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs for ray.init")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw summary here")
    args = parser.parse_args()
    if args.swaps < 1 or args.clients < 1 or args.replicas < 1:
        parser.error("--swaps, --clients and --replicas must be >= 1")
    started = time.time()
    summary = asyncio.run(run_benchmark(args))
    summary["wall_s"] = round(time.time() - started, 1)
    print_table(summary)
    print(f"wall time {summary['wall_s']} s; failures: {summary['failure_examples'] or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
