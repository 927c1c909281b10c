"""The critique parser: the canonical format round-trips, and the parser is tolerant but honest."""

from __future__ import annotations

import random
import time

import pytest

from scrit.domains import arith
from scrit.parsing import ParsedCritique, parse_critique
from scrit.prompts import render_critique, strip_reference_analysis
from scrit.seed.corpus import arith_critique

PROBLEM = arith.ArithProblem(12, (("+", 5), ("*", 3), ("-", 4), ("+", 9)))
CHECKS = [f"{s}, expected {s}" for s in PROBLEM.correct_steps()]


def _judgment(p: ParsedCritique) -> tuple:
    return p.parsed, p.judged_correct, p.first_error_step, p.step_verdicts


def _assert_consistent(p: ParsedCritique) -> None:
    """Invariants every parse result must satisfy, whatever the input."""
    assert isinstance(p, ParsedCritique)
    if p.parsed:
        assert p.error is None
        assert isinstance(p.judged_correct, bool)
        if p.judged_correct:
            assert p.first_error_step == -1
        else:
            assert p.first_error_step >= 0
    else:
        assert p.first_error_step == -1
        assert p.error
    assert all(isinstance(v, bool) for v in p.step_verdicts)


def _critique(first_error: int, reference_analysis: str | None = None, answer: str = "56") -> str:
    correction = None
    if first_error >= 0:
        correction = "\n".join(
            f"Step {first_error + 1 + i}: {s}" for i, s in enumerate(PROBLEM.correct_steps()[first_error:])
        )
    return render_critique(CHECKS, first_error, correction, answer, reference_analysis)


# --- the canonical format -------------------------------------------------------------------------


@pytest.mark.parametrize("reference_analysis", [None, "the reference's steps give 56; compare each step with it"])
@pytest.mark.parametrize("first_error", [-1, 0, 1, 2, 3])
def test_canonical_round_trip(first_error, reference_analysis):
    text = _critique(first_error, reference_analysis)
    assert text.startswith("Reference analysis: ") == (reference_analysis is not None)
    p = parse_critique(text)
    _assert_consistent(p)
    assert p.parsed
    assert p.answer == "56"
    if first_error < 0:
        assert p.judged_correct is True
        assert p.first_error_step == -1
        assert p.step_verdicts == [True] * len(CHECKS)
        assert p.correction is not None and p.correction.startswith("none needed")
    else:
        assert p.judged_correct is False
        assert p.first_error_step == first_error
        assert p.step_verdicts == [True] * first_error + [False]
        assert p.correction is not None
        assert p.correction.startswith(f"Step {first_error + 1}: {PROBLEM.correct_steps()[first_error]}")


def test_canonical_exact_text():
    text = render_critique(["12 + 5 = 17, expected 12 + 5 = 17", "17 * 3 = 52, expected 17 * 3 = 51"], 1,
                           "Step 2: 17 * 3 = 51\nStep 3: 51 - 4 = 47", "47")
    assert text == (
        "Step 1: 12 + 5 = 17, expected 12 + 5 = 17: correct\n"
        "Step 2: 17 * 3 = 52, expected 17 * 3 = 51: wrong\n"
        "Conclusion: incorrect, first wrong step 2\n"
        "Correction:\n"
        "Step 2: 17 * 3 = 51\n"
        "Step 3: 51 - 4 = 47\n"
        "The answer is \\boxed{47}."
    )
    p = parse_critique(text)
    assert (p.judged_correct, p.first_error_step, p.step_verdicts, p.answer) == (False, 1, [True, False], "47")
    assert p.correction == "Step 2: 17 * 3 = 51\nStep 3: 51 - 4 = 47\nThe answer is \\boxed{47}."


def test_reference_analysis_wording_does_not_leak_into_the_judgment():
    # the reference analysis talks about the reference, not the student: it must not set the verdict
    text = _critique(-1, "in the reference, the first wrong step 2 would be 17 * 3 = 52: wrong")
    p = parse_critique(text)
    assert (p.parsed, p.judged_correct, p.first_error_step) == (True, True, -1)
    assert p.step_verdicts == [True] * len(CHECKS)


@pytest.mark.parametrize("contrastive", [True, False])
def test_corpus_critiques_parse_to_the_true_label(contrastive):
    rng = random.Random(2024 + contrastive)
    n_wrong = n_right = 0
    for _ in range(400):
        problem = arith.generate_problem(rng)
        if rng.random() < 0.6:
            student, index = arith.wrong_solution(rng, problem)
            n_wrong += 1
        else:
            student, index = problem.correct_steps(), -1
            n_right += 1
        assert arith.first_wrong_step(problem, student) == index
        text = arith_critique(problem, student, contrastive)
        p = parse_critique(text)
        _assert_consistent(p)
        assert p.parsed, text
        assert p.first_error_step == index, text
        assert p.judged_correct is (index < 0)
        assert p.answer == str(problem.answer)
        expected = [True] * len(student) if index < 0 else [True] * index + [False]
        assert p.step_verdicts == expected
        if index >= 0:
            assert arith.split_steps(p.correction) == problem.correct_steps()[index:]
    assert n_wrong > 100 and n_right > 100


