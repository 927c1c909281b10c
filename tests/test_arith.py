"""The arith domain's grammar (DESIGN.md §5, followed to the character) and its wrong solutions."""

from __future__ import annotations

import random
import re

import pytest

from scrit.domains import arith
from scrit.domains.arith import (
    ERROR_KINDS,
    ArithDomain,
    ArithProblem,
    apply,
    first_wrong_step,
    generate_problem,
    parse_problem,
    render_solution,
    split_steps,
    wrong_solution,
)
from scrit.domains.arith import arith_split, generate_split_problem

PROBLEM_RE = re.compile(r"^Start with (\d+)\.( (Add|Subtract) \d+\.| Multiply by \d+\.){2,5} What is the result\?$")
OP_RE = re.compile(r" (Add|Subtract|Multiply by) (\d+)\.")
STEP_RE = re.compile(r"^(-?\d+) ([+\-*]) (\d+) = (-?\d+)$")  # single spaces, nothing else
WORD_OP = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
N_PROBLEMS = 2000


def _problems(n: int = N_PROBLEMS, offset: int = 0) -> list[ArithProblem]:
    return [generate_problem(random.Random(offset + s)) for s in range(n)]


PROBLEMS = _problems()


def _step(text: str) -> tuple[int, str, int, int]:
    match = STEP_RE.match(text)
    assert match, f"step not in the `X op N = Y` form: {text!r}"
    return int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))


# --- problems -------------------------------------------------------------------------------------


def test_design_example_renders_exactly():
    problem = ArithProblem(12, (("+", 5), ("*", 3), ("-", 4)))
    assert problem.text == "Start with 12. Add 5. Multiply by 3. Subtract 4. What is the result?"
    assert problem.correct_steps() == ["12 + 5 = 17", "17 * 3 = 51", "51 - 4 = 47"]
    assert problem.answer == 47
    assert render_solution(problem.correct_steps()) == (
        "Step 1: 12 + 5 = 17\nStep 2: 17 * 3 = 51\nStep 3: 51 - 4 = 47\nThe answer is \\boxed{47}."
    )


def test_problem_text_grammar_and_ranges():
    n_ops_seen, ops_seen = set(), set()
    for problem in PROBLEMS:
        text = problem.text
        match = PROBLEM_RE.match(text)
        assert match, text
        assert "  " not in text and text == text.strip()
        start = int(match.group(1))
        assert 2 <= start <= 50
        assert start == problem.start
        ops = OP_RE.findall(text)
        assert 2 <= len(ops) <= 5
        assert len(ops) == len(problem.ops)
        x = start
        for (word, n_text), (op, n) in zip(ops, problem.ops):
            n_int = int(n_text)
            assert WORD_OP[word] == op and n_int == n
            if op == "*":
                assert 2 <= n <= 9, text
            else:
                assert 2 <= n <= 50, text
            x = apply(x, op, n)
            assert 0 <= x <= 999, text
            ops_seen.add(op)
        assert problem.values()[-1] == x == problem.answer
        n_ops_seen.add(len(ops))
    # the generator actually exercises the whole grammar
    assert n_ops_seen == {2, 3, 4, 5}
    assert ops_seen == {"+", "-", "*"}


def test_parse_problem_round_trips():
    for problem in PROBLEMS:
        parsed = parse_problem(problem.text)
        assert parsed == problem
        assert parsed.text == problem.text


@pytest.mark.parametrize(
    "bad", ["", "Start with 3. What is the result?", "Begin with 3. Add 4. What is the result?", "Add 4."]
)
def test_parse_problem_rejects_non_problems(bad):
    with pytest.raises(ValueError):
        parse_problem(bad)


def test_correct_steps_chain_from_previous_result():
    for problem in PROBLEMS:
        steps = problem.correct_steps()
        assert len(steps) == len(problem.ops)
        previous = problem.start
        for step, (op, n), value in zip(steps, problem.ops, problem.values()):
            x, step_op, step_n, y = _step(step)
            assert x == previous
            assert (step_op, step_n) == (op, n)
            assert y == apply(x, op, n) == value
            previous = y


def test_render_solution_format_and_split_round_trip():
    for problem in PROBLEMS:
        steps = problem.correct_steps()
        solution = render_solution(steps)
        lines = solution.split("\n")
        assert len(lines) == len(steps) + 1
        for k, (line, step) in enumerate(zip(lines, steps), 1):
            assert line == f"Step {k}: {step}"
        assert lines[-1] == f"The answer is \\boxed{{{problem.answer}}}."
        assert split_steps(solution) == steps
        assert first_wrong_step(problem, steps) == -1


