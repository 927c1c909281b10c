"""Self-play logic without Ray or models: labelling, selection, pairing, correction, training examples."""

from __future__ import annotations

import inspect
import random
from pathlib import Path

import pytest

from scrit import selfplay
from scrit.domains.arith import ArithDomain
from scrit.domains.gsm8k import GSM8KDomain
from scrit.messages import Correction, Problem, Solution
from scrit.prompts import CORRECTION_MARKER, corrector_prompt, critic_prompt
from scrit.selfplay import (
    complete_critique,
    corrected_solution,
    critique_from_text,
    label_solution,
    make_requests,
    select_for_critique,
    training_example,
    verdict_matches_label,
)

ARITH = ArithDomain()
QUESTION = "Start with 12. Add 5. Multiply by 3. Subtract 4. What is the result?"
GOOD = "Step 1: 12 + 5 = 17\nStep 2: 17 * 3 = 51\nStep 3: 51 - 4 = 47\nThe answer is \\boxed{47}."
BAD = "Step 1: 12 + 5 = 17\nStep 2: 17 * 3 = 52\nStep 3: 52 - 4 = 48\nThe answer is \\boxed{48}."
REFERENCE = GOOD


def problem(pid: str = "p1", reference: str | None = None) -> Problem:
    return Problem(id=pid, domain="arith", question=QUESTION, answer="47", reference=reference)


def sol(text: str, solver: str = "s", pid: str = "p1", version: int = 0) -> Solution:
    return label_solution(ARITH, problem(pid), text, solver, version)


# ------------------------------------------------------------------------------------------------
# Labelling and selection


def test_label_solution_uses_final_answer_only() -> None:
    good, bad = sol(GOOD, version=3), sol(BAD)
    assert good.correct and good.answer == "47" and good.version == 3
    assert good.steps == ["12 + 5 = 17", "17 * 3 = 51", "51 - 4 = 47"]
    assert not bad.correct and bad.answer == "48"
    # Wrong steps but the right final answer: labelled correct (no step labels inside the loop).
    lucky = sol("Step 1: 12 + 5 = 18\nStep 2: 18 * 3 = 51\nStep 3: 51 - 4 = 47\nThe answer is \\boxed{47}.")
    assert lucky.correct
    assert not sol("no answer at all").correct


def test_select_keeps_only_mixed_problems_and_caps_per_solver_and_class() -> None:
    by_problem = {
        "mixed": [sol(GOOD, "a", "mixed"), sol(BAD, "a", "mixed")] + [sol(BAD, "b", "mixed") for _ in range(5)],
        "all_good": [sol(GOOD, "a", "all_good") for _ in range(3)],
        "all_bad": [sol(BAD, "a", "all_bad") for _ in range(3)],
        "empty": [],
    }
    chosen = select_for_critique(by_problem, max_per_class=2, rng=random.Random(0))
    assert set(chosen) == {"mixed"}
    kept = chosen["mixed"]
    counts = {(s.solver, s.correct): sum(1 for t in kept if (t.solver, t.correct) == (s.solver, s.correct)) for s in kept}
    assert counts == {("a", True): 1, ("a", False): 1, ("b", False): 2}
    # Kept solutions are the input objects, in input order.
    positions = [next(i for i, s in enumerate(by_problem["mixed"]) if s is k) for k in kept]
    assert positions == sorted(positions)
    with pytest.raises(ValueError):
        select_for_critique(by_problem, 0, random.Random(0))


# ------------------------------------------------------------------------------------------------
# Pairs


def test_contrastive_pairs() -> None:
    good1, good2, bad1, bad2 = sol(GOOD, "a"), sol(GOOD + " ", "b"), sol(BAD, "a"), sol(BAD, "b")
    requests = make_requests(problem(), [good1, bad1, good2, bad2], random.Random(0), "contrastive")
    assert len(requests) == 4
    for request in requests:
        assert request.mode == "contrastive"
        assert request.reference is not None and request.reference.correct
        assert request.reference is not request.solution
    students = [r.solution for r in requests]
    assert sum(s is bad1 for s in students) == 1 and sum(s is bad2 for s in students) == 1
    by_student = {id(r.solution): r.reference for r in requests}
    assert by_student[id(good1)] is good2 and by_student[id(good2)] is good1


