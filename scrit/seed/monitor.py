"""A quick held-out probe run at seed checkpoints, so a long pretraining run shows its progress."""

from __future__ import annotations

import random

import torch

from scrit.domains import arith
from scrit.parsing import parse_critique
from scrit.prompts import critic_prompt, solver_prompt
from scrit.domains.arith import generate_split_problem
from scrit.seed.corpus import INCORRECT_SHARE


@torch.inference_mode()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 400, batch_size: int = 32) -> list[str]:
    outputs = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        enc = tokenizer([tokenizer.bos_token + p for p in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outputs


def probe(model, tokenizer, n: int = 40, seed: int = 99) -> dict[str, float]:
    rng = random.Random(seed)
    problems = [generate_split_problem(rng, "heldout") for _ in range(n)]
    students, labels = [], []
    for problem in problems:
        if rng.random() < INCORRECT_SHARE:
            steps, label = arith.wrong_solution(rng, problem)
        else:
            steps, label = problem.correct_steps(), -1
        students.append(arith.render_solution(steps))
        labels.append(label)
    result = {}
    solutions = greedy(model, tokenizer, [solver_prompt(p.text) for p in problems], max_new_tokens=200)
    result["solve_acc"] = sum(arith.extract_boxed_int(s) == p.answer for s, p in zip(solutions, problems)) / n
    for mode in ("contrastive", "direct"):
        prompts = [critic_prompt(p.text, s, arith.render_solution(p.correct_steps()) if mode == "contrastive" else None)
                   for p, s in zip(problems, students)]
        parsed = [parse_critique(t) for t in greedy(model, tokenizer, prompts)]
        predicted = [c.first_error_step if c.parsed else -3 for c in parsed]
        err = [p == l for p, l in zip(predicted, labels) if l >= 0]
        cor = [p == -1 for p, l in zip(predicted, labels) if l == -1]
        a, b = sum(err) / max(1, len(err)), sum(cor) / max(1, len(cor))
        result[f"{mode}_f1"] = 0.0 if a + b == 0 else 2 * a * b / (a + b)
        result[f"{mode}_acc_err"], result[f"{mode}_acc_cor"] = a, b
    return result
