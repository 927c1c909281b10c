"""What the critic could reach with perfect data: an upper bound for the self-play loop, never part of it.

    .venv/bin/python benchmarks/offline_ceiling.py OUT_DIR [--model seed] [--steps 200] [--lr 3e-4]
        [--kinds uniform|careless] [--pool 0] [--verdict-weight 1] [--result-weight 1] [--correction-weight 1]
        [--wrong-step-weight 1]
    .venv/bin/scrit eval --model OUT_DIR --bench arith --mode direct --limit 1000 --backend vllm

It fine-tunes a critic exactly as the trainer does (``encode_examples`` + ``sft_loss``, batches of 8,
bf16 autocast, AdamW, the same LR schedule) but on *canonical* direct critiques written from the
step labels of generated training problems (half correct solutions, half with one wrong step of
``--kinds``: uniform over the four kinds, or the careless solver's mix). Those labels are exactly what
the integrity rule keeps out of the loop (DESIGN.md §1), so this is a diagnostic: the gap between its
score and the loop's, at the same number of optimizer steps, is what the loop's own data costs, and
its score at N steps is what N steps can buy at best. ``--pool N`` draws from N fixed examples
instead of fresh ones (how many distinct problems the loop would need). ``benchmarks/offline_levers.py``
compares loss weights on this data side by side.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CARELESS_KIND_WEIGHTS = [55, 15, 11, 18]  # result, operand, operation, number: the careless solver at T=1.0
BATCH = 8


def example_stream(seed: int, kinds: str = "careless", correct_share: float = 0.5) -> Callable[[], Any]:
    """A function returning a fresh perfect training example per call: a training-bucket arith problem,
    a correct solution ``correct_share`` of the time (else one wrong step of ``kinds``), and its
    canonical direct critique as the target."""
    from scrit.domains import arith
    from scrit.messages import TrainingExample
    from scrit.prompts import critic_prompt
    from scrit.seed.corpus import arith_critique

    rng = random.Random(seed)
    weights = CARELESS_KIND_WEIGHTS if kinds == "careless" else None

    def example() -> TrainingExample:
        problem = arith.generate_split_problem(rng, "train")  # never a held-out problem
        if rng.random() < correct_share:
            steps = problem.correct_steps()
        else:
            steps, _ = arith.wrong_solution(rng, problem, kind=rng.choices(arith.ERROR_KINDS, weights=weights)[0])
        return TrainingExample(prompt=critic_prompt(problem.text, arith.render_solution(steps)),
                               target=arith_critique(problem, steps, contrastive=False),
                               student_correct=steps == problem.correct_steps(), problem_id="offline", version=0)

    return example


def fine_tune(model_path: str, next_example: Callable[[], Any], steps: int, lr: float, weights: Any,
              device: str = "cpu", label: str = "offline SFT") -> tuple[Any, Any]:
    """``steps`` AdamW steps of batch 8 from ``model_path`` with the trainer's loss and schedule (cosine,
    10 warm-up steps, bf16 autocast, clipping at 1.0); returns (model, tokenizer)."""
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, get_scheduler

    from scrit.backends.hf import load_tokenizer
    from scrit.train.sft import encode_examples, sft_loss

    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=steps)
    with Progress() as progress:
        task = progress.add_task(label, total=steps)
        for _ in range(steps):
            batch = encode_examples(tokenizer, [next_example() for _ in range(BATCH)], 1024, weights=weights)
            batch = {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss, _ = sft_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            progress.update(task, advance=1, description=f"{label}, loss {loss.item():.4f}")
    model.eval()
    return model, tokenizer


def save(model: Any, tokenizer: Any, model_path: str, out: str) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = os.path.join(str(model_path), "seed_info.json")
    if os.path.isfile(info):  # keeps `prompt_style: auto` on the compact prompts of the seed family
        shutil.copy(info, os.path.join(out, "seed_info.json"))


def main() -> None:
    import torch

    from scrit.backends import resolve_model_path
    from scrit.train.sft import LossWeights

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--model", default="seed")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--kinds", choices=("uniform", "careless"), default="uniform")
    parser.add_argument("--pool", type=int, default=0, help="draw from this many fixed examples (0 = always fresh)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verdict-weight", type=float, default=1.0, help="train.verdict_weight")
    parser.add_argument("--result-weight", type=float, default=1.0, help="train.result_weight")
    parser.add_argument("--correction-weight", type=float, default=1.0, help="train.correction_weight")
    parser.add_argument("--wrong-step-weight", type=float, default=1.0, help="train.wrong_step_weight")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core, like the loop's trainer on this machine
    fresh = example_stream(args.seed, args.kinds)
    if args.pool:
        pool = [fresh() for _ in range(args.pool)]
        draw = random.Random(args.seed + 1)
        next_example = lambda: draw.choice(pool)  # noqa: E731
    else:
        next_example = fresh
    loss_weights = LossWeights(args.verdict_weight, args.result_weight, args.correction_weight,
                               args.wrong_step_weight)
    model_path = resolve_model_path(args.model)
    started = time.monotonic()
    model, tokenizer = fine_tune(model_path, next_example, args.steps, args.lr, loss_weights)
    save(model, tokenizer, model_path, args.out)
    print(f"wrote {args.out} after {args.steps} steps in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