def test_single_correct_solution_uses_problem_reference_or_is_skipped() -> None:
    good, bad = sol(GOOD), sol(BAD)
    without = make_requests(problem(), [good, bad], random.Random(0), "contrastive")
    assert [r.solution for r in without] == [bad]  # the correct one has no other correct reference
    assert without[0].reference is good
    with_ref = make_requests(problem(reference=REFERENCE), [good, bad], random.Random(0), "contrastive")
    assert len(with_ref) == 2
    (own,) = [r for r in with_ref if r.solution is good]
    assert own.reference is not None and own.reference.solver == selfplay.REFERENCE_SOLVER
    assert own.reference.text == REFERENCE and own.reference.correct


def test_direct_mode_has_no_reference() -> None:
    solutions = [sol(GOOD), sol(BAD), sol(BAD, "b")]
    requests = make_requests(problem(reference=REFERENCE), solutions, random.Random(0), "direct")
    assert [r.solution for r in requests] == solutions
    assert all(r.reference is None and r.mode == "direct" for r in requests)
    with pytest.raises(ValueError):
        make_requests(problem(), solutions, random.Random(0), "oracle")  # type: ignore[arg-type]


def test_bug_injection_student_differs_from_reference() -> None:
    good, bad = sol(GOOD, "a"), sol(BAD, "a")
    requests = make_requests(problem(), [good, bad], random.Random(1), "bug_injection")
    injected = [r for r in requests if r.solution is not good]
    assert injected, "arith must inject a bug into the correct solution"
    for request in injected:
        assert request.mode == "bug_injection"
        assert request.reference is good
        assert request.solution is not bad  # the solvers' own incorrect solutions are not used
        assert request.solution.text != good.text
        assert request.solution.steps != good.steps
        assert not request.solution.correct  # labelled by its final answer, like any solution
        assert request.solution.solver == "a+bug"
    # GSM8K has no injector: no injected students.
    gsm = Problem(id="g", domain="gsm8k", question="2+2?", answer="4")
    gsm_good = label_solution(GSM8KDomain(), gsm, "2+2=4\nThe answer is \\boxed{4}.", "a", 0)
    assert make_requests(gsm, [gsm_good], random.Random(0), "bug_injection") == []


# ------------------------------------------------------------------------------------------------
# Corrections and training examples

HEAD = (
    "Step 1: 12 + 5 = 17, expected 12 + 5 = 17: correct\n"
    "Step 2: 17 * 3 = 52, expected 17 * 3 = 51: wrong\n"
    "Conclusion: incorrect, first wrong step 2\n"
    "Correction:"
)
TAIL = "\nStep 2: 17 * 3 = 51\nStep 3: 51 - 4 = 47\nThe answer is \\boxed{47}."


def test_corrected_solution_arith() -> None:
    student = sol(BAD)
    partial = critique_from_text("p1", "contrastive", HEAD, version=2)
    assert partial.parsed and partial.first_error_step == 1
    fix = Correction(problem_id="p1", text=TAIL, steps=ARITH.split_steps(TAIL), answer="47", version=2)
    full = complete_critique(partial, fix)
    assert full.raw_text == HEAD + TAIL and full.version == 2
    assert full.correction is not None and full.answer == "47"
    assert corrected_solution(ARITH, student, full) == GOOD
    # A correction that stays wrong is rendered faithfully (the validator will reject it).
    wrong_tail = "\nStep 2: 17 * 3 = 50\nStep 3: 50 - 4 = 46\nThe answer is \\boxed{46}."
    wrong = complete_critique(partial, Correction(problem_id="p1", text=wrong_tail, steps=[], answer="46", version=2))
    assert corrected_solution(ARITH, student, wrong).endswith("Step 3: 50 - 4 = 46\nThe answer is \\boxed{46}.")


def test_corrected_solution_judged_correct_and_unparseable() -> None:
    student = sol(GOOD)
    text = ("Step 1: a: correct\nStep 2: b: correct\nStep 3: c: correct\nConclusion: correct, no wrong step\n"
            "Correction: none needed\nThe answer is \\boxed{47}.")
    assert corrected_solution(ARITH, student, critique_from_text("p1", "direct", text, 0)) == student.text
    junk = critique_from_text("p1", "direct", "qwerty", 0)
    assert not junk.parsed
    with pytest.raises(ValueError):
        corrected_solution(ARITH, student, junk)


