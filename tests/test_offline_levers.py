"""The offline lever benchmark's probes ask what they claim to ask (no model needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.offline_levers import leading_int, parse_variant, probe_prompts  # noqa: E402


def test_probes_stop_where_the_critic_must_compute() -> None:
    from scrit.domains import arith
    from scrit.evaluate import build_arith_evalset

    items = build_arith_evalset(n=40)
    line_prompts, line_truth, fix_prompts, fix_truth, solver_prompts, solver_truth = probe_prompts(items)
    wrong = [item for item in items if item.label >= 0]
    assert len(line_prompts) == len(fix_prompts) == len(wrong) > 0
    for item, prompt, truth, fix, answer in zip(wrong, line_prompts, line_truth, fix_prompts, fix_truth):
        problem = arith.parse_problem(item.problem)
        expected = problem.correct_steps()[item.label]
        assert prompt.endswith(f"Step {item.label + 1}: {item.steps[item.label]}, expected {expected.rsplit('= ', 1)[0]}= ")
        assert truth == int(expected.rsplit("= ", 1)[1]) and answer == problem.answer
        assert fix.endswith("Correction:\n") and "Reference" not in fix  # direct mode, ideal critique so far
        assert fix.count(": wrong\n") == 1 and prompt.count(": wrong") == 0
    assert len(solver_prompts) == len(solver_truth) == sum(len(item.steps) for item in wrong)
    first = arith.parse_problem(wrong[0].problem).correct_steps()
    assert solver_prompts[1].endswith(f"Solution:\nStep 1: {first[0]}\nStep 2: {first[1].rsplit('= ', 1)[0]}= ")
    assert solver_truth[1] == int(first[1].rsplit("= ", 1)[1])


def test_variant_names_and_leading_numbers() -> None:
    assert parse_variant("result3+wrong1.5+correct0.6") == ({"result": 3.0, "wrong_step": 1.5}, 0.6)
    assert parse_variant("plain") == ({}, 0.5)
    with pytest.raises(ValueError, match="unknown variant part"):
        parse_variant("result3+typo2")
    assert leading_int("168\nStep") == 168 and leading_int(" -4, x") == -4 and leading_int("x1") is None
