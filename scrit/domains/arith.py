"""The built-in synthetic ``arith`` domain, following DESIGN.md §5 to the character.

Problem: ``Start with A. Add N. Multiply by N. Subtract N. What is the result?``
Step:    ``X + N = Y`` / ``X - N = Y`` / ``X * N = Y``
Solution lines: ``Step 1: 12 + 5 = 17`` ... then ``The answer is \\boxed{47}.``
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from scrit.domains.answers import answers_equal, extract_boxed
from scrit.messages import Problem, Solution

OPERATIONS = ("+", "-", "*")
ERROR_KINDS = ("result", "operand", "operation", "number")
_PHRASE = {"+": "Add {n}.", "-": "Subtract {n}.", "*": "Multiply by {n}."}
_OP_PATTERN = re.compile(r"(Add|Subtract|Multiply by) (\d+)\.")
_OP_WORD = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
STEP_PATTERN = re.compile(r"^\s*(-?\d+) ([+\-*]) (-?\d+) = (-?\d+)\s*$")
_STEP_LINE = re.compile(r"^\s*Step \d+:\s*(.*?)\s*$")
MIN_VALUE, MAX_VALUE = 0, 999


def apply(x: int, op: str, n: int) -> int:
    return x + n if op == "+" else x - n if op == "-" else x * n


@dataclass(frozen=True)
class ArithProblem:
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        parts = [f"Start with {self.start}."] + [_PHRASE[op].format(n=n) for op, n in self.ops]
        return " ".join(parts + ["What is the result?"])

    def values(self) -> list[int]:
        """Running results after each operation."""
        out, x = [], self.start
        for op, n in self.ops:
            x = apply(x, op, n)
            out.append(x)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def correct_steps(self) -> list[str]:
        steps, x = [], self.start
        for op, n in self.ops:
            y = apply(x, op, n)
            steps.append(f"{x} {op} {n} = {y}")
            x = y
        return steps


def parse_problem(text: str) -> ArithProblem:
    match = re.fullmatch(r"Start with (\d+)\. (.*) What is the result\?", text.strip())
    if not match:
        raise ValueError(f"not an arith problem: {text!r}")
    ops = tuple((_OP_WORD[word], int(n)) for word, n in _OP_PATTERN.findall(match.group(2)))
    if not ops:
        raise ValueError(f"arith problem without operations: {text!r}")
    return ArithProblem(int(match.group(1)), ops)


def _random_operation(rng: random.Random, x: int) -> tuple[str, int]:
    while True:
        op = rng.choice(OPERATIONS)
        n = rng.randint(2, 9) if op == "*" else rng.randint(2, 50)
        if MIN_VALUE <= apply(x, op, n) <= MAX_VALUE:
            return op, n


def generate_problem(rng: random.Random, min_ops: int = 2, max_ops: int = 5) -> ArithProblem:
    """A random problem; every intermediate result stays in 0..999."""
    x = start = rng.randint(2, 50)
    ops = []
    for _ in range(rng.randint(min_ops, max_ops)):
        op, n = _random_operation(rng, x)
        ops.append((op, n))
        x = apply(x, op, n)
    return ArithProblem(start, tuple(ops))


HELDOUT_BUCKETS = 10  # 1 in 10 problems (by a stable hash of the text) is held out of all training


def arith_split(problem_text: str) -> str:
    """'heldout' for one problem in HELDOUT_BUCKETS (stable hash), else 'train'.

    The seed corpus and the self-play loop train only on 'train' problems; every reported arith score
    uses 'heldout' problems, which no training step has ever seen.
    """
    digest = hashlib.blake2b(problem_text.encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "big") % HELDOUT_BUCKETS == 0 else "train"


def generate_split_problem(rng: random.Random, split: str, min_ops: int = 2, max_ops: int = 5) -> ArithProblem:
    """A random problem from one hash bucket: 'train' (training) or 'heldout' (evaluation only)."""
    while True:
        problem = generate_problem(rng, min_ops, max_ops)
        if arith_split(problem.text) == split:
            return problem


def render_solution(steps: list[str], answer: str | None = None) -> str:
    """Lines ``Step k: ...`` then ``The answer is \\boxed{answer}.`` (answer defaults to the last result)."""
    if answer is None and steps:
        match = STEP_PATTERN.match(steps[-1])
        answer = match.group(4) if match else None
    lines = [f"Step {i}: {step}" for i, step in enumerate(steps, 1)]
    if answer is not None:
        lines.append(f"The answer is \\boxed{{{answer}}}.")
    return "\n".join(lines)


def split_steps(solution: str) -> list[str]:
    """Bare step expressions from a rendered solution (lines not starting with ``Step k:`` are skipped)."""
    steps = []
    for line in solution.splitlines():
        match = _STEP_LINE.match(line)
        if match:
            steps.append(match.group(1))
    return steps


def first_wrong_step(problem: ArithProblem, steps: list[str]) -> int:
    """Index of the first step that is not exactly the correct step (-1 = all correct).

    Only for building evaluation sets and the seed corpus: never used inside the self-play loop.
    """
    for index, (step, expected) in enumerate(zip(steps, problem.correct_steps())):
        if step.strip() != expected:
            return index
    return -1 if len(steps) == len(problem.ops) else min(len(steps), len(problem.ops))


def error_kind(problem: ArithProblem, steps: list[str]) -> str:
    """What went wrong at a solution's first wrong step: ``none``, one of ERROR_KINDS (``result``:
    X op N right, Y wrong; ``operand``: X is not the previous result; ``operation``; ``number``), or
    ``other`` (an unreadable or missing step).

    Like ``first_wrong_step``, for reports and evaluation sets only: never used inside the loop.
    """
    index = first_wrong_step(problem, steps)
    if index < 0:
        return "none"
    if index >= len(problem.ops):  # every operation done right, then steps the problem does not have
        return "other"
    match = STEP_PATTERN.match(steps[index]) if index < len(steps) else None
    if match is None:
        return "other"
    x, op, n, y = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
    expected_op, expected_n = problem.ops[index]
    expected_x = problem.start if index == 0 else problem.values()[index - 1]
    if op != expected_op:
        return "operation"
    if n != expected_n:
        return "number"
    if x != expected_x:
        return "operand"
    return "result" if y != apply(x, op, n) else "other"


def corrupt_step(rng: random.Random, x: int, op: str, n: int, kind: str) -> str:
    """One wrong step of the given kind whose result differs from the correct one."""
    correct = apply(x, op, n)
    for _ in range(100):
        if kind == "result":
            y = correct + rng.choice([-1, 1]) * rng.randint(1, 10)
            if y >= 0 and y != correct:
                return f"{x} {op} {n} = {y}"
        elif kind == "operand":
            x2 = x + rng.choice([-1, 1]) * rng.randint(1, 10)
            if x2 >= 0 and x2 != x and apply(x2, op, n) != correct and apply(x2, op, n) >= 0:
                return f"{x2} {op} {n} = {apply(x2, op, n)}"
        elif kind == "operation":
            op2 = rng.choice([o for o in OPERATIONS if o != op])
            y = apply(x, op2, n)
            if y >= 0 and y != correct:
                return f"{x} {op2} {n} = {y}"
        elif kind == "number":
            n2 = n + rng.choice([-1, 1]) * rng.randint(1, 3 if op == "*" else 10)
            if n2 >= 2 and n2 != n and apply(x, op, n2) != correct and apply(x, op, n2) >= 0:
                return f"{x} {op} {n2} = {apply(x, op, n2)}"
        else:
            raise ValueError(f"unknown error kind {kind!r}")
    return f"{x} {op} {n} = {correct + 1}"  # a wrong result always exists


def wrong_solution(
    rng: random.Random, problem: ArithProblem, wrong_index: int | None = None, kind: str | None = None
) -> tuple[list[str], int]:
    """A solution whose first wrong step is ``wrong_index``; later steps are computed correctly from it."""
    if wrong_index is None:
        wrong_index = rng.randrange(len(problem.ops))
    kind = kind or rng.choice(ERROR_KINDS)
    steps = problem.correct_steps()[:wrong_index]
    x = problem.start if wrong_index == 0 else problem.values()[wrong_index - 1]
    op, n = problem.ops[wrong_index]
    bad = corrupt_step(rng, x, op, n, kind)
    steps.append(bad)
    y = int(bad.rsplit("= ", 1)[1])
    for op, n in problem.ops[wrong_index + 1 :]:
        z = apply(y, op, n)
        steps.append(f"{y} {op} {n} = {z}")
        y = z
    return steps, wrong_index


class ArithDomain:
    name = "arith"

    def split_steps(self, solution: str) -> list[str]:
        return split_steps(solution)

    def render_solution(self, steps: list[str], answer: str | None = None) -> str:
        return render_solution(steps, answer)

    def extract_answer(self, text: str) -> str | None:
        return extract_boxed(text)

    def answers_equal(self, predicted: str | None, truth: str | None) -> bool:
        return answers_equal(predicted, truth)

    def inject_error(self, problem: Problem, solution: Solution, rng: random.Random) -> Solution | None:
        """The paper's bug-injection baseline: a copy of a correct solution with one wrong step.

        Built by ``wrong_solution`` on the parsed problem (later steps follow from the wrong value, so
        the final answer changes). The wrong step's index is discarded: the critic gets no step label,
        and the copy is labelled by its final answer like any other solution. None if the question is
        not an arith problem.
        """
        try:
            parsed = parse_problem(problem.question)
        except ValueError:
            return None
        steps, _ = wrong_solution(rng, parsed)
        text = render_solution(steps)
        answer = extract_boxed(text)
        return Solution(
            problem_id=problem.id,
            solver=f"{solution.solver}+bug",
            text=text,
            steps=steps,
            answer=answer,
            correct=answers_equal(answer, problem.answer),
            version=solution.version,
        )


def extract_boxed_int(text: str) -> int | None:
    """The boxed final answer as an int, or None."""
    value = extract_boxed(text)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
