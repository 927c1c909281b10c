"""The generated pretraining corpus for the seed critic (DESIGN.md §5, "The seed model").

Every example is (prompt, target) in exactly the formats the running system uses: solver solutions,
contrastive critiques (reference given) and, as a small minority, direct critiques. The share of
direct critiques is kept small on purpose: the seed's direct critique must be clearly weaker than its
contrastive one, and closing that gap is the job of self-evolution.

Step labels are used here to *write* the corpus (this is the seed model's pretraining, outside the
loop); the self-play loop never sees them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from scrit.domains import arith
from scrit.domains.arith import generate_split_problem
from scrit.prompts import critic_prompt, render_critique, solver_prompt

# Corpus mixes (shares of examples), documented in the README. Phase 1 teaches the formats, copying
# and comparing; phase 2 (from phase 1's weights) shifts weight to arithmetic: solver solutions and
# dense drills of correct steps, while still rehearsing critiques so phase 1's skills stay.
DEFAULT_MIX = {"solver": 0.30, "contrastive": 0.63, "direct": 0.07}
PHASE2_MIX = {"solver": 0.35, "drill": 0.35, "contrastive": 0.23, "direct": 0.07}
# Phase 3 (from phase 2's weights): long drill rows, so arithmetic holds deep into a sequence, where a
# direct critique's "expected" steps and its correction sit (300-700 characters in).
PHASE3_MIX = {"solver": 0.25, "long_drill": 0.35, "contrastive": 0.33, "direct": 0.07}
# The careless solver (a separate checkpoint, fine-tuned from the seed): its solutions carry misread
# operands, operations and numbers as well as slips, so the loop sees all four kinds of error.
CARELESS_MIX = {"careless_solver": 1.0}
DRILL_HEADER = "Compute each step.\n"
INCORRECT_SHARE = 0.6  # share of critique examples whose student solution has a wrong step
CARELESS_ERROR_SHARE = 0.6  # share of the careless solver's training solutions with one wrong step
LONG_DRILL_PROBLEMS = (8, 16)  # problems per long drill row (~300-900 characters)


@dataclass(frozen=True)
class Example:
    kind: str  # solver | drill | long_drill | contrastive | direct | careless_solver
    prompt: str
    target: str
    reference_span: tuple[int, int] | None = None  # where the (correct) reference sits in the prompt


def arith_critique(problem: arith.ArithProblem, student_steps: list[str], contrastive: bool) -> str:
    """The canonical critique of a student solution, as the corpus teaches it.

    Each step line spells the student's step and the step expected at that point: copied from the
    reference in contrastive mode, recomputed from the problem (starting from the last correct value)
    in direct mode. For arith both give the same text; they differ in where the model must find it.
    """
    correct = problem.correct_steps()
    first_error = arith.first_wrong_step(problem, student_steps)
    last = len(student_steps) if first_error < 0 else first_error + 1
    checks = [f"{student_steps[i]}, expected {correct[i]}" for i in range(last)]
    correction_lines = None
    if first_error >= 0:
        # The correction keeps the student's step numbers from the first wrong step on.
        correction_lines = "\n".join(
            f"Step {first_error + 1 + i}: {step}" for i, step in enumerate(correct[first_error:])
        )
    return render_critique(checks, first_error, correction_lines, str(problem.answer))


def solver_example(problem: arith.ArithProblem) -> Example:
    return Example("solver", solver_prompt(problem.text), arith.render_solution(problem.correct_steps()))


def critique_example(rng: random.Random, problem: arith.ArithProblem, contrastive: bool) -> Example:
    if rng.random() < INCORRECT_SHARE:
        student, _ = arith.wrong_solution(rng, problem)
    else:
        student = problem.correct_steps()
    solution = arith.render_solution(student)
    reference = arith.render_solution(problem.correct_steps()) if contrastive else None
    prompt = critic_prompt(problem.text, solution, reference)
    span = None
    if reference is not None:
        start = prompt.index(reference)
        span = (start, start + len(reference))
    target = arith_critique(problem, student, contrastive)
    return Example("contrastive" if contrastive else "direct", prompt, target, span)


def drill_example(rng: random.Random, first: arith.ArithProblem, problems: int = 4, kind: str = "drill") -> Example:
    """Correct steps of several training problems, one per line: arithmetic practice at ~25 facts a row."""
    steps = list(first.correct_steps())
    for _ in range(problems - 1):
        steps += generate_split_problem(rng, "train").correct_steps()
    return Example(kind, DRILL_HEADER, "\n".join(steps))


def careless_solver_example(rng: random.Random, problem: arith.ArithProblem) -> Example:
    """A solver example whose solution, CARELESS_ERROR_SHARE of the time, has one wrong step of a
    random kind at a random step (later steps follow from the wrong value): the careless solver's
    training data. Only its own sampling, never a program, puts errors in its loop solutions."""
    steps = problem.correct_steps()
    if rng.random() < CARELESS_ERROR_SHARE:
        steps, _ = arith.wrong_solution(rng, problem)
    return Example("careless_solver", solver_prompt(problem.text), arith.render_solution(steps))


def sample_example(rng: random.Random, mix: dict[str, float] = DEFAULT_MIX) -> Example:
    problem = generate_split_problem(rng, "train")
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "solver":
        return solver_example(problem)
    if kind == "drill":
        return drill_example(rng, problem)
    if kind == "long_drill":
        return drill_example(rng, problem, rng.randint(*LONG_DRILL_PROBLEMS), kind="long_drill")
    if kind == "careless_solver":
        return careless_solver_example(rng, problem)
    return critique_example(rng, problem, contrastive=(kind == "contrastive"))