def test_verdict_must_agree_with_the_final_answer_label() -> None:
    says_correct = critique_from_text("p1", "contrastive", "Step 1: a: correct\nStep 2: b: correct\nStep 3: c: correct\n"
                                      "Conclusion: correct, no wrong step\nCorrection: none needed", 0)
    says_wrong = critique_from_text("p1", "contrastive", HEAD, 0)
    assert says_correct.parsed and says_wrong.parsed
    assert verdict_matches_label(says_correct, sol(GOOD)) and verdict_matches_label(says_wrong, sol(BAD))
    assert not verdict_matches_label(says_wrong, sol(GOOD))  # "incorrect" for a right final answer
    assert not verdict_matches_label(says_correct, sol(BAD))  # "correct" for a wrong final answer
    assert not verdict_matches_label(critique_from_text("p1", "contrastive", "qwerty", 0), sol(GOOD))


def test_complete_critique_inserts_missing_marker() -> None:
    head = "Step 1: x: wrong\nConclusion: incorrect, first wrong step 1"
    partial = critique_from_text("p1", "direct", head, 0)
    full = complete_critique(partial, Correction(problem_id="p1", text=" Step 1: 12 + 5 = 17", steps=[],
                                                 answer=None, version=0))
    assert full.raw_text == head + "\nCorrection: Step 1: 12 + 5 = 17"
    assert full.first_error_step == 0 and full.correction == "Step 1: 12 + 5 = 17"


def test_corrected_solution_gsm8k_does_not_repeat_the_answer_line() -> None:
    domain = GSM8KDomain()
    gsm = Problem(id="g", domain="gsm8k", question="Tom has 3 apples and buys 2. How many?", answer="5")
    student = label_solution(domain, gsm, "Tom has 3 apples.\n3 + 2 = 6\nThe answer is \\boxed{6}.", "a", 0)
    text = ("Step 1: Tom has 3 apples: correct\nStep 2: 3 + 2 = 6: wrong\nConclusion: incorrect, first wrong step 2\n"
            "Correction:\n3 + 2 = 5\nThe answer is \\boxed{5}.")
    fixed = corrected_solution(domain, student, critique_from_text("g", "contrastive", text, 0))
    assert fixed == "Tom has 3 apples.\n3 + 2 = 5\nThe answer is \\boxed{5}."


def test_training_example_has_no_reference() -> None:
    student = sol(BAD)
    critique_text = "Reference analysis: the reference computes 17 * 3 = 51.\n" + HEAD + TAIL
    example = training_example(problem(reference=REFERENCE), student, critique_text, version=4)
    assert example.prompt == critic_prompt(QUESTION, BAD, None)
    assert "Reference" not in example.prompt and REFERENCE not in example.prompt
    assert "Reference analysis" not in example.target and "reference" not in example.target.lower()
    assert example.target == HEAD + TAIL  # verdicts + conclusion + the correction
    assert example.student_correct is False and example.version == 4 and example.problem_id == "p1"
    assert training_example(problem(), sol(GOOD), "Conclusion: correct, no wrong step", 0).student_correct
    instruct = training_example(problem(), student, HEAD + TAIL, 0, style="instruct")
    assert instruct.prompt == critic_prompt(QUESTION, BAD, None, "instruct")


def test_corrector_prompt_ends_in_one_marker() -> None:
    prompt = corrector_prompt(QUESTION, BAD, HEAD)
    assert prompt.endswith("\n" + CORRECTION_MARKER)
    assert prompt.count(CORRECTION_MARKER) == 1
    assert "Reference" not in prompt and BAD in prompt and QUESTION in prompt


def test_loop_code_uses_no_step_labels() -> None:
    """Integrity rule: the loop's code (roles, stage actors, pipeline, driver, trainer, problem source)
    never calls the step-label oracle or the seed's teacher critique."""
    root = Path(selfplay.__file__).resolve().parents[1]
    loop_files = [root / "scrit" / "problems.py", *sorted((root / "actors").glob("*.py")),
                  *sorted((root / "train").glob("*.py"))]
    assert {"pipeline.py", "run.py", "roles.py", "shells.py", "trainer.py"} <= {p.name for p in loop_files}
    sources = [inspect.getsource(selfplay)] + [path.read_text() for path in loop_files]
    for source in sources:
        assert "first_wrong_step" not in source
        assert "arith_critique" not in source
        assert "scrit.seed.corpus" not in source
