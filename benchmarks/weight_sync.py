"""How fast a published critic version reaches every subscriber, and how fast a run recovers from a lost node.

    PYTHONPATH=. .venv/bin/python benchmarks/weight_sync.py [--models seed,smollm2] [--publishes 4]
        [--subscribers 2] [--backend vllm] [--node-loss trainer.rank0,evaluator.0] [--tries 1]

Everything runs on a 3-node Ray cluster on this machine (``scrit.actors.local_cluster``: a head with no
CPUs for work, two 1-CPU worker nodes, each its own raylet and object store).

**Weight sync.** Per model, ``--subscribers`` engine hosts (``actors/engines.py``, the run's engine
actors, each with the evolving critic's engine and its ``VersionFollower``) are placed round-robin on
the two worker nodes, and the weight registry actor on the head, as in a run. A client per subscriber
asks it for one token every 20 ms, so each swaps as soon as it looks (engines look every 0.2 s, as in a
run). Then versions are published one after another, alternating the transport (``disk`` first):

* ``disk``: the registry records the version; each subscriber verifies the checkpoint's checksum
  and reloads from the checkpoint directory;
* ``object_store``: the publisher also hands the registry the state dict (``PackedWeights``, as the
  trainer does), which puts it into Ray's object store; each subscriber pulls it to its node and
  reloads in place.

The checkpoint is written before the clock starts, for both (a run writes it either way) and the
state dict is in the publisher's memory (the trainer has it). Measured from the publish call to the
first answer on the new version from *every* subscriber (the slowest); also the publish call alone and
the subscribers' own load time (``load_s`` of the follower). "Shared disk" here is this machine's disk,
just written, so mostly the page cache: the best case for ``disk``; a network file system is slower.

**Node loss** (``--node-loss``, one run per component): ``scrit run`` of ``configs/tiny-test.yaml``
(3 versions, the endpoint up and probed every 0.5 s) on the same kind of cluster, the worker node
holding the component removed ungracefully after the first batch: the run's status, how long until
the lost node's processes had started elsewhere, the first batch and the next version after the loss,
examples before/after and failed endpoint requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "resources.engine_num_cpus=0.2", "--set", "resources.train_worker_num_cpus=0.3",
         "--set", "resources.actor_num_cpus=0.02", "--set", "resources.serve_replica_num_cpus=0.1"]


class Client(threading.Thread):
    """Asks one engine host for one token every ``pause_s``; records when each version first answered."""

    def __init__(self, host: Any, pause_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.host, self.pause_s = host, pause_s
        self.first_seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import ray

        from scrit.backends.base import SamplingParams
        from scrit.messages import GenerationBatch, GenerationRequest, decode, encode

        request = encode(GenerationRequest(prompts=["Step 1: 2 + 3 ="], sampling=SamplingParams(max_new_tokens=1)))
        while not self.stop.is_set():
            reply = decode(ray.get(self.host.generate.remote(request)), GenerationBatch)
            self.first_seen.setdefault(reply.generations[0].version, time.time())
            time.sleep(self.pause_s)


def sync_model(model: str, args: argparse.Namespace, workers: list[str], namespace: str) -> list[dict[str, Any]]:
    """Publish ``args.publishes`` versions of ``model`` to ``args.subscribers`` engine hosts; one row each."""
    import ray
    import torch
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from transformers import AutoModelForCausalLM

    from scrit.actors.engines import start_engine_hosts
    from scrit.actors.registry import ObjectStoreWeights, weight_registry_actor
    from scrit.backends import resolve_model_path
    from scrit.checkpoints import checkpoint_checksum
    from scrit.config import default_config
    from scrit.factory import CRITIC_ENGINE, EngineHostSpec, engine_spec
    from scrit.messages import WeightVersion
    from scrit.prompts import resolve_prompt_style
    from scrit.serve.testing import save_perturbed
    from scrit.weights import PackedWeights

    source = resolve_model_path(model)
    run_dir = Path(tempfile.mkdtemp(prefix=f"scrit-sync-{model}-"))
    print(f"[{model}] writing {args.publishes} perturbed versions of {source} ...", flush=True)
    versions = [save_perturbed(source, run_dir / "versions" / f"v{v:04d}", seed=v) for v in range(1, args.publishes + 1)]
    cfg = default_config()
    if model != "seed":  # SmolLM2's own 8192 needs more KV cache than a CPU engine's 0.25 GiB (the seed has 1024)
        cfg.vllm.max_model_len = 2048
    spec = engine_spec(cfg, CRITIC_ENGINE, source, args.backend, resolve_prompt_style(source, "auto"), follows=True,
                       num_cpus=0.2)
    registry_name = f"sync-registry-{model}"
    head = ray.get_runtime_context().get_node_id()
    registry = weight_registry_actor(run_dir, source, num_cpus=0, name=registry_name, actor_options={
        "scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False)})
    ray.get(registry.latest.remote())
    weights = ObjectStoreWeights(registry=registry_name, namespace=namespace)
    hosts = {}
    for k in range(args.subscribers):
        node = NodeAffinitySchedulingStrategy(workers[k % len(workers)], soft=False)
        hosts.update(start_engine_hosts([EngineHostSpec(name=f"sub{k}-{model}", engines=[spec], num_cpus=0.2,
                                                        num_gpus=0, max_concurrency=4)],
                                        str(run_dir), {"scheduling_strategy": node}, weights=weights))
    ray.get([host.ready.remote() for host in hosts.values()])
    clients = [Client(host) for host in hosts.values()]
    for client in clients:
        client.start()
    rows = []
    try:
        for number, directory in enumerate(versions, start=1):
            transport = "disk" if number % 2 else "object_store"
            state = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).state_dict()
            record = WeightVersion(version=number, uri=str(directory), checksum=checkpoint_checksum(directory),
                                   created_at=time.time())
            started = time.time()
            packed = PackedWeights.pack(state) if transport == "object_store" else None
            ray.get(registry.publish.remote(record, packed))
            published = time.time() - started
            deadline = time.monotonic() + 300
            while not all(number in client.first_seen for client in clients):
                assert time.monotonic() < deadline, f"version {number} did not reach every subscriber"
                time.sleep(0.01)
            stats = [s[CRITIC_ENGINE] for s in ray.get([host.stats.remote() for host in hosts.values()])]
            arrived = {t for s in stats for t, n in s["transports"].items() if n}
            rows.append({"model": model, "transport": transport, "version": number,
                         "mb": sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e6,
                         "publish_s": published, "load_s": max(s["last_swap_s"] for s in stats),
                         "all_serving_s": max(client.first_seen[number] for client in clients) - started,
                         "arrived": arrived})
            print(f"[{model}] v{number} {transport}: publish {published:.3f} s, slowest load {rows[-1]['load_s']:.3f} s, "
                  f"all serving after {rows[-1]['all_serving_s']:.3f} s", flush=True)
            time.sleep(1.0)
    finally:
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(timeout=30)
        for actor in [*hosts.values(), registry]:
            ray.kill(actor)
    return rows


def sync_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | checkpoint MB | transport | versions | publish call s (median) | slowest subscriber load s "
             "(median) | publish -> every subscriber serving s (median / max) |", "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for transport in ("disk", "object_store"):
            picked = [r for r in rows if r["model"] == model and r["transport"] == transport]
            if not picked:
                continue
            serving = [r["all_serving_s"] for r in picked]
            lines.append(f"| {model} | {picked[0]['mb']:.0f} | {transport} | {len(picked)} | "
                         f"{statistics.median(r['publish_s'] for r in picked):.3f} | "
                         f"{statistics.median(r['load_s'] for r in picked):.3f} | "
                         f"{statistics.median(serving):.3f} / {max(serving):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="seed,smollm2")
    parser.add_argument("--publishes", type=int, default=4, help="versions per model, transports alternating")
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--node-loss", default="trainer.rank0,evaluator.0",
                        help="components whose node a tiny run loses, one run each ('' = none)")
    parser.add_argument("--tries", type=int, default=1, help="node-loss runs per component (one cluster for all)")
    parser.add_argument("--sync-on", help=argparse.SUPPRESS)  # internal: worker node ids; join RAY_ADDRESS
    args = parser.parse_args()

    if args.sync_on:  # the child that joins the cluster (see below) and prints its rows as JSON
        import ray

        namespace = "weight-sync"
        ray.init(address=os.environ["RAY_ADDRESS"], namespace=namespace, log_to_driver=False)
        rows = [row for model in args.models.split(",") for row in sync_model(model, args, args.sync_on.split(","), namespace)]
        print("ROWS " + json.dumps([{**row, "arrived": sorted(row["arrived"])} for row in rows]), flush=True)
        return

    from scrit.actors.local_cluster import LocalCluster, free_port, run_losing_node

    rows: list[dict[str, Any]] = []
    if args.models:
        with LocalCluster(workers=2, worker_cpus=1, head_cpus=0, object_store_mb=1500) as cluster:
            # A child process joins the cluster: Ray reads the token settings (RAY_AUTH_MODE) when it is
            # imported, so a process that imported Ray before the cluster existed cannot join it.
            command = [sys.executable, __file__, "--models", args.models, "--publishes", str(args.publishes),
                       "--subscribers", str(args.subscribers), "--backend", args.backend,
                       "--sync-on", ",".join(cluster.workers)]
            child = subprocess.run(command, env=cluster.client_env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                                   text=True, timeout=3600)
            for line in child.stdout.splitlines():
                if line.startswith("ROWS "):
                    rows = json.loads(line[len("ROWS "):])
                else:
                    print(line)
            if child.returncode:
                raise SystemExit(f"the weight-sync child failed with exit code {child.returncode}")
    losses = []
    components = [c for c in args.node_loss.split(",") if c]
    if components:
        with LocalCluster(workers=2, worker_cpus=1, head_cpus=0) as cluster, \
                tempfile.TemporaryDirectory(prefix="scrit-loss-") as tmp:
            for attempt in range(args.tries):
                for component in components:
                    while len(cluster.workers) < 2:  # the node lost last time comes back as a fresh one
                        cluster.add_worker()
                    run = ["--config", str(REPO / "configs" / "tiny-test.yaml"), "--set", "run.versions=3",
                           "--set", "run.max_wall_seconds=1200", *SMALL, "--set", "serve.enabled=true",
                           "--set", f"serve.port={free_port()}"]
                    run_dir = Path(tmp) / f"run-{component}-{attempt}"
                    losses.append(run_losing_node(cluster, run_dir, component, run, probe_endpoint=True, cwd=REPO))
                    print(f"try {attempt + 1}: {losses[-1].line()}", flush=True)
    print()
    if rows:
        print(f"Weight sync ({args.subscribers} subscribers on 2 worker nodes, {args.backend} engines):")
        print(sync_table(rows))
    for loss in losses:
        print(loss.line())
    for component in components:
        mine = [loss for loss in losses if loss.component == component]
        done = [loss for loss in mine if loss.summary.get("status") == "completed" and loss.summary.get("versions") == 3
                and loss.returncode == 0]
        print(f"{component}'s node lost: {len(done)}/{len(mine)} runs completed with all versions")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
