"""The critique evaluation harness behind ``scrit eval`` (DESIGN.md §6).

The critic sees problem + solution (plus the item's reference in contrastive mode), writes a
critique, and the parsed critique is scored per split with EI-F1, its SCRIT variant and CC-Acc.
``solve`` mode scores the model as a solver instead (share of problems whose boxed answer is right).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scrit.backends.base import InferenceBackend, SamplingParams
from scrit.domains import arith
from scrit.domains.answers import answers_equal, extract_final_answer
from scrit.domains.base import EvalItem
from scrit.metrics import ItemResult, aggregate
from scrit.parsing import parse_critique
from scrit.prompts import critic_prompt, solver_prompt

BENCHES = ("arith", "arith-hard", "processbench", "realcritic", "jsonl")
MODES = ("direct", "contrastive", "solve")
ARITH_EVAL_SEED = 20250110
ARITH_EVAL_SIZE = 300
# The harder held-out set: longer chains than the default loop (2-5 operations) trains on, from the same
# held-out hash bucket, with its own seed.
ARITH_HARD_SEED = 20251203
ARITH_HARD_OPS = (6, 8)


def build_arith_evalset(n: int = ARITH_EVAL_SIZE, seed: int = ARITH_EVAL_SEED, incorrect_share: float = 0.5,
                        split_name: str = "arith", min_ops: int = 2, max_ops: int = 5) -> list[EvalItem]:
    """Held-out arith items (problems from the 'heldout' hash bucket, never trained on).

    Half the solutions carry a wrong step (the four kinds in turn, at a uniformly drawn step), half
    are correct; the correct solution is the reference.
    """
    from scrit.domains.arith import generate_split_problem

    rng = random.Random(seed)
    items = []
    for i in range(n):
        problem = generate_split_problem(rng, "heldout", min_ops, max_ops)
        if rng.random() < incorrect_share:
            kind = arith.ERROR_KINDS[i % len(arith.ERROR_KINDS)]
            steps, label = arith.wrong_solution(rng, problem, kind=kind)
        else:
            steps, label = problem.correct_steps(), -1
        items.append(EvalItem(
            id=f"arith-{seed}-{i}", problem=problem.text, steps=steps, label=label, answer=str(problem.answer),
            reference=arith.render_solution(problem.correct_steps()), solution=arith.render_solution(steps),
            split=split_name,
        ))
    return items


def build_hard_evalset(n: int = ARITH_EVAL_SIZE, seed: int = ARITH_HARD_SEED) -> list[EvalItem]:
    """The harder held-out arith set: 6-8 operations, half with one wrong step (``scrit eval --bench
    arith-hard``), split ``arith-hard``."""
    return build_arith_evalset(n=n, seed=seed, split_name="arith-hard", min_ops=ARITH_HARD_OPS[0],
                               max_ops=ARITH_HARD_OPS[1])


def _render_auto(steps: list[str]) -> str:
    """Arith steps get the arith solution layout; anything else numbered ``Step k:`` lines."""
    from scrit.domains.evalsets import render_numbered_steps

    if steps and all(arith.STEP_PATTERN.match(step) for step in steps):
        return arith.render_solution(steps)
    return render_numbered_steps(steps)


def load_bench(bench: str, data: str | None = None, split: str | None = None,
               limit: int | None = None) -> list[EvalItem]:
    """Items of one benchmark; ``split`` picks one split, ``limit`` caps items per split."""
    from scrit.domains import evalsets

    if bench not in BENCHES:
        raise ValueError(f"unknown bench {bench!r}; choose from {', '.join(BENCHES)}")
    splits = [split] if split else None
    if bench == "arith":
        if data:
            return evalsets.read_eval_jsonl(data, limit=limit, split=split, render=_render_auto)
        return build_arith_evalset(n=limit or ARITH_EVAL_SIZE)
    if bench == "arith-hard":
        return build_hard_evalset(n=limit or ARITH_EVAL_SIZE)
    if not data:
        raise ValueError(f"--bench {bench} needs --data PATH (e.g. ../shared/data/{bench})")
    if not Path(data).exists():
        raise ValueError(f"--data {data}: no such file or directory")
    if bench == "processbench":
        return evalsets.read_processbench(data, splits=splits, limit=limit)
    if bench == "realcritic":
        return evalsets.read_realcritic(data, splits=splits, limit=limit)
    return evalsets.read_eval_jsonl(data, limit=limit, split=split, render=_render_auto)


def _solution_text(item: EvalItem) -> str:
    return item.solution if item.solution is not None else _render_auto(item.steps)


def build_prompts(items: Sequence[EvalItem], mode: str, style: str = "compact") -> list[str]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "solve":
        return [solver_prompt(item.problem, style) for item in items]
    if mode == "contrastive":
        missing = [item.id for item in items if not item.reference]
        if missing:
            raise ValueError(f"--mode contrastive needs a reference solution; {len(missing)} items have none "
                             f"(first: {missing[0]})")
    return [critic_prompt(item.problem, _solution_text(item), item.reference if mode == "contrastive" else None,
                          style) for item in items]


def generate_all(backend: InferenceBackend, prompts: Sequence[str], sampling: SamplingParams, batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts += [g.text for g in backend.generate(chunk, sampling)]
        if on_batch:
            on_batch(len(chunk))
    return texts


def score_critiques(items: Sequence[EvalItem], critiques: Sequence[str]) -> list[ItemResult]:
    results = []
    for item, text in zip(items, critiques):
        critique = parse_critique(text)
        results.append(ItemResult(
            id=item.id, split=item.split, label=item.label,
            predicted=critique.first_error_step, parsed=critique.parsed,
            correction_answer=critique.answer,
            solution_answer=extract_final_answer(_solution_text(item)),
            judged_correct=critique.judged_correct, truth=item.answer,
        ))
    return results


def score_solutions(items: Sequence[EvalItem], solutions: Sequence[str]) -> dict[str, dict[str, Any]]:
    per_split: dict[str, list[bool]] = {}
    for item, text in zip(items, solutions):
        if item.answer is None:
            continue
        per_split.setdefault(item.split, []).append(answers_equal(extract_final_answer(text), item.answer))
    if not per_split:
        raise ValueError("--mode solve needs items with ground-truth answers")
    return {split: {"n": len(hits), "solve_acc": sum(hits) / len(hits)} for split, hits in per_split.items()}


def evaluate(backend: InferenceBackend, items: Sequence[EvalItem], mode: str = "direct", batch_size: int = 32,
             max_new_tokens: int = 512, style: str = "compact",
             on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Scores as ``{"splits": {name: metrics}, "average": metrics}`` (metrics as fractions)."""
    if not items:
        raise ValueError("no evaluation items")
    prompts = build_prompts(items, mode, style)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return score_texts(items, generate_all(backend, prompts, sampling, batch_size, on_batch), mode)


