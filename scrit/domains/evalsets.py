"""Evaluation-set readers (DESIGN.md §5): ProcessBench JSON, RealCritic JSONL, the generic eval JSONL.

Every reader returns ``EvalItem``s with the solution already rendered as the model will see it
(``Step k:`` lines), and fails with a ``ValueError`` naming the file and the line or item index, so
a bad download is found at load time rather than as a confusing metric.

Label convention: 0-based index of the first wrong step, -1 = all correct, and -2 = "the solution is
wrong but the wrong step is unknown" (RealCritic has only solution-level labels).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from scrit.domains.base import EvalItem

__all__ = [
    "LABEL_WRONG_UNKNOWN_STEP",
    "render_numbered_steps",
    "split_paragraphs",
    "read_processbench",
    "read_realcritic",
    "read_eval_jsonl",
]

LABEL_WRONG_UNKNOWN_STEP = -2
PROCESSBENCH_SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")


def render_numbered_steps(steps: list[str]) -> str:
    """``Step 1: ...`` lines; multi-line steps are separated by a blank line so boundaries stay visible."""
    parts = [f"Step {k}: {step.strip()}" for k, step in enumerate(steps, 1)]
    separator = "\n\n" if any("\n" in step.strip() for step in steps) else "\n"
    return separator.join(parts)


def split_paragraphs(text: str) -> list[str]:
    """Steps of a free-text solution: paragraphs (blank-line separated), else non-empty lines."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) > 1:
        return paragraphs
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_label(label: int, n_steps: int, allow_unknown: bool = False) -> None:
    low = LABEL_WRONG_UNKNOWN_STEP if allow_unknown else -1
    if isinstance(label, bool) or not low <= label < n_steps:
        raise ValueError(f"label {label} out of range for {n_steps} steps")


def _check_steps(steps: list[str]) -> None:
    if not steps:
        raise ValueError("no steps")


def _files(path_or_dir: str | Path, pattern: str, what: str) -> list[Path]:
    path = Path(path_or_dir)
    if path.is_dir():
        files = sorted(path.glob(pattern))
        if not files:
            raise ValueError(f"{path}: no {pattern} files for {what}")
        return files
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory ({what})")
    return [path]


def _select(files: list[Path], names: list[str], splits: Iterable[str] | None, where: Path | str) -> list[tuple[Path, str]]:
    pairs = list(zip(files, names))
    if splits is None:
        return pairs
    wanted = list(splits)
    unknown = [s for s in wanted if s not in names and not any(n.endswith("-" + s) for n in names)]
    if unknown:
        raise ValueError(f"{where}: unknown split(s) {unknown}; available: {names}")
    return [(f, n) for f, n in pairs if n in wanted or any(n.endswith("-" + s) for s in wanted)]


# --------------------------------------------------------------------------------------------------
# ProcessBench


class _PBItem(msgspec.Struct):
    id: str
    problem: str
    steps: list[str]
    label: int


def read_processbench(
    path_or_dir: str | Path, splits: Iterable[str] | None = None, limit: int | None = None
) -> list[EvalItem]:
    """ProcessBench JSON arrays (a directory of ``{gsm8k,math,olympiadbench,omnimath}.json`` or one file).

    The split is the file stem; ``limit`` applies per split (the first items of each file).
    """
    files = _files(path_or_dir, "*.json", "ProcessBench")
    files.sort(key=lambda f: (PROCESSBENCH_SPLITS.index(f.stem) if f.stem in PROCESSBENCH_SPLITS else 99, f.stem))
    items: list[EvalItem] = []
    for file, split in _select(files, [f.stem for f in files], splits, path_or_dir):
        try:
            rows = msgspec.json.decode(file.read_bytes(), type=list[_PBItem])
        except msgspec.DecodeError as exc:  # the message carries the item path, e.g. `$[3].label`
            where = re.search(r"`\$\[(\d+)\]", str(exc))
            item = f"item {where.group(1)}: " if where else ""
            raise ValueError(f"{file}: {item}{exc}") from exc
        for index, row in enumerate(rows[:limit] if limit is not None else rows):
            try:
                _check_steps(row.steps)
                _check_label(row.label, len(row.steps))
            except ValueError as exc:
                raise ValueError(f"{file}: item {index} (id {row.id!r}): {exc}") from exc
            items.append(
                EvalItem(
                    id=row.id,
                    problem=row.problem,
                    steps=row.steps,
                    label=row.label,
                    solution=render_numbered_steps(row.steps),
                    split=split,
                )
            )
    return items


# --------------------------------------------------------------------------------------------------
# RealCritic


