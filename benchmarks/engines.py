"""HFBackend vs VLLMBackend on the same prompts, in one run, side by side.

    .venv/bin/python benchmarks/engines.py [--model seed] [--threads 1] [--swaps 3] [--hf-batch-size 16]

Each engine runs in a process of its own (spawned one after the other, never at the same time), as a
role actor would hold it, so its start-up time and resident memory are its own. Workloads are the
loop's batches (``scrit run`` defaults): the solver's 32 problems x 2 samples (256 new tokens,
temperature 1.0, seeded) and the critic's contrastive critiques of 32, 64 and 128 solutions (512 new
tokens, greedy), built from held-out arith items. Per engine it measures:

* start-up: constructing the backend (model load; vLLM: engine, KV cache), imports included;
* completion tokens/s per workload, and completion tokens per CPU-second of the engine process (the
  machine is shared, so wall-clock rates move with other jobs; CPU time per token does not much);
* swap latency: ``load_weights`` to a stand-in new version (the model plus 1% noise), median of
  ``--swaps``, alternating between two versions (HF loads the new model beside the old one; vLLM
  reloads in place);
* resident memory (RSS) of the engine process and its children after the workloads, and its peak.

The table gives each figure for both engines and the ratio vLLM / HF.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CRITIC_BATCHES = (32, 64, 128)
SOLVER_PROBLEMS, SOLVER_SAMPLES = 32, 2


def workloads() -> list[tuple[str, list[str], dict[str, Any]]]:
    """(name, prompts, sampling) for the loop's batch shapes."""
    from scrit.evaluate import build_arith_evalset, build_prompts
    from scrit.prompts import solver_prompt

    items = build_arith_evalset(max(CRITIC_BATCHES))
    critic = build_prompts(items, "contrastive")
    solver = [solver_prompt(item.problem) for item in items[:SOLVER_PROBLEMS] for _ in range(SOLVER_SAMPLES)]
    plans = [(f"solver {len(solver)} prompts", solver, {"max_new_tokens": 256, "temperature": 1.0, "seed": 0})]
    plans += [(f"critic {n} prompts", critic[:n], {"max_new_tokens": 512}) for n in CRITIC_BATCHES]
    return plans


def memory_mb() -> tuple[float, float]:
    """(RSS now of this process and its children, peak RSS of this process), in MB."""
    import psutil

    process = psutil.Process()
    now = sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    return now / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    import psutil

    process = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def run_engine(kind: str, model: str, versions: list[str], threads: int, hf_batch_size: int, swaps: int,
               events: Any) -> None:
    """Child process: build one engine, run every workload, swap, report (events: progress and results)."""
    import torch

    from scrit.backends import SamplingParams, make_backend

    if kind == "hf":
        torch.set_num_threads(threads)
        spec, options = model, {"device": "cpu", "batch_size": hf_batch_size}
    else:
        spec, options = f"vllm:{model}", {"cpu_threads": threads}
    started = time.perf_counter()
    backend = make_backend(spec, **options)
    result: dict[str, Any] = {"start-up s": time.perf_counter() - started}
    events.put(("step", kind, "started"))
    for name, prompts, sampling in workloads():
        cpu, started = cpu_seconds(), time.perf_counter()
        tokens = sum(g.completion_tokens for g in backend.generate(prompts, SamplingParams(**sampling)))
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        result[f"{name}: tokens/s"] = tokens / wall
        result[f"{name}: tokens/CPU-s"] = tokens / cpu
        events.put(("step", kind, name))
    latencies = []
    for index in range(swaps):
        started = time.perf_counter()
        backend.load_weights(index + 1, versions[index % len(versions)])
        latencies.append(time.perf_counter() - started)
    result["swap s (median)"] = statistics.median(latencies)
    result["RSS MB"], result["peak RSS MB"] = memory_mb()
    events.put(("step", kind, "swaps"))
    events.put(("result", kind, result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="seed", help="'seed' or a checkpoint directory")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per engine (role actors use 1)")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="HFBackend rows per forward (critic.batch_size)")
    parser.add_argument("--swaps", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from scrit.backends import resolve_model_path
    from scrit.serve.testing import save_perturbed

    console = Console()
    model = resolve_model_path(args.model)
    steps = 1 + len(workloads()) + 1  # start, workloads, swaps
    results: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as scratch:
        versions = [str(save_perturbed(model, Path(scratch) / f"v{i}", seed=i)) for i in (1, 2)]
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            for kind in ("hf", "vllm"):
                task = progress.add_task(f"{kind}: starting", total=steps)
                events = context.Queue()
                child = context.Process(target=run_engine, args=(kind, model, versions, args.threads,
                                                                 args.hf_batch_size, args.swaps, events))
                child.start()
                while kind not in results:
                    if not child.is_alive() and events.empty():
                        sys.exit(f"{kind} engine process failed (exit code {child.exitcode})")
                    try:
                        event, _, payload = events.get(timeout=1)
                    except queue.Empty:
                        continue
                    if event == "step":
                        progress.update(task, advance=1, description=f"{kind}: {payload}")
                    else:
                        results[kind] = payload
                child.join()

    table = Table(title=f"HF vs vLLM on {args.model} ({args.threads} thread(s) per engine, "
                        f"HF batch size {args.hf_batch_size})")
    for column in ("measure", "HF", "vLLM", "vLLM / HF"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for key, hf_value in results["hf"].items():
        vllm_value = results["vllm"][key]
        table.add_row(key, f"{hf_value:,.3f}" if hf_value < 10 else f"{hf_value:,.0f}",
                      f"{vllm_value:,.3f}" if vllm_value < 10 else f"{vllm_value:,.0f}", f"{vllm_value / hf_value:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
