"""Tolerant parser for critiques in the canonical format (DESIGN.md §4).

Accepts case and spacing variations, markdown headings and bold, ``Step 2 - wrong``-style lines,
RealCritic's ``The first error step number: N`` and a trailing ``\\boxed{}``. Anything from which no
judgment can be recovered is reported as unparseable (``parsed=False``), which evaluation counts as
wrong.
"""

from __future__ import annotations

import re

import msgspec

from scrit.domains.answers import extract_boxed

_DECORATION = r"[\s#*>_`-]*"
_STEP = re.compile(rf"^{_DECORATION}step\s*(\d+)\s*[:.)\-]?(.*)$", re.IGNORECASE)
_VERDICT = re.compile(r"\b(not\s+(?:correct|right|ok|okay|valid)|correct|incorrect|wrong|right|ok|okay|error|erroneous|invalid|valid)\b", re.IGNORECASE)
_NEGATIVE = {"incorrect", "wrong", "error", "erroneous", "invalid"}
_CONCLUSION = re.compile(rf"^{_DECORATION}(?:final\s+)?(?:conclusion|verdict|judg(?:e)?ment)\s*[*_]*\s*[:\-]?\s*(.*)$", re.IGNORECASE)
_CORRECTION = re.compile(rf"^{_DECORATION}correct(?:ion|ed solution)\s*[*_]*\s*[:\-]?\s*(.*)$", re.IGNORECASE)
_FIRST_ERROR = re.compile(
    # Whitespace runs are each matched by one quantifier only: adjacent optional ``\s*`` made this regex
    # backtrack catastrophically on long runs of spaces (seconds for 200 spaces).
    r"first\s+(?:wrong|error|incorrect|erroneous)(?:\s+step)?(?:\s+(?:number|index))?\s*(?:(?:is|:|=)\s*)?"
    r"(?:step\s*)?(?:\\boxed\s*\{\s*)?(-?\d+)",
    re.IGNORECASE,
)
_REFERENCE_ANALYSIS = re.compile(rf"^{_DECORATION}reference\s+analysis\b", re.IGNORECASE)
_NO_ERROR = re.compile(r"\b(no\s+(?:wrong|error|incorrect)|all\s+steps\s+(?:are\s+)?correct|none)\b", re.IGNORECASE)


class ParsedCritique(msgspec.Struct, frozen=True, kw_only=True):
    parsed: bool
    step_verdicts: list[bool]  # per step up to the first wrong one; True = correct
    judged_correct: bool | None
    first_error_step: int  # 0-based; -1 = none or unparseable (check ``parsed``)
    correction: str | None  # text after the correction marker, None if absent
    answer: str | None  # boxed answer at the end of the critique (correction's answer)
    error: str | None = None  # why parsing failed


def _verdict(text: str) -> bool | None:
    """Last verdict word in a step line: later words override earlier ones (``expected ...: wrong``)."""
    words = _VERDICT.findall(text)
    if not words:
        return None
    last = words[-1].lower()
    return not last.startswith("not") and last not in _NEGATIVE


def _conclusion(text: str) -> tuple[bool | None, int | None]:
    """(judged_correct, first error index 0-based or None) from a conclusion/first-error statement."""
    number = _FIRST_ERROR.search(text)
    if number:
        value = int(number.group(1))
        return (True, -1) if value <= 0 else (False, value - 1)
    lowered = text.lower()
    if _NO_ERROR.search(text):
        return True, -1
    if re.search(r"\b(incorrect|wrong|not correct|error)\b", lowered):
        step = re.search(r"step\s*(\d+)", lowered)
        return False, (int(step.group(1)) - 1) if step else None
    if re.search(r"\bcorrect\b", lowered):
        return True, -1
    return None, None


def parse_critique(text: str) -> ParsedCritique:
    lines = text.splitlines()
    verdicts: dict[int, bool] = {}
    judged: bool | None = None
    first_error: int | None = None
    correction_lines: list[str] | None = None
    heading_only = False  # a bare ``## Conclusion`` heading: its text is on the next non-blank line

    for line in lines:
        if correction_lines is not None:
            correction_lines.append(line)
            continue
        if _REFERENCE_ANALYSIS.match(line):
            continue  # contrastive-mode preamble about the reference, not a judgment of the student
        correction = _CORRECTION.match(line)
        if correction and not _STEP.match(line):
            correction_lines = [correction.group(1)] if correction.group(1).strip() else []
            continue
        conclusion = _CONCLUSION.match(line)
        if conclusion:
            judged, first_error = _conclusion(conclusion.group(1))
            heading_only = judged is None and not conclusion.group(1).strip(" \t*_:#-")
            continue
        if heading_only and line.strip():
            heading_only = False
            if not _STEP.match(line):
                judged, first_error = _conclusion(line)
                if judged is not None:
                    continue
        if _FIRST_ERROR.search(line) and judged is None:
            judged, first_error = _conclusion(line)
            continue
        step = _STEP.match(line)
        if step and judged is None:
            verdict = _verdict(step.group(2))
            index = int(step.group(1)) - 1
            if verdict is not None and index >= 0 and index not in verdicts:
                verdicts[index] = verdict

    step_verdicts = [verdicts[i] for i in sorted(verdicts)]
    first_wrong_from_steps = next((i for i in sorted(verdicts) if not verdicts[i]), None)
    if judged is None and verdicts:
        # No conclusion line: fall back on the step verdicts themselves.
        judged = first_wrong_from_steps is None
        first_error = -1 if judged else first_wrong_from_steps
    if judged is False and first_error is None:
        first_error = first_wrong_from_steps
    correction = "\n".join(correction_lines).strip() if correction_lines is not None else None
    answer = extract_boxed(text)
    if judged is None:
        return ParsedCritique(parsed=False, step_verdicts=step_verdicts, judged_correct=None, first_error_step=-1,
                              correction=correction, answer=answer, error="no conclusion or step verdicts found")
    if judged is False and first_error is None:
        return ParsedCritique(parsed=False, step_verdicts=step_verdicts, judged_correct=False, first_error_step=-1,
                              correction=correction, answer=answer, error="judged incorrect without a wrong step")
    return ParsedCritique(
        parsed=True,
        step_verdicts=step_verdicts,
        judged_correct=judged,
        first_error_step=-1 if judged else int(first_error),
        correction=correction,
        answer=answer,
    )
