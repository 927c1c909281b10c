"""Role prompts: content verbatim, contrastive vs direct, prompt styles."""

from __future__ import annotations

import random

import pytest

from scrit.domains import arith
from scrit.prompts import (
    CONTRASTIVE_HEADER,
    DIRECT_HEADER,
    FORMAT_INSTRUCTIONS,
    INSTRUCT_CRITIQUE_TRAILER,
    SOLVER_FORMAT_INSTRUCTIONS,
    SOLVER_HEADER,
    critic_prompt,
    solver_prompt,
)

PROBLEM = arith.ArithProblem(12, (("+", 5), ("*", 3), ("-", 4)))
REFERENCE = arith.render_solution(PROBLEM.correct_steps())
STUDENT = arith.render_solution(["12 + 5 = 17", "17 * 3 = 52", "52 - 4 = 48"])
STYLES = ["compact", "instruct"]


def _cases():
    rng = random.Random(0)
    out = [(PROBLEM.text, STUDENT, REFERENCE)]
    for _ in range(20):
        problem = arith.generate_problem(rng)
        student, _ = arith.wrong_solution(rng, problem)
        out.append((problem.text, arith.render_solution(student), arith.render_solution(problem.correct_steps())))
    # non-arith text with characters that must survive untouched
    out.append(("Tom has $3$ apples {and} 50% more.\nHow many?", "Step 1: 3 * 1.5 = 4.5\n\\boxed{4.5}", "3+1.5=4.5"))
    return out


@pytest.mark.parametrize("style", STYLES)
def test_solver_prompt(style):
    for problem, _, _ in _cases():
        prompt = solver_prompt(problem, style=style)
        assert prompt.startswith(SOLVER_HEADER)
        assert f"\nProblem: {problem}\n" in prompt
        assert prompt.endswith("Solution:\n")
        assert "reference" not in prompt.lower() and "Critique" not in prompt
        assert (SOLVER_FORMAT_INSTRUCTIONS in prompt) == (style == "instruct")


def test_solver_prompt_exact_compact():
    assert solver_prompt(PROBLEM.text) == (
        "Solve the problem step by step.\n"
        "Problem: Start with 12. Add 5. Multiply by 3. Subtract 4. What is the result?\n"
        "Solution:\n"
    )


@pytest.mark.parametrize("style", STYLES)
def test_contrastive_prompt(style):
    for problem, student, reference in _cases():
        prompt = critic_prompt(problem, student, reference, style=style)
        assert prompt.startswith(CONTRASTIVE_HEADER)
        assert f"\nProblem: {problem}\n" in prompt
        assert f"\nReference:\n{reference}\n" in prompt
        assert f"\nStudent:\n{student}\n" in prompt
        assert prompt.index("Reference:") < prompt.index(reference) < prompt.index("Student:")
        trailer = INSTRUCT_CRITIQUE_TRAILER if style == "instruct" else ""
        assert prompt.endswith(f"{student}\n{trailer}Critique:\n")
        assert (FORMAT_INSTRUCTIONS in prompt) == (style == "instruct")


@pytest.mark.parametrize("style", STYLES)
def test_direct_prompt_never_mentions_a_reference(style):
    for problem, student, reference in _cases():
        prompt = critic_prompt(problem, student, style=style)
        assert prompt.startswith(DIRECT_HEADER)
        assert f"\nProblem: {problem}\n" in prompt
        assert f"\nStudent:\n{student}\n" in prompt
        assert "Reference" not in prompt and "reference" not in prompt
        if reference not in student:
            assert reference not in prompt
        trailer = INSTRUCT_CRITIQUE_TRAILER if style == "instruct" else ""
        assert prompt.endswith(f"{student}\n{trailer}Critique:\n")
        assert (FORMAT_INSTRUCTIONS in prompt) == (style == "instruct")
        assert prompt != critic_prompt(problem, student, reference, style=style)


def test_direct_prompt_exact_compact():
    assert critic_prompt("P?", "Step 1: 1 + 1 = 2") == (
        "Critique the student solution.\nProblem: P?\nStudent:\nStep 1: 1 + 1 = 2\nCritique:\n"
    )
    assert critic_prompt("P?", "S", "R") == (
        "Critique the student solution against the reference solution.\nProblem: P?\nReference:\nR\nStudent:\nS\n"
        "Critique:\n"
    )


def test_instruct_style_spells_out_the_format():
    for needle in ("Step k", ": correct", ": wrong", "Conclusion: correct, no wrong step",
                   "Conclusion: incorrect, first wrong step k", "Correction:", "\\boxed{"):
        assert needle in FORMAT_INSTRUCTIONS
    assert "\\boxed{" in SOLVER_FORMAT_INSTRUCTIONS and "Step k" in SOLVER_FORMAT_INSTRUCTIONS
    assert critic_prompt("P", "S", style="instruct").startswith(f"{DIRECT_HEADER} {FORMAT_INSTRUCTIONS}\n")
    assert critic_prompt("P", "S", "R", style="instruct").startswith(f"{CONTRASTIVE_HEADER} {FORMAT_INSTRUCTIONS}\n")
    assert solver_prompt("P", style="instruct").startswith(f"{SOLVER_HEADER} {SOLVER_FORMAT_INSTRUCTIONS}\n")


def test_instruct_critique_prompt_ends_with_an_example_and_a_reminder():
    # Small instruct models (SmolLM2-135M) only write the format with an example near the end.
    for reference in (None, "R"):
        prompt = critic_prompt("P", "S", reference, style="instruct")
        assert prompt.endswith(f"\nS\n{INSTRUCT_CRITIQUE_TRAILER}Critique:\n")
        assert "Conclusion: incorrect, first wrong step 2" in INSTRUCT_CRITIQUE_TRAILER
        assert "reference" not in INSTRUCT_CRITIQUE_TRAILER.lower()  # direct prompts never mention one
        assert INSTRUCT_CRITIQUE_TRAILER not in critic_prompt("P", "S", reference, style="compact")


@pytest.mark.parametrize("style", ["", "Compact", "chat", None])
def test_bad_style_raises(style):
    with pytest.raises(ValueError):
        solver_prompt("P", style=style)
    with pytest.raises(ValueError):
        critic_prompt("P", "S", style=style)
    with pytest.raises(ValueError):
        critic_prompt("P", "S", "R", style=style)