def eval_due(version: int, every: int, planned_versions: int, last_published: int | None = None) -> bool:
    """Whether the run's in-run evaluation scores ``version`` (``run.eval_every``): the seed (version 0),
    every ``every``-th version, the last one planned, and ``last_published`` (the run's last version,
    once it ended, also where the wall limit stopped it short of the plan). Each score shares the
    critic's engine with the loop, so scoring fewer versions leaves the loop more generation."""
    return version % every == 0 or version in (planned_versions, last_published)


def score_texts(items: Sequence[EvalItem], texts: Sequence[str], mode: str = "direct") -> dict[str, Any]:
    """Scores of the model's outputs for ``items`` (critiques, or solutions in ``solve`` mode), as
    ``{"splits": {name: metrics}, "average": metrics}``."""
    if mode == "solve":
        splits = score_solutions(items, texts)
        total = sum(m["n"] for m in splits.values())
        average = {"n": total, "solve_acc": sum(m["solve_acc"] for m in splits.values()) / len(splits)}
        return {"splits": splits, "average": average}
    per_split, average = aggregate(_group(score_critiques(items, texts)))
    return {"splits": per_split, "average": average}


def _group(results: list[ItemResult]) -> dict[str, list[ItemResult]]:
    from scrit.metrics import group_by_split

    return group_by_split(results)
