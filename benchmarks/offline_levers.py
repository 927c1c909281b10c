"""Loss-weight levers side by side, offline: which weighting makes the direct critic compute, not copy.

    .venv/bin/python benchmarks/offline_levers.py [--steps 200] [--seeds 0,1] [--variants a,b] [--device auto]
        [--items 300] [--hard-items 150] [--out results.jsonl]

Every variant fine-tunes the seed from the same stream of perfect direct critiques
(``offline_ceiling.example_stream``: training-bucket problems, the careless solver's error kinds; a
diagnostic, never loop data) with the trainer's loss, schedule and batch, and differs only in its loss
weights (``scrit.train.sft.LossWeights``) or its share of correct solutions. Each fine-tuned critic is
scored greedily with the HF backend on the project's held-out sets (``--bench arith`` and
``arith-hard``, direct mode) and on two probes of the arithmetic a fix needs, over the held-out set's
wrong solutions, with an ideal critique written up to the point probed:

* ``expected_acc``: the result the critic writes after ``expected X op N =`` on the first wrong step's
  line (a critic that copies the student's result there finds nothing and fixes nothing);
* ``fix_given_line``: the critic's correction, continued after an ideal critique up to ``Correction:``,
  reaches the right answer;
* ``solver_step_acc``: the result of each step of the same problems where a solver writes it
  (``Solution:`` and the right steps before it): the arithmetic the critic has, wherever it uses it.

``--score DIR,...`` scores existing checkpoints instead (a loop run's versions), ``--probes-only`` skips
the held-out sets (the probes take a minute on the CPU, the sets several).

Runs on the CPU (a few minutes per variant) or CUDA (seconds); prints one table and writes JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A variant is named by its changes from the plain loss, joined by "+": result3 = LossWeights(result=3),
# wrong2 = wrong_step 2, verdict2, correction2, and correct0.6 = 60 % correct solutions (default 50 %).
DEFAULT_VARIANTS = "plain,result3,result3+wrong2,result3+wrong3,result3+wrong10"
WEIGHT_KEYS = {"result": "result", "wrong": "wrong_step", "verdict": "verdict", "correction": "correction"}


def parse_variant(name: str) -> tuple[dict[str, float], float]:
    """``result3+wrong2+correct0.6`` -> ({"result": 3.0, "wrong_step": 2.0}, 0.6)."""
    weights, correct_share = {}, 0.5
    for part in name.split("+"):
        key = part.rstrip("0123456789.")
        if part == "plain":
            continue
        if key == "correct":
            correct_share = float(part[len(key):])
        elif key in WEIGHT_KEYS and part != key:
            weights[WEIGHT_KEYS[key]] = float(part[len(key):])
        else:
            raise ValueError(f"unknown variant part {part!r} in {name!r} (e.g. result3+wrong2+correct0.6)")
    return weights, correct_share


def probe_prompts(items: list[Any]) -> tuple[list[str], list[int], list[str], list[int], list[str], list[int]]:
    """Prompts for the three arithmetic probes over the items with a wrong step, and what is right."""
    from scrit.domains import arith
    from scrit.prompts import CORRECTION_MARKER, critic_prompt, solver_prompt
    from scrit.seed.corpus import arith_critique

    line_prompts, line_truth, fix_prompts, fix_truth = [], [], [], []
    solver_prompts, solver_truth = [], []
    for item in items:
        if item.label < 0:
            continue
        problem = arith.parse_problem(item.problem)
        critique = arith_critique(problem, list(item.steps), contrastive=False)
        prompt = critic_prompt(item.problem, item.solution)
        expected = problem.correct_steps()[item.label]
        line = f"Step {item.label + 1}: {item.steps[item.label]}, expected "
        left = expected.rsplit("= ", 1)[0] + "= "
        line_prompts.append(prompt + critique[: critique.index(line)] + line + left)
        line_truth.append(int(expected.rsplit("= ", 1)[1]))
        cut = critique.index(CORRECTION_MARKER + "\n") + len(CORRECTION_MARKER) + 1
        fix_prompts.append(prompt + critique[:cut])
        fix_truth.append(problem.answer)
        steps = problem.correct_steps()
        for k, step in enumerate(steps):
            before = "".join(f"Step {i + 1}: {steps[i]}\n" for i in range(k))
            solver_prompts.append(f"{solver_prompt(item.problem)}{before}Step {k + 1}: {step.rsplit('= ', 1)[0]}= ")
            solver_truth.append(int(step.rsplit("= ", 1)[1]))
    return line_prompts, line_truth, fix_prompts, fix_truth, solver_prompts, solver_truth


def leading_int(text: str) -> int | None:
    digits = ""
    for char in text.strip():
        if char.isdigit() or (char == "-" and not digits):
            digits += char
        else:
            break
    return int(digits) if digits not in ("", "-") else None


def share_right(texts: list[str], truth: list[int]) -> float:
    return round(sum(leading_int(t) == y for t, y in zip(texts, truth)) / len(truth), 4)


def score(model_dir: str, device: str, items: int, hard_items: int, batch_size: int,
          probes_only: bool = False) -> dict[str, float]:
    from scrit.backends.base import SamplingParams
    from scrit.backends.hf import HFBackend
    from scrit.domains import arith
    from scrit.evaluate import build_arith_evalset, build_hard_evalset, evaluate, generate_all

    backend = HFBackend(model_dir, device=device, dtype="float32", batch_size=batch_size)
    result: dict[str, float] = {}
    heldout = build_arith_evalset(n=items)
    for name, evalset in () if probes_only else (("arith", heldout), ("hard", build_hard_evalset(n=hard_items))):
        average = evaluate(backend, evalset, "direct", batch_size=batch_size)["average"]
        for key in ("ei_f1", "cc_acc", "acc_err", "acc_cor"):
            result[f"{name}_{key}"] = round(float(average[key]), 4)
    line_prompts, line_truth, fix_prompts, fix_truth, solver_prompts, solver_truth = probe_prompts(heldout)
    short = SamplingParams(max_new_tokens=6, temperature=0.0)
    result["expected_acc"] = share_right(generate_all(backend, line_prompts, short, batch_size), line_truth)
    result["solver_step_acc"] = share_right(generate_all(backend, solver_prompts, short, batch_size), solver_truth)
    fixes = generate_all(backend, fix_prompts, SamplingParams(max_new_tokens=200, temperature=0.0), batch_size)
    result["fix_given_line"] = round(
        sum(arith.extract_boxed_int(t) == y for t, y in zip(fixes, fix_truth)) / len(fix_truth), 4)
    return result


def main() -> None:
    import torch

    from benchmarks.offline_ceiling import example_stream, fine_tune, save
    from scrit.backends import resolve_model_path
    from scrit.train.sft import LossWeights

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--hard-items", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=0, help="generation batch (0: 150 on CUDA, 32 on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per variant and seed")
    parser.add_argument("--score", default="", help="comma-separated checkpoint directories to score, no training")
    parser.add_argument("--probes-only", action="store_true", help="the arithmetic probes, not the held-out sets")
    args = parser.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        torch.set_num_threads(1)
    batch_size = args.batch_size or (150 if device == "cuda" else 32)
    model_path = resolve_model_path("seed")
    rows = [{"variant": "seed", "seed": None,
             **score(model_path, device, args.items, args.hard_items, batch_size, args.probes_only)}]
    print(json.dumps(rows[0]), flush=True)
    for directory in filter(None, args.score.split(",")):
        rows.append({"variant": directory, "seed": None,
                     **score(directory, device, args.items, args.hard_items, batch_size, args.probes_only)})
        print(json.dumps(rows[-1]), flush=True)
    for seed in [int(s) for s in args.seeds.split(",")] if not args.score else []:
        for name in args.variants.split(","):
            weights, correct_share = parse_variant(name)
            started = time.monotonic()
            model, tokenizer = fine_tune(model_path, example_stream(seed, "careless", correct_share), args.steps,
                                         args.lr, LossWeights(**weights), device, label=f"{name} seed {seed}")
            train_s = time.monotonic() - started
            with tempfile.TemporaryDirectory() as out:
                save(model, tokenizer, model_path, out)
                row = {"variant": name, "seed": seed, "steps": args.steps, "train_s": round(train_s, 1),
                       **score(out, device, args.items, args.hard_items, batch_size, args.probes_only)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as sink:
                    sink.write(json.dumps(row) + "\n")
    columns = ["arith_ei_f1", "arith_cc_acc", "arith_acc_cor", "hard_ei_f1", "hard_cc_acc", "hard_acc_cor",
               "expected_acc", "fix_given_line", "solver_step_acc"]
    columns = [c for c in columns if c in rows[0]]
    print(f"{'variant':<22}{'seed':>5} " + " ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print(f"{row['variant'][-22:]:<22}{str(row['seed']):>5} " + " ".join(f"{row[c]:>14.3f}" for c in columns))


if __name__ == "__main__":
    main()
