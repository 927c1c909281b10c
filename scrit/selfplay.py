"""The Ray-free logic of one self-play round (DESIGN.md §1): labelling, pairing, correction, examples.

Everything here is a pure function of its inputs (plus an explicit ``random.Random``), so the
distributed pipeline and the tests run exactly the same decisions.

**Integrity rule.** The only supervision used here is each problem's final answer (``label_solution``)
and reference solutions, which are just correct solutions. Nothing in this module looks at step labels
or computes a programmatic critique; whether a critique is kept is decided by the critic's own
validation of its correction (``ValidatorRole``), never by an oracle.

One round, as the pipeline wires it::

    solutions  = [label_solution(...)]                     # solver output, labelled by answer only
    chosen     = select_for_critique(by_problem, k, rng)   # problems with both classes
    requests   = make_requests(problem, chosen[pid], rng, mode)
    critiques  = critic.critique(requests)                 # up to "Correction:"
    fixes      = corrector.correct(requests, critiques)    # the rest of the critique
    full       = complete_critique(critique, fix)          # one canonical critique
    corrected  = corrected_solution(domain, student, full)
    verdicts   = validator.validate(problems, corrected)   # direct critique, no reference
    examples   = [training_example(...) for kept ones]     # prompt without reference
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal

from scrit.domains.base import Domain
from scrit.messages import Correction, Critique, CritiqueRequest, Problem, Solution, StepVerdict, TrainingExample
from scrit.parsing import parse_critique
from scrit.prompts import CORRECTION_MARKER, critic_prompt, strip_reference_analysis

__all__ = [
    "MODES",
    "REFERENCE_SOLVER",
    "complete_critique",
    "corrected_solution",
    "critique_from_text",
    "get_domain",
    "inject_error",
    "label_solution",
    "make_requests",
    "reference_solution",
    "select_for_critique",
    "training_example",
    "verdict_matches_label",
]

Mode = Literal["contrastive", "direct", "bug_injection"]
MODES: tuple[str, ...] = ("contrastive", "direct", "bug_injection")
REFERENCE_SOLVER = "reference"  # ``Solution.solver`` of a problem's own reference solution


def get_domain(name: str) -> Domain:
    """The domain object for a ``Problem.domain`` name (imports stay light: no torch, no Ray)."""
    if name == "arith":
        from scrit.domains.arith import ArithDomain

        return ArithDomain()
    if name == "gsm8k":
        from scrit.domains.gsm8k import GSM8KDomain

        return GSM8KDomain()
    raise ValueError(f"unknown domain {name!r} (expected 'arith' or 'gsm8k')")


# ------------------------------------------------------------------------------------------------
# Solutions


def label_solution(domain: Domain, problem: Problem, text: str, solver: str, version: int) -> Solution:
    """A solver's output as a Solution, marked correct by its final answer alone (never by steps)."""
    answer = domain.extract_answer(text)
    return Solution(
        problem_id=problem.id,
        solver=solver,
        text=text,
        steps=domain.split_steps(text),
        answer=answer,
        correct=domain.answers_equal(answer, problem.answer),
        version=int(version),
    )


def reference_solution(domain: Domain, problem: Problem) -> Solution | None:
    """The problem's own reference as a Solution (solver ``"reference"``), or None if it has none.

    Labelled by its final answer like any solution, so a reference whose answer does not match the
    problem's (a data error) is never used as a correct reference.
    """
    if not problem.reference:
        return None
    return label_solution(domain, problem, problem.reference, REFERENCE_SOLVER, 0)


def select_for_critique(
    solutions_by_problem: Mapping[str, Sequence[Solution]],
    max_per_class: int,
    rng: random.Random,
) -> dict[str, list[Solution]]:
    """Problems worth critiquing, with at most ``max_per_class`` solutions per (solver, class).

    Only problems with at least one correct and one incorrect solution are kept: those are where the
    contrast between a correct reference and a wrong student exists, and where the correct solutions
    are not mere luck on an unsolvable problem. The per-solver cap stops one prolific solver (or one
    easy problem) from dominating the data; which ones are kept is drawn with ``rng``, and the kept
    solutions stay in their input order.
    """
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    chosen: dict[str, list[Solution]] = {}
    for problem_id, solutions in solutions_by_problem.items():
        solutions = list(solutions)
        if not any(s.correct for s in solutions) or all(s.correct for s in solutions):
            continue
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for index, solution in enumerate(solutions):
            groups[(solution.solver, solution.correct)].append(index)
        keep: set[int] = set()
        for indices in groups.values():
            keep.update(indices if len(indices) <= max_per_class else rng.sample(indices, max_per_class))
        chosen[problem_id] = [solutions[i] for i in sorted(keep)]
    return chosen


def inject_error(domain: Domain, problem: Problem, solution: Solution, rng: random.Random) -> Solution | None:
    """The domain's bug injector (``domain.inject_error``), or None where the domain has none."""
    hook = getattr(domain, "inject_error", None)
    return None if hook is None else hook(problem, solution, rng)


def _pick_reference(candidates: Sequence[Solution], student: Solution, rng: random.Random) -> Solution | None:
    """A correct solution other than ``student`` itself, preferring one whose text differs from it."""
    others = [c for c in candidates if c is not student]
    different = [c for c in others if c.text.strip() != student.text.strip()]
    pool = different or others
    return rng.choice(pool) if pool else None