# --- tolerance ------------------------------------------------------------------------------------

WRONG_AT_2 = _critique(2)  # first wrong step is Step 3 in text, index 2


@pytest.mark.parametrize(
    "transform",
    [
        str.lower,
        lambda t: t.replace("Step", "STEP").replace("Conclusion", "CONCLUSION").replace("wrong", "WRONG"),
        lambda t: t.replace(" ", "   "),
        lambda t: t.replace(": ", " :  ").replace("\n", "  \n  "),
        lambda t: t.replace("\n", "\r\n"),
        lambda t: t.replace("Conclusion:", "## Conclusion:"),
        lambda t: t.replace("Conclusion:", "## Conclusion\n"),
        lambda t: t.replace("Conclusion:", "**Conclusion:**"),
        lambda t: t.replace("Conclusion:", "**Conclusion**:"),
        lambda t: t.replace("Step ", "### Step "),
        lambda t: t.replace("Step ", "- Step "),
        lambda t: t.replace("Correction:", "## Correction"),
        lambda t: "Let me check the solution.\n\n" + t,
        lambda t: t + "\n\n",
    ],
)
def test_variants_of_an_incorrect_critique(transform):
    text = transform(WRONG_AT_2)
    p = parse_critique(text)
    _assert_consistent(p)
    assert (p.parsed, p.judged_correct, p.first_error_step) == (True, False, 2), text
    assert p.step_verdicts == [True, True, False]
    assert p.answer == "56"


@pytest.mark.parametrize(
    "transform",
    [
        str.upper,  # \BOXED is not a box: only the judgment is compared
        lambda t: t.replace(" ", "  "),
        lambda t: t.replace("\n", "\r\n"),
        lambda t: t.replace("Conclusion:", "## Conclusion\n"),
        lambda t: t.replace("Conclusion:", "**Conclusion:**"),
    ],
)
def test_variants_of_a_correct_critique(transform):
    text = transform(_critique(-1))
    p = parse_critique(text)
    _assert_consistent(p)
    assert (p.parsed, p.judged_correct, p.first_error_step) == (True, True, -1), text
    assert p.step_verdicts == [True] * len(CHECKS)


def test_windows_line_endings_parse_identically():
    for first_error in (-1, 0, 3):
        text = _critique(first_error, "ref")
        assert parse_critique(text.replace("\n", "\r\n")) == parse_critique(text)


@pytest.mark.parametrize(
    ("text", "judged", "first_error"),
    [
        ("**Conclusion:** incorrect, first wrong step 3", False, 2),
        ("## Conclusion: incorrect, first wrong step 3", False, 2),
        ("## Conclusion\nIncorrect, first wrong step 3", False, 2),
        ("## Conclusion\n\nCorrect, no wrong step", True, -1),
        ("### Verdict\nThe solution is correct.", True, -1),
        ("conclusion:correct,no wrong step", True, -1),
        ("  CONCLUSION :  INCORRECT ,  FIRST WRONG STEP  4", False, 3),
        ("Conclusion: Incorrect. The first wrong step is Step 2.", False, 1),
        ("Conclusion: incorrect, first wrong step \\boxed{3}", False, 2),
        ("Step 1 - correct\nStep 2 - wrong", False, 1),
        ("Step 1) ok\nStep 2. Wrong!", False, 1),
        ("**Step 1:** 2 + 3 = 5 — **correct**\n**Step 2:** 5 * 2 = 11 — **wrong**", False, 1),
        ("Step 1: 2 + 3 = 5 is not correct", False, 0),
        ("Step 1: fine: correct\nStep 2: 5 * 2 = 11 is not right", False, 1),
        ("Step 1: correct\nStep 2: correct", True, -1),  # no conclusion: falls back to the step verdicts
        ("Step 1: correct\nStep 2: wrong\nStep 3: correct", False, 1),
        ("Step 1: 2 + 3 = 6, expected 2 + 3 = 5: wrong\nConclusion: incorrect", False, 0),
        ("The first error step number: 4", False, 3),
        ("Some analysis.\nThe first error step number: 4\n\\boxed{12}", False, 3),
        ("The first error step number: -1", True, -1),
        ("The first error step number: -1\nThe answer is \\boxed{7}.", True, -1),
        ("Analysis...\nthe first incorrect step is step 2\nCorrected solution: ... \\boxed{8}", False, 1),
    ],
)
def test_tolerated_forms(text, judged, first_error):
    p = parse_critique(text)
    _assert_consistent(p)
    assert p.parsed, p.error
    assert (p.judged_correct, p.first_error_step) == (judged, first_error)


