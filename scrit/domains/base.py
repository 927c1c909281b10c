"""What every domain and evaluation reader provides (DESIGN.md §5)."""

from __future__ import annotations

from typing import Protocol

import msgspec


class EvalItem(msgspec.Struct, frozen=True, kw_only=True):
    """One critique-evaluation item: the generic eval JSONL schema plus the rendered solution text."""

    id: str
    problem: str
    steps: list[str]
    label: int  # 0-based index of the first wrong step, -1 = all steps correct
    answer: str | None = None  # ground-truth final answer, where known
    reference: str | None = None  # a correct reference solution, where known
    solution: str | None = None  # the solution as shown to the model; None = steps joined by the reader's rule
    split: str = "default"


class Domain(Protocol):
    name: str

    def split_steps(self, solution: str) -> list[str]: ...

    def render_solution(self, steps: list[str], answer: str | None) -> str: ...

    def extract_answer(self, text: str) -> str | None: ...

    def answers_equal(self, predicted: str | None, truth: str | None) -> bool: ...
