"""P3: Ray Train SFT tokens/s vs a plain torch loop on the same model and batches, DDP and DeepSpeed;
P3b: the trainer's CPU path, one row of a batch at a time, vs the padded batch.

    .venv/bin/python benchmarks/trainer.py [--steps 40] [--strategies ddp deepspeed] [--padding-only]

Both sides train the shipped seed critic with the project's SFT loss (``scrit.train.sft``), AdamW,
bf16 autocast, gradient clipping, batch 8 plus its rehearsal rows, one CPU thread, on the same pool of
training examples (direct critiques of training-bucket arith problems, written as the loop writes them):

* **plain**: one process, the pool's batches in order, ``--steps`` optimizer steps, timed after two
  warm-up steps; one row at a time against DDP (the trainer's CPU path), the padded batch against
  DeepSpeed (which always runs the padded batch);
* **Ray Train**: ``run_training`` with one worker, the pool in a replay-buffer actor (every example
  eligible, no backpressure), ``--steps`` steps per version for two versions; the rate is version 2's
  window (tokens / wall seconds between the two publishes: sampling from the buffer actor,
  tokenizing, the DDP wrapper or the DeepSpeed engine, the stop check and publishing included;
  start-up excluded, as on the plain side).

Batches differ in draw order (the buffer samples at random), so rates are tokens per second, not
steps per second. Prints each rate and the ratio per strategy.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH = 8


def example_pool(n: int = 512, seed: int = 3, split: str = "train", ops: tuple[int, int] = (2, 5)) -> list:
    """Loop-shaped training examples: a direct prompt and its canonical critique as the target, every
    other solution with one wrong step; ``ops`` operations per problem from the arith ``split``."""
    from scrit.domains import arith
    from scrit.messages import TrainingExample
    from scrit.prompts import critic_prompt
    from scrit.seed.corpus import arith_critique

    rng = random.Random(seed)
    pool = []
    for i in range(n):
        problem = arith.generate_split_problem(rng, split, ops[0], ops[1])
        steps = problem.correct_steps() if i % 2 else arith.wrong_solution(rng, problem)[0]
        pool.append(TrainingExample(prompt=critic_prompt(problem.text, arith.render_solution(steps)),
                                    target=arith_critique(problem, steps, contrastive=False),
                                    student_correct=bool(i % 2), problem_id=f"bench-{i}", version=0))
    return pool


def plain_loop(pool: list, steps: int, by_rows: bool = True) -> float:
    """Tokens per second of a plain torch SFT loop (after two warm-up steps): each batch with its
    rehearsal rows (``train.rehearsal_share``'s default, as the trainer adds them), either one row at a
    time (``by_rows``, the trainer's CPU path, ``train.split_rows``) or as one padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from scrit.backends import resolve_model_path
    from scrit.backends.hf import load_tokenizer
    from scrit.config import default_config
    from scrit.train.sft import encode_examples, loss_denominator, rehearsal_examples, sft_loss, split_rows

    torch.set_num_threads(1)
    share = default_config().train.rehearsal_share
    seed = resolve_model_path("seed")
    tokenizer = load_tokenizer(seed)
    model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, started = 0, None
    for step in range(steps + 2):
        if step == 2:
            tokens, started = 0, time.perf_counter()
        examples = [pool[(step * BATCH + i) % len(pool)] for i in range(BATCH)]
        batch = encode_examples(tokenizer, examples + rehearsal_examples(examples, share), 1024)
        denominator = loss_denominator(batch)
        for piece in split_rows(batch) if by_rows else [batch]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = sft_loss(model, piece, denominator)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - started)


def padding_ratio(pool: list, steps: int) -> None:
    """P3b: the trainer's CPU path (one row at a time) against the padded batch, same batches, twice
    each, interleaved so that drift on a shared machine hits both sides."""
    padded, rows = [], []
    for _ in range(2):
        padded.append(plain_loop(pool, steps, by_rows=False))
        rows.append(plain_loop(pool, steps, by_rows=True))
    print(f"P3b padding: one row at a time {sum(rows) / 2:,.0f} tok/s ({rows[0]:,.0f} / {rows[1]:,.0f}) vs padded "
          f"batch {sum(padded) / 2:,.0f} tok/s ({padded[0]:,.0f} / {padded[1]:,.0f}) = "
          f"{sum(rows) / sum(padded):.2f}x (goal > 1.2x)", flush=True)


def ray_train(pool: list, steps: int, strategy: str) -> float:
    """Tokens per second of version 2's window of a Ray Train run (one worker)."""
    import ray

    from scrit.actors.registry import weight_registry_actor
    from scrit.actors.replay_buffer import replay_buffer_actor
    from scrit.config import load_config
    from scrit.rundir import read_events
    from scrit.train.trainer import run_training

    run_dir = Path(tempfile.mkdtemp(prefix=f"scrit-bench-train-{strategy}-"))
    cfg = load_config(None, [f"train.strategy={strategy}", f"train.steps_per_version={steps}", "run.versions=2",
                             f"train.batch_size={BATCH}", "metrics.enabled=false", "resources.train_worker_num_cpus=1"])
    buffer = replay_buffer_actor(num_cpus=0.05, actor_options={"name": f"bench-buffer-{strategy}"},
                                 run_dir=str(run_dir), max_staleness=100, max_ahead=100_000, sync=False)
    registry = weight_registry_actor(run_dir, "seed", name=f"bench-registry-{strategy}")
    ray.get(buffer.put.remote(pool))
    run_training(cfg, run_dir, f"bench-buffer-{strategy}", f"bench-registry-{strategy}")
    window = read_events(run_dir / "train_metrics.jsonl")[-1]
    ray.kill(buffer)
    ray.kill(registry)
    return window["tokens"] / window["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "deepspeed"], choices=["ddp", "deepspeed"])
    parser.add_argument("--padding-only", action="store_true", help="only P3b (no Ray)")
    args = parser.parse_args()
    pool = example_pool()
    padding_ratio(pool, args.steps)
    if args.padding_only:
        return
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    for strategy in args.strategies:
        by_rows = strategy == "ddp"
        plain = plain_loop(pool, args.steps, by_rows)
        trained = ray_train(pool, args.steps, strategy)
        again = plain_loop(pool, args.steps, by_rows)  # before and after: drift on a shared machine shows here
        baseline = (plain + again) / 2
        print(f"P3 trainer ({strategy}): Ray Train {trained:,.0f} tok/s vs plain torch {plain:,.0f} / {again:,.0f} "
              f"tok/s = {trained / baseline:.2f}x (goal >= 0.9x)", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
