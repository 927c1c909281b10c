"""The critic endpoint as an inference server: streamed time to first token, requests/s and latency at 1, 8
and 32 concurrent clients, steady and while versions are swapped; before vs after, side by side in one run.

    .venv/bin/python benchmarks/serve.py [--baseline REF ...] [--levels 1,8,32] [--seconds 30] [--json FILE]

For each code version, one after the other on this machine (each ``--baseline REF`` first, its files
copied by ``git archive`` into a temporary folder put first on ``PYTHONPATH``, same interpreter and
packages; then this checkout), the same server: ``scrit serve --model seed --follow RUN_DIR --set
critic.backend=vllm`` in its own process group with its own Ray (``RAY_ADDRESS=local``), fed and measured
from this process:

* **the workload**: every request is a streamed greedy chat completion (``stream: true``) of a direct
  critique prompt of a held-out arith item (the seed's own prompt format, up to ``critic.max_new_tokens``
  512 tokens, stopping where a new prompt would begin: 150 to 400 tokens), each client drawing items
  uniformly with its own seeded generator, so every code version gets the same mix of short and long;
* **a level** of c clients: each sends a request, reads its stream to the end, sends the next; after a
  3 s warm-up, the requests that *complete* within ``--seconds`` count; then no new request is sent and
  the ones in flight finish (none is abandoned, so nothing carries over into the next level);
* per level: requests/s, latency (request sent -> last byte) p50/p99, **time to first token** (request
  sent -> first event with text) p50/p99, completion tokens/s (the usage of each stream), failures
  (not 200, an error event, a missing ``[DONE]``, an event whose ``critic_version`` differs from the
  ``x-critic-version`` header) and version regressions (a client answered by an older version than it
  already saw);
* **while swapping**: each level again while a new version is published every ``--swap-every`` seconds
  (stand-in checkpoints: the seed's weights plus noise, published through ``WeightRegistry`` exactly as
  the trainer publishes; the replica follows the run directory and swaps in place).

Before = the code at ``REF`` (default ``7dad669``, the commit before vLLM's step loop: one
``LLM.generate`` per ``@serve.batch`` batch, and ``stream: true`` generating the whole text before its
first event). The server, clients and load generator share this machine's cores: compare the columns of
one run, whose ratios are fair, rather than absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swap import percentile  # benchmarks/swap.py's, so both report latency percentiles the same way

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's scrit (stand-in versions, prompts), not an installed one
    sys.path.insert(0, str(ROOT))
CRITIQUE_STOPS = ["\nProblem:", "\nCritique the student"]  # scrit.serve.schema.CRITIQUE_STOPS
WARM_UP_S = 3.0


@dataclass
class Request:
    """One streamed request as the client saw it (times from time.perf_counter)."""

    client: int
    started: float
    finished: float
    first_token: float | None = None
    ok: bool = False
    version: int | None = None
    tokens: int = 0
    problem: str = ""


@dataclass
class Level:
    clients: int
    swapping: bool
    window: tuple[float, float] = (0.0, 0.0)
    requests: list[Request] = field(default_factory=list)
    published: int = 0  # versions published in the window


def critique_prompts(n: int = 64) -> list[str]:
    """Direct critique prompts of held-out arith items (half with one wrong step), as the seed reads them."""
    from scrit.evaluate import build_arith_evalset, build_prompts

    return build_prompts(build_arith_evalset(n=n), "direct")


async def stream_one(http: Any, url: str, client: int, prompt: str, max_tokens: int) -> Request:
    """Send one streamed chat completion and read it to the end."""
    import httpx

    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens,
            "stop": CRITIQUE_STOPS, "stream": True, "stream_options": {"include_usage": True}}
    request = Request(client, time.perf_counter(), 0.0)
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                request.problem = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return request
            request.version = int(response.headers["x-critic-version"])
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    request.problem = f"error event: {event['error'].get('message')}"
                    return request
                if event.get("critic_version") != request.version:
                    request.problem = f"event version {event.get('critic_version')} under header {request.version}"
                    return request
                choices = event.get("choices") or []
                if request.first_token is None and choices and choices[0].get("delta", {}).get("content"):
                    request.first_token = time.perf_counter() - request.started
                if event.get("usage"):
                    request.tokens = int(event["usage"]["completion_tokens"])
            request.ok = done and request.tokens > 0
            if not request.ok:
                request.problem = "stream ended without usage or [DONE]"
    except httpx.HTTPError as error:
        request.problem = f"{type(error).__name__}: {error}"
    finally:
        request.finished = time.perf_counter()
    return request


async def run_level(url: str, level: Level, seconds: float, prompts: list[str], max_tokens: int,
                    publish: Any = None, swap_every: float = 5.0) -> None:
    """``level.clients`` clients for warm-up + ``seconds``, then the requests in flight finish; with
    ``publish`` (a blocking callable) a version is published every ``swap_every`` seconds of the window."""
    import httpx

    stop_sending = asyncio.Event()

    async def client(index: int, http: Any) -> None:
        rng = random.Random(index)
        while not stop_sending.is_set():
            level.requests.append(await stream_one(http, url, index, rng.choice(prompts), max_tokens))

    limits = httpx.Limits(max_connections=level.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        tasks = [asyncio.create_task(client(i, http)) for i in range(level.clients)]
        await asyncio.sleep(WARM_UP_S)
        start = time.perf_counter()
        level.window = (start, start + seconds)
        if publish is not None:
            while (next_at := start + (level.published + 1) * swap_every) < level.window[1]:
                await asyncio.sleep(next_at - time.perf_counter())
                await asyncio.to_thread(publish)
                level.published += 1
        await asyncio.sleep(max(0.0, level.window[1] - time.perf_counter()))
        stop_sending.set()
        await asyncio.gather(*tasks)


def summarize(level: Level) -> dict[str, Any]:
    inside = [r for r in level.requests if level.window[0] <= r.finished < level.window[1]]
    ok = [r for r in inside if r.ok]
    span = level.window[1] - level.window[0]
    latencies = [r.finished - r.started for r in ok]
    first = [r.first_token for r in ok if r.first_token is not None]
    regressions, seen = 0, {}
    for r in sorted((r for r in level.requests if r.ok), key=lambda r: r.finished):
        regressions += r.version < seen.get(r.client, -1)
        seen[r.client] = max(seen.get(r.client, -1), r.version)
    failed = [r for r in level.requests if not r.ok]
    return {
        "clients": level.clients, "swapping": level.swapping, "published": level.published,
        "requests": len(ok), "requests_per_s": len(ok) / span, "tokens_per_s": sum(r.tokens for r in ok) / span,
        "latency_p50": percentile(latencies, 0.5), "latency_p99": percentile(latencies, 0.99),
        "ttft_p50": percentile(first, 0.5), "ttft_p99": percentile(first, 0.99),
        "ttft_share_p50": percentile([r.first_token / (r.finished - r.started) for r in ok if r.first_token], 0.5),
        "failed": len(failed), "failure_examples": [r.problem for r in failed[:3]],
        "version_regressions": regressions, "all_requests": len(level.requests),
        "versions": sorted({r.version for r in level.requests if r.version is not None}),
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(label: str, python_path: str | None, run_dir: Path, args: argparse.Namespace) -> Iterator[str]:
    """``scrit serve`` on vLLM following ``run_dir`` in its own session, with ``python_path`` (a baseline's
    worktree) first on PYTHONPATH; yields its URL, then stops it with Ctrl-C (its session with SIGKILL if
    it does not stop)."""
    port = free_port()
    command = [sys.executable, "-m", "scrit.cli", "serve", "--model", "seed", "--follow", str(run_dir),
               "--port", str(port), "--set", "critic.backend=vllm", "--set", f"vllm.kv_cache_gib={args.kv_cache_gib}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "RAY_ADDRESS": "local"}  # its own Ray: an empty address would join any Ray already running here
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path or str(ROOT), env.get("PYTHONPATH")) if p)
    log_path = run_dir.parent / f"serve-{label.replace('/', '_')}.log"
    print(f"[{label}] {' '.join(command)}  (log {log_path})", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=python_path or ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                   text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 600
        while not lines and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if not lines:
            raise RuntimeError(f"[{label}] scrit serve did not start (exit {process.poll()}); see {log_path}")
        yield lines[0].strip()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        try:  # whatever of its session is left (Ray's processes); the session is this server's alone
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_while(path: str | None) -> None:
    """On a shared machine: hold off while ``path`` exists (someone else's measurement runs)."""
    if path:
        while os.path.exists(path):
            time.sleep(10)


def measure(label: str, python_path: str | None, args: argparse.Namespace, checkpoints: list[Path]) -> dict[str, Any]:
    """Every level, steady then while swapping, against one code version's server."""
    from scrit.actors.registry import WeightRegistry
    from scrit.serve.testing import publish

    run_dir = Path(tempfile.mkdtemp(prefix="scrit-serve-bench-")) / "run"
    run_dir.mkdir()
    registry = WeightRegistry(run_dir, "seed")
    version = [0]

    def publish_next() -> None:
        version[0] += 1
        publish(registry, version[0], checkpoints[(version[0] - 1) % len(checkpoints)])

    prompts = critique_prompts()
    results: list[dict[str, Any]] = []
    started = time.time()
    with serving(label, python_path, run_dir, args) as url:
        for swapping in (False, True):
            for clients in args.levels:
                wait_while(args.pause_while)
                level = Level(clients, swapping)
                asyncio.run(run_level(url, level, args.seconds, prompts, args.max_tokens,
                                      publish_next if swapping else None, args.swap_every))
                summary = summarize(level)
                results.append(summary)
                print(f"[{label}] {clients:>2} clients{' swapping' if swapping else '':9}: "
                      f"{summary['requests_per_s']:.2f} req/s, latency p50 {_s(summary['latency_p50'])}, "
                      f"TTFT p50 {_s(summary['ttft_p50'])}, {summary['failed']} failed, "
                      f"versions {summary['versions']}", flush=True)
    return {"label": label, "levels": results, "published": version[0], "wall_s": time.time() - started}


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(after: float | None, before: float | None) -> str:
    return "-" if not after or not before else f"{after / before:.2f}x"


ROWS: list[tuple[str, str, str]] = [  # (label, key, how to read the ratio)
    ("requests/s", "requests_per_s", "higher is better"),
    ("completion tokens/s", "tokens_per_s", "higher is better"),
    ("latency p50 (s)", "latency_p50", "lower is better"),
    ("latency p99 (s)", "latency_p99", "lower is better"),
    ("time to first token p50 (s)", "ttft_p50", "lower is better"),
    ("time to first token p99 (s)", "ttft_p99", "lower is better"),
    ("  first token at (share of total, p50)", "ttft_share_p50", ""),
    ("failed requests", "failed", ""),
    ("version regressions", "version_regressions", ""),
]


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One table: a block per level (steady, then swapping), a column per code version, and the ratio of the
    last column to the first."""
    width = 20
    lines = [f"{'':42}" + "".join(f"{r['label']:>{width}}" for r in results)
             + (f"{'last / first':>{width}}" if len(results) > 1 else "")]
    for index, level in enumerate(results[0]["levels"]):
        published = " / ".join(str(r["levels"][index]["published"]) for r in results)
        title = f"{level['clients']} client{'s' if level['clients'] > 1 else ''}" + (
            f", swapping (versions published: {published})" if level["swapping"] else "")
        lines.append(title)
        for name, key, _ in ROWS:
            cells = [r["levels"][index][key] for r in results]
            text = [_s(c) if isinstance(c, float) else str(c) for c in cells]
            ratio = _ratio(cells[-1], cells[0]) if len(results) > 1 and isinstance(cells[0], float) else ""
            lines.append(f"  {name:40}" + "".join(f"{t:>{width}}" for t in text) + f"{ratio:>{width}}")
    lines.append(f"(each level: {args.seconds:.0f} s after {WARM_UP_S:.0f} s of warm-up; a version every "
                 f"{args.swap_every:.0f} s while swapping; load average at the end "
                 f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return "\n".join(lines)


def _export(ref: str) -> Path:
    """The files of ``ref`` in a temporary folder (``git archive``: no worktree is registered)."""
    path = Path(tempfile.mkdtemp(prefix="scrit-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], check=True,
                             stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="append", default=None,
                        help="git ref measured first, side by side with this checkout (repeatable; default 7dad669)")
    parser.add_argument("--no-baseline", action="store_true", help="measure this checkout only")
    parser.add_argument("--levels", type=lambda text: [int(x) for x in text.split(",")], default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per level")
    parser.add_argument("--swap-every", type=float, default=5.0, help="seconds between publishes while swapping")
    parser.add_argument("--max-tokens", type=int, default=512, help="per request (critic.max_new_tokens)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="the replica's vLLM KV cache")
    parser.add_argument("--pause-while", default=None,
                        help="before each level, wait while this file exists (a shared machine's quiet flag)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from scrit.serve.testing import save_perturbed

    scratch = Path(tempfile.mkdtemp(prefix="scrit-serve-bench-ckpt-"))
    checkpoints = [save_perturbed("seed", scratch / f"v{k}", seed=k, scale=0.01) for k in (1, 2, 3)]
    results = []
    try:
        for ref in [] if args.no_baseline else (args.baseline or ["7dad669"]):
            tree = _export(ref)
            try:
                results.append(measure(ref, str(tree), args, checkpoints))
            finally:
                shutil.rmtree(tree, ignore_errors=True)
        results.append(measure("this checkout", None, args, checkpoints))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
