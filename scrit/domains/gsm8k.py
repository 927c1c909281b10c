"""The GSM8K domain (DESIGN.md §5): grade-school word problems for real-model runs.

GSM8K's worked answers are the reference solutions. They carry ``<<48/2=24>>`` calculator
annotations (an artefact of the original tool-use training, noise to a critic) and end in
``#### N``; we strip the former and rewrite the latter into the project's boxed answer line so a
reference looks like every other solution the critic sees.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import msgspec

from scrit.domains.answers import answers_equal, extract_final_answer
from scrit.messages import Problem, Solution

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_LINE = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)


class _Row(msgspec.Struct):
    question: str
    answer: str


def clean_answer_number(raw: str) -> str:
    """``1,000`` -> ``1000``: GSM8K writes thousands separators in some final answers."""
    return raw.strip().replace(",", "")


def reference_from_worked_answer(worked: str) -> tuple[str, str]:
    """(reference solution, final answer) from a GSM8K ``answer`` field.

    Raises ValueError when the ``#### N`` line is missing, since the answer is then unknown.
    """
    matches = list(_FINAL_LINE.finditer(worked))
    if not matches:
        raise ValueError("no '#### N' final-answer line")
    final = matches[-1]
    answer = clean_answer_number(final.group(1))
    if not answer:
        raise ValueError("empty '#### N' final-answer line")
    body = _CALCULATOR.sub("", worked[: final.start()])
    lines = [line.rstrip() for line in body.splitlines() if line.strip()]
    lines.append(f"The answer is \\boxed{{{answer}}}.")
    return "\n".join(lines), answer


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems from a GSM8K JSONL file; ids are ``gsm8k-<file stem>-<0-based line index>``.

    Blank lines are skipped but still counted, so an id always points at its line in the file.
    """
    path = Path(path)
    split = path.stem
    decoder = msgspec.json.Decoder(_Row)
    problems: list[Problem] = []
    with path.open("rb") as handle:
        for index, line in enumerate(handle):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = decoder.decode(line)
                reference, answer = reference_from_worked_answer(row.answer)
            except (msgspec.DecodeError, ValueError) as exc:
                raise ValueError(f"{path}: line {index + 1}: {exc}") from exc
            problems.append(
                Problem(
                    id=f"gsm8k-{split}-{index}",
                    domain="gsm8k",
                    question=row.question.strip(),
                    answer=answer,
                    reference=reference,
                )
            )
    return problems


class GSM8KDomain:
    """Free-text solutions: one step per non-empty line, answer in the last ``\\boxed{}``."""

    name = "gsm8k"

    def split_steps(self, solution: str) -> list[str]:
        return [line.strip() for line in solution.splitlines() if line.strip()]

    def render_solution(self, steps: list[str], answer: str | None = None) -> str:
        lines = [step.strip() for step in steps if step.strip()]
        if answer is not None:
            lines.append(f"The answer is \\boxed{{{answer}}}.")
        return "\n".join(lines)

    def extract_answer(self, text: str) -> str | None:
        return extract_final_answer(text)

    def answers_equal(self, predicted: str | None, truth: str | None) -> bool:
        return answers_equal(predicted, truth)

    def inject_error(self, problem: Problem, solution: Solution, rng: random.Random) -> Solution | None:
        """No bug injector for free-text solutions: bug-injection mode skips GSM8K problems."""
        return None