class _RCItem(msgspec.Struct):
    question: str
    reasoning: str
    gt: str | int | float
    gt_cot: str | None = None
    previous_score: list[bool] | bool | None = None
    idx: int | str | None = None


def _realcritic_files(path_or_dir: str | Path) -> tuple[list[Path], str]:
    """Files and split prefix; the RealCritic root means its ``balanced`` set."""
    path = Path(path_or_dir)
    if path.is_dir() and (path / "balanced").is_dir():
        path = path / "balanced"
    folder = path if path.is_dir() else path.parent
    prefix = "incorrect-" if folder.name == "incorrect" else ""
    return _files(path, "*.jsonl", "RealCritic"), prefix


def _is_true(score: list[bool] | bool | None) -> bool:
    if isinstance(score, list):
        return bool(score) and all(score)
    return bool(score)


def read_realcritic(
    path_or_dir: str | Path, splits: Iterable[str] | None = None, limit: int | None = None
) -> list[EvalItem]:
    """RealCritic JSONL (root, ``balanced/``, ``incorrect/`` or one file); ``limit`` applies per split.

    Labels: -1 when ``previous_score`` is true, else -2 (wrong, step unknown); the ``incorrect`` set
    has no ``previous_score`` and every item is -2. Splits from ``incorrect/`` are ``incorrect-<stem>``.
    """
    files, prefix = _realcritic_files(path_or_dir)
    decoder = msgspec.json.Decoder(_RCItem)
    items: list[EvalItem] = []
    for file, split in _select(files, [prefix + f.stem for f in files], splits, path_or_dir):
        count = 0
        with file.open("rb") as handle:
            for line_no, line in enumerate(handle, 1):
                if limit is not None and count >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = decoder.decode(line)
                    steps = split_paragraphs(row.reasoning)
                    _check_steps(steps)
                except (msgspec.DecodeError, ValueError) as exc:
                    raise ValueError(f"{file}: line {line_no}: {exc}") from exc
                local_id = row.idx if row.idx is not None else line_no - 1
                items.append(
                    EvalItem(
                        id=f"realcritic-{split}-{local_id}",
                        problem=row.question,
                        steps=steps,
                        label=-1 if _is_true(row.previous_score) else LABEL_WRONG_UNKNOWN_STEP,
                        answer=str(row.gt),
                        reference=row.gt_cot,
                        solution=render_numbered_steps(steps),
                        split=split,
                    )
                )
                count += 1
    return items


# --------------------------------------------------------------------------------------------------
# generic eval JSONL


class _EvalRow(msgspec.Struct):
    id: str
    problem: str
    steps: list[str]
    label: int
    answer: str | None = None
    reference: str | None = None


def read_eval_jsonl(
    path: str | Path,
    limit: int | None = None,
    split: str | None = None,
    render: Callable[[list[str]], str] | None = None,
) -> list[EvalItem]:
    """The generic eval JSONL of DESIGN.md §5; the split defaults to the file stem.

    ``render`` turns the steps into the solution text (default ``render_numbered_steps``; arith
    passes ``scrit.domains.arith.render_solution``). It receives only the steps, never the
    ground-truth answer, which must not leak into the solution under critique.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (eval JSONL)")
    split = split or path.stem
    render = render or render_numbered_steps
    decoder = msgspec.json.Decoder(_EvalRow)
    items: list[EvalItem] = []
    seen: set[str] = set()
    with path.open("rb") as handle:
        for line_no, line in enumerate(handle, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = decoder.decode(line)
                _check_steps(row.steps)
                _check_label(row.label, len(row.steps), allow_unknown=True)
                if row.id in seen:
                    raise ValueError(f"duplicate id {row.id!r}")
                solution = render(row.steps)
            except (msgspec.DecodeError, ValueError) as exc:
                raise ValueError(f"{path}: line {line_no}: {exc}") from exc
            seen.add(row.id)
            items.append(
                EvalItem(
                    id=row.id,
                    problem=row.problem,
                    steps=row.steps,
                    label=row.label,
                    answer=row.answer,
                    reference=row.reference,
                    solution=solution,
                    split=split,
                )
            )
    return items


def write_eval_jsonl(path: str | Path, items: Iterable[EvalItem]) -> int:
    """Write items in the generic eval JSONL schema (the inverse of ``read_eval_jsonl``); returns the count."""
    encoder = msgspec.json.Encoder()
    count = 0
    with Path(path).open("wb") as handle:
        for item in items:
            row: dict[str, Any] = {"id": item.id, "problem": item.problem, "steps": item.steps, "label": item.label}
            if item.answer is not None:
                row["answer"] = item.answer
            if item.reference is not None:
                row["reference"] = item.reference
            handle.write(encoder.encode(row) + b"\n")
            count += 1
    return count