def make_requests(
    problem: Problem,
    solutions: Sequence[Solution],
    rng: random.Random,
    mode: Mode = "contrastive",
    domain: Domain | None = None,
) -> list[CritiqueRequest]:
    """Critique requests for one problem's selected solutions.

    * ``contrastive`` (default, the paper's method): every incorrect solution is paired with a
      correct reference drawn from the correct solutions (or, with none, the problem's own reference);
      every correct solution with a *different* correct solution as reference, else the problem's
      reference, else it is skipped (a solution never serves as its own reference).
    * ``direct``: one request per solution, no reference (the no-contrast ablation).
    * ``bug_injection`` (the paper's baseline): each correct solution yields a student made by the
      domain's injector with the original as reference, plus the same correct-correct pairs as in
      contrastive mode so the buffer still gets correct students; the solvers' incorrect solutions
      are not used. Domains without an injector (GSM8K) yield only the correct-correct pairs.

    ``domain`` defaults to ``get_domain(problem.domain)``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown critique mode {mode!r} (expected one of {', '.join(MODES)})")
    domain = domain or get_domain(problem.domain)
    correct = [s for s in solutions if s.correct]
    incorrect = [s for s in solutions if not s.correct]
    requests: list[CritiqueRequest] = []
    if mode == "direct":
        return [CritiqueRequest(problem=problem, solution=s, reference=None, mode="direct") for s in solutions]

    own_reference = reference_solution(domain, problem)
    if own_reference is not None and not own_reference.correct:
        own_reference = None

    if mode == "contrastive":
        for student in incorrect:
            reference = rng.choice(correct) if correct else own_reference
            if reference is not None:
                requests.append(CritiqueRequest(problem=problem, solution=student, reference=reference, mode=mode))
    for student in correct:
        reference = _pick_reference(correct, student, rng) or own_reference
        if reference is not None and reference is not student:
            requests.append(CritiqueRequest(problem=problem, solution=student, reference=reference, mode=mode))
    if mode == "bug_injection":
        for original in correct:
            student = inject_error(domain, problem, original, rng)
            if student is not None and student.text.strip() != original.text.strip():
                requests.append(CritiqueRequest(problem=problem, solution=student, reference=original, mode=mode))
    return requests


# ------------------------------------------------------------------------------------------------
# Critiques and corrections


def critique_from_text(problem_id: str, mode: str, text: str, version: int) -> Critique:
    """Parse critique text into a Critique message (an unparseable text gives ``parsed=False``)."""
    parsed = parse_critique(text)
    return Critique(
        problem_id=problem_id,
        mode=mode,
        raw_text=text,
        parsed=parsed.parsed,
        step_verdicts=[StepVerdict(index, ok) for index, ok in enumerate(parsed.step_verdicts)],
        judged_correct=parsed.judged_correct,
        first_error_step=parsed.first_error_step,
        correction=parsed.correction,
        answer=parsed.answer,
        version=int(version),
    )


def complete_critique(critique: Critique, correction: Correction) -> Critique:
    """The full critique: the critic's text up to ``Correction:`` followed by the correction.

    Re-parsed as one text, so ``correction`` and ``answer`` come from the correction. The version is
    the critique's (the critic version that judged the steps).
    """
    head = critique.raw_text
    if not head.rstrip().endswith(CORRECTION_MARKER):
        # A critique that stopped without the marker: add it, so the correction is not read as part
        # of the last step line or the conclusion.
        head = head.rstrip("\n") + ("\n" if head.strip() else "") + CORRECTION_MARKER
    return critique_from_text(critique.problem_id, critique.mode, head + correction.text, critique.version)


def verdict_matches_label(critique: Critique, student: Solution) -> bool:
    """Whether the critique's conclusion agrees with the student's final-answer label.

    A critique calling a solution with the right final answer "incorrect" (or a wrong one "correct")
    contradicts the one supervision signal the loop has, so it is not worth validating or training on.
    This uses the final answer only, as the integrity rule allows; it says nothing about *which* step
    is wrong.
    """
    if not critique.parsed:
        return False
    judged = critique.judged_correct if critique.judged_correct is not None else critique.first_error_step == -1
    return bool(judged) == bool(student.correct)


def corrected_solution(domain: Domain, student: Solution, critique: Critique) -> str:
    """The student's solution as the critique corrects it.

    A critique that judged the solution correct leaves it unchanged. Otherwise: the student's steps
    before the critique's first wrong step, then the correction's steps, then the correction's final
    answer, rendered as a solution of the domain (for arith, ``Step k: ...`` lines and the boxed
    answer). Raises ValueError for an unparseable critique, which has no correction to apply.
    """
    if not critique.parsed or critique.judged_correct is None:
        raise ValueError("cannot correct a solution from an unparseable critique")
    if critique.judged_correct and critique.first_error_step < 0:
        return student.text
    correction = critique.correction or ""
    answer = domain.extract_answer(correction)
    steps = domain.split_steps(correction)
    if answer is not None:
        # GSM8K counts every line as a step; the answer line is rendered once, at the end.
        answer_line = domain.render_solution([], answer).strip()
        steps = [step for step in steps if step.strip() != answer_line]
    prefix = student.steps[: max(0, critique.first_error_step)]
    return domain.render_solution(prefix + steps, answer)


def training_example(
    problem: Problem, student: Solution, critique_text: str, version: int, style: str = "compact", batch_id: int = -1
) -> TrainingExample:
    """A kept critique as SFT data: input = problem + student (no reference), target = the critique.

    The trained critic must critique without a reference, so the prompt is the direct prompt and the
    reference-analysis section is dropped from the target; the target keeps the step verdicts, the
    conclusion and the correction. ``student_correct`` is the final-answer label, used by the replay
    buffer's 1:1 balance.
    """
    return TrainingExample(
        prompt=critic_prompt(problem.question, student.text, None, style),
        target=strip_reference_analysis(critique_text).strip(),
        student_correct=student.correct,
        problem_id=problem.id,
        version=int(version),
        solver=student.solver,
        batch_id=batch_id,
    )
