"""What the critic could reach with perfect data: an upper bound for the self-play loop, never part of it.

    .venv/bin/python benchmarks/offline_ceiling.py OUT_DIR [--model seed] [--steps 200] [--lr 3e-4]
        [--kinds uniform|careless] [--pool 0] [--verdict-weight 1] [--result-weight 1] [--correction-weight 1]
    .venv/bin/scrit eval --model OUT_DIR --bench arith --mode direct --limit 1000 --backend vllm

It fine-tunes a critic exactly as the trainer does (``encode_examples`` + ``sft_loss``, batches of 8,
bf16 autocast, AdamW, the same LR schedule) but on *canonical* direct critiques written from the
step labels of generated training problems (half correct solutions, half with one wrong step of
``--kinds``: uniform over the four kinds, or the careless solver's mix). Those labels are exactly what
the integrity rule keeps out of the loop (DESIGN.md §1), so this is a diagnostic: the gap between its
score and the loop's, at the same number of optimizer steps, is what the loop's own data costs, and
its score at N steps is what N steps can buy at best. ``--pool N`` draws from N fixed examples
instead of fresh ones (how many distinct problems the loop would need).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CARELESS_KIND_WEIGHTS = [55, 15, 11, 18]  # result, operand, operation, number: the careless solver at T=1.0


def main() -> None:
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, get_scheduler

    from scrit.backends import resolve_model_path
    from scrit.backends.hf import load_tokenizer
    from scrit.domains import arith
    from scrit.messages import TrainingExample
    from scrit.prompts import critic_prompt
    from scrit.seed.corpus import arith_critique
    from scrit.train.sft import LossWeights, encode_examples, sft_loss

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
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core, like the loop's trainer on this machine
    rng = random.Random(args.seed)
    weights = CARELESS_KIND_WEIGHTS if args.kinds == "careless" else None

    def example() -> TrainingExample:
        problem = arith.generate_split_problem(rng, "train")  # never a held-out problem
        if rng.random() < 0.5:
            steps = problem.correct_steps()
        else:
            steps, _ = arith.wrong_solution(rng, problem, kind=rng.choices(arith.ERROR_KINDS, weights=weights)[0])
        return TrainingExample(prompt=critic_prompt(problem.text, arith.render_solution(steps)),
                               target=arith_critique(problem, steps, contrastive=False),
                               student_correct=steps == problem.correct_steps(), problem_id="offline", version=0)

    pool = [example() for _ in range(args.pool)] if args.pool else None
    loss_weights = LossWeights(args.verdict_weight, args.result_weight, args.correction_weight)
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=args.steps)
    started = time.monotonic()
    with Progress() as progress:
        task = progress.add_task("offline SFT", total=args.steps)
        for _ in range(args.steps):
            batch = encode_examples(tokenizer, [rng.choice(pool) if pool else example() for _ in range(8)], 1024,
                                    weights=loss_weights)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = sft_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            progress.update(task, advance=1, description=f"offline SFT, loss {loss.item():.4f}")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    info = os.path.join(str(model_path), "seed_info.json")
    if os.path.isfile(info):  # keeps `prompt_style: auto` on the compact prompts of the seed family
        shutil.copy(info, os.path.join(args.out, "seed_info.json"))
    print(f"wrote {args.out} after {args.steps} steps in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