def test_render_solution_explicit_answer_and_split_skips_other_lines():
    assert render_solution(["2 + 3 = 5"], answer="6") == "Step 1: 2 + 3 = 5\nThe answer is \\boxed{6}."
    assert render_solution([]) == ""
    text = "Let me think.\nStep 1:  2 + 3 = 5 \nso far so good\nStep 2: 5 * 2 = 10\nThe answer is \\boxed{10}."
    assert split_steps(text) == ["2 + 3 = 5", "5 * 2 = 10"]


def test_first_wrong_step_on_short_and_long_solutions():
    problem = ArithProblem(12, (("+", 5), ("*", 3), ("-", 4)))
    steps = problem.correct_steps()
    assert first_wrong_step(problem, steps[:2]) == 2  # missing step counts as the first wrong one
    assert first_wrong_step(problem, []) == 0
    assert first_wrong_step(problem, steps + ["47 + 1 = 48"]) == 3
    assert first_wrong_step(problem, ["12 + 5 = 17", "17 * 3 = 52", "52 - 4 = 48"]) == 1


# --- wrong solutions ------------------------------------------------------------------------------


def _kind_feasible(kind: str, x: int, op: str, n: int) -> bool:
    """Whether a wrong step of this kind with a non-negative, different result exists (in the generator's window)."""
    correct = apply(x, op, n)
    if kind == "result":
        return True
    if kind == "operand":
        return any(x + d >= 0 and apply(x + d, op, n) != correct and apply(x + d, op, n) >= 0
                   for d in range(-10, 11) if d)
    if kind == "operation":
        return any(apply(x, o, n) >= 0 and apply(x, o, n) != correct for o in "+-*" if o != op)
    width = 3 if op == "*" else 10
    return any(n + d >= 2 and apply(x, op, n + d) != correct and apply(x, op, n + d) >= 0
               for d in range(-width, width + 1) if d)


def _check_kind(kind: str, x_true: int, op: str, n: int, wrong: str) -> bool:
    """Assert the wrong step has the requested kind; returns True when the documented fallback was used."""
    x, wop, wn, y = _step(wrong)
    correct = apply(x_true, op, n)
    assert y != correct, wrong
    fallback = f"{x_true} {op} {n} = {correct + 1}"
    if not _kind_feasible(kind, x_true, op, n):
        # e.g. 0 * N' == 0 * N for every N': no wrong number exists, a wrong result is used instead
        assert wrong == fallback
        return True
    if kind != "result" and wrong == fallback:
        return True  # rejection sampling gave up (rare; bounded by the caller)
    if kind == "result":
        assert (x, wop, wn) == (x_true, op, n)
    elif kind == "operand":
        assert x != x_true and (wop, wn) == (op, n) and y == apply(x, op, n)
    elif kind == "operation":
        assert x == x_true and wn == n and wop != op and y == apply(x, wop, n)
    elif kind == "number":
        assert x == x_true and wop == op and wn != n and y == apply(x, op, wn)
    else:  # pragma: no cover
        raise AssertionError(kind)
    assert y >= 0
    return False


def test_wrong_solution_every_kind_and_index():
    rng = random.Random(1234)
    checked = fallbacks = 0
    for problem in PROBLEMS[:600]:
        correct = problem.correct_steps()
        values = [problem.start] + problem.values()
        for kind in ERROR_KINDS:
            for index in range(len(problem.ops)):
                steps, returned = wrong_solution(rng, problem, index, kind)
                assert returned == index
                assert len(steps) == len(problem.ops)
                assert first_wrong_step(problem, steps) == index
                assert steps[:index] == correct[:index]
                op, n = problem.ops[index]
                fallbacks += _check_kind(kind, values[index], op, n, steps[index])
                # later steps: computed correctly from the wrong value, with the problem's op and N
                previous = _step(steps[index])[3]
                for step, (op_k, n_k) in zip(steps[index + 1 :], problem.ops[index + 1 :]):
                    x, sop, sn, y = _step(step)
                    assert (x, sop, sn) == (previous, op_k, n_k)
                    assert y == apply(x, sop, sn)
                    previous = y
                assert previous != problem.answer
                solution = render_solution(steps)
                assert solution.endswith(f"The answer is \\boxed{{{previous}}}.")
                assert split_steps(solution) == steps
                checked += 1
    assert checked > 5000
    assert fallbacks < 0.005 * checked


def test_wrong_solution_number_kind_when_value_is_zero():
    problem = ArithProblem(5, (("-", 5), ("*", 7), ("+", 3)))
    steps, index = wrong_solution(random.Random(0), problem, 1, "number")
    assert index == 1 and first_wrong_step(problem, steps) == 1
    x, op, n, y = _step(steps[1])
    assert x == 0 and y != 0 and y == int(steps[2].split(" ")[0])


def test_wrong_solution_random_index_and_kind():
    rng = random.Random(7)
    indices, kinds_ok = set(), 0
    for problem in PROBLEMS[:300]:
        steps, index = wrong_solution(rng, problem)
        assert 0 <= index < len(problem.ops)
        assert first_wrong_step(problem, steps) == index
        indices.add(index)
        kinds_ok += 1
    assert indices == {0, 1, 2, 3, 4}
    assert kinds_ok == 300