def test_trailing_boxed_answer_is_read_and_does_not_change_the_judgment():
    base = parse_critique(WRONG_AT_2)
    p = parse_critique(WRONG_AT_2 + "\n\nFinal answer: \\boxed{48}")
    assert _judgment(p) == _judgment(base)
    assert (base.answer, p.answer) == ("56", "48")
    p = parse_critique("The first error step number: 2\n\\boxed{17}")
    assert (p.first_error_step, p.answer) == (1, "17")


def test_conclusion_lines_after_the_correction_are_not_read_as_judgments():
    text = _critique(-1) + "\nStep 9: this is wrong\nConclusion: incorrect, first wrong step 1"
    p = parse_critique(text)
    assert (p.judged_correct, p.first_error_step) == (True, -1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\n  ",
        "I am not sure what to say.",
        "lorem ipsum dolor sit amet\n12 + 5 = 17",
        "Conclusion:",
        "## Conclusion\n\nHmm.",
        "Step 1: 12 + 5 = 17",
        "The answer is \\boxed{47}.",
    ],
)
def test_unparseable(text):
    p = parse_critique(text)
    _assert_consistent(p)
    assert not p.parsed
    assert p.judged_correct is None


@pytest.mark.parametrize(
    "text",
    ["Conclusion: incorrect", "Conclusion: the solution is wrong.", "Step 1: fine: correct\nConclusion: incorrect"],
)
def test_judged_incorrect_without_a_step_is_unparseable(text):
    p = parse_critique(text)
    _assert_consistent(p)
    assert not p.parsed
    assert p.judged_correct is False
    assert "without a wrong step" in p.error


@pytest.mark.parametrize("first_error", [-1, 0, 2])
@pytest.mark.parametrize("reference_analysis", [None, "compare with the reference answer 56"])
def test_every_prefix_parses_consistently_or_not_at_all(first_error, reference_analysis):
    text = _critique(first_error, reference_analysis)
    conclusion_end = text.index("\n", text.index("Conclusion:"))
    n_parsed = 0
    for end in range(len(text) + 1):
        p = parse_critique(text[:end])
        _assert_consistent(p)
        if p.parsed:
            n_parsed += 1
            # a prefix never invents a different error: it is either "no wrong step so far" or the truth
            assert p.first_error_step in (-1, first_error), text[:end]
        if end >= conclusion_end:
            assert (p.parsed, p.judged_correct, p.first_error_step) == (True, first_error < 0, first_error)
    assert n_parsed > len(text) // 2


def test_random_garbage_never_raises_and_is_consistent():
    rng = random.Random(0)
    vocab = ["Step", "step", " ", "1", "2", "-1", ":", "-", "wrong", "correct", "not", "Conclusion", "Correction",
             "first", "error", "number", "\n", "\r\n", "#", "**", "\\boxed{", "}", "{", "none", "Reference analysis",
             "é", "\t", "ok", "is", "=", "\\fbox", "verdict"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\r", "\u2028", "\x00", "ü", "日"]
    for _ in range(1500):
        if rng.random() < 0.5:
            text = "".join(rng.choice(vocab) for _ in range(rng.randint(0, 40)))
        else:
            text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 200)))
        _assert_consistent(parse_critique(text))


@pytest.mark.parametrize(
    "text",
    [
        "The first wrong" + " " * 5000 + "x",
        "first error step" + " " * 5000 + "number" + " " * 5000,
        "Conclusion:" + " " * 5000 + "**" + " " * 5000 + "x",
        "#" * 5000 + "Step" + " " * 5000 + "x",
        "Step 1: correct\n" * 5000,
    ],
)
def test_pathological_input_is_fast(text):
    start = time.perf_counter()
    _assert_consistent(parse_critique(text))
    assert time.perf_counter() - start < 1.0


# --- strip_reference_analysis ---------------------------------------------------------------------


@pytest.mark.parametrize("first_error", [-1, 0, 3])
def test_strip_reference_analysis_removes_only_that_line(first_error):
    with_ref = _critique(first_error, "the reference gets 56; Reference steps are fine")
    without = _critique(first_error)
    assert with_ref != without
    stripped = strip_reference_analysis(with_ref)
    assert stripped == without
    assert "reference" not in stripped.lower()
    assert strip_reference_analysis(without) == without  # nothing to strip: unchanged, exactly
    assert parse_critique(stripped) == parse_critique(without)


def test_strip_reference_analysis_on_corpus_critique_and_edge_cases():
    problem = arith.generate_problem(random.Random(5))
    student, _ = arith.wrong_solution(random.Random(6), problem, 1, "result")
    body = arith_critique(problem, student, contrastive=True)
    assert strip_reference_analysis("Reference analysis: fine\n" + body) == body
    assert strip_reference_analysis("## Reference analysis: fine\n" + body) == body
    assert strip_reference_analysis(body + "\n") == body + "\n"  # untouched when absent
    assert strip_reference_analysis("") == ""
    assert strip_reference_analysis("Reference analysis: only this") == ""
    text = "Reference analysis: a\nmore analysis\nConclusion: correct, no wrong step\nCorrection: none needed"
    assert strip_reference_analysis(text) == "Conclusion: correct, no wrong step\nCorrection: none needed"