def test_corrupt_step_rejects_unknown_kind():
    with pytest.raises(ValueError):
        arith.corrupt_step(random.Random(0), 3, "+", 4, "typo")


def test_wrong_solutions_cover_all_kinds_by_shape():
    """With a random kind, each of the four error shapes shows up."""
    rng = random.Random(99)
    shapes = set()
    for problem in PROBLEMS[:400]:
        steps, index = wrong_solution(rng, problem)
        x_true = ([problem.start] + problem.values())[index]
        op, n = problem.ops[index]
        x, wop, wn, _ = _step(steps[index])
        if x != x_true:
            shapes.add("operand")
        elif wop != op:
            shapes.add("operation")
        elif wn != n:
            shapes.add("number")
        else:
            shapes.add("result")
    assert shapes == set(ERROR_KINDS)


# --- domain object, determinism, splits -----------------------------------------------------------


def test_arith_domain_methods():
    domain = ArithDomain()
    assert domain.name == "arith"
    problem = ArithProblem(12, (("+", 5), ("*", 3), ("-", 4)))
    solution = domain.render_solution(problem.correct_steps())
    assert solution == render_solution(problem.correct_steps())
    assert domain.split_steps(solution) == problem.correct_steps()
    assert domain.extract_answer(solution) == "47"
    assert domain.extract_answer("\\boxed{1} no wait \\boxed{2}") == "2"
    assert domain.extract_answer("no box here") is None
    assert domain.answers_equal("47", "47")
    assert not domain.answers_equal("48", "47")
    assert not domain.answers_equal(None, "47")
    assert arith.extract_boxed_int(solution) == 47
    assert arith.extract_boxed_int("\\boxed{x}") is None
    assert arith.extract_boxed_int("nothing") is None


def test_generation_is_deterministic():
    again = _problems(300)
    assert again == PROBLEMS[:300]
    rng_a, rng_b = random.Random(42), random.Random(42)
    seq_a = [generate_problem(rng_a).text for _ in range(50)]
    seq_b = [generate_problem(rng_b).text for _ in range(50)]
    assert seq_a == seq_b
    assert len({p.text for p in PROBLEMS}) > 0.95 * len(PROBLEMS)  # seeds give different problems
    w1 = wrong_solution(random.Random(5), PROBLEMS[0], 1, "operand")
    w2 = wrong_solution(random.Random(5), PROBLEMS[0], 1, "operand")
    assert w1 == w2


def test_generate_problem_respects_op_count_bounds():
    rng = random.Random(3)
    for _ in range(200):
        assert len(generate_problem(rng, 3, 3).ops) == 3


def test_arith_split_is_stable_and_about_ten_percent():
    # pinned values: the split must not change between runs, processes or Python versions
    assert arith_split("Start with 12. Add 5. Multiply by 3. Subtract 4. What is the result?") == "train"
    assert arith_split("Start with 23. Add 20. Add 2. What is the result?") == "heldout"
    texts = sorted({p.text for p in PROBLEMS})
    splits = [arith_split(t) for t in texts]
    assert splits == [arith_split(t) for t in texts]
    assert set(splits) == {"train", "heldout"}
    share = splits.count("heldout") / len(splits)
    assert 0.07 < share < 0.13, share


def test_generate_split_problem_yields_only_that_split():
    rng = random.Random(11)
    heldout = [generate_split_problem(rng, "heldout") for _ in range(100)]
    assert all(arith_split(p.text) == "heldout" for p in heldout)
    assert len({p.text for p in heldout}) > 90
    train = [generate_split_problem(rng, "train") for _ in range(100)]
    assert all(arith_split(p.text) == "train" for p in train)
    assert all(PROBLEM_RE.match(p.text) for p in heldout + train)


def test_error_kind_names_what_wrong_solution_injected():
    rng = random.Random(11)
    for _ in range(300):
        problem = arith.generate_problem(rng)
        kind = rng.choice(arith.ERROR_KINDS)
        steps, _ = arith.wrong_solution(rng, problem, kind=kind)
        assert arith.error_kind(problem, steps) == kind
    problem = arith.parse_problem("Start with 12. Add 5. Multiply by 3. What is the result?")
    assert arith.error_kind(problem, problem.correct_steps()) == "none"
    assert arith.error_kind(problem, ["12 + 5 = 17", "seventeen times three"]) == "other"
    assert arith.error_kind(problem, ["12 + 5 = 17"]) == "other"  # a step is missing
    # every operation right, then a step the problem does not have (a solver that goes on)
    assert arith.error_kind(problem, [*problem.correct_steps(), "51 + 1 = 52"]) == "other"
