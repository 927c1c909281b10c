"""Critique evaluation metrics (DESIGN.md §6): EI-F1, its SCRIT ±1 variant, CC-Acc, parse rate.

Pure functions over plain lists so they are trivially testable and cheap to import (sympy is only
reached, lazily, through ``answers_equal`` when an answer is not a plain number).

Labels: 0-based first wrong step, -1 = all steps correct, -2 = wrong with the step unknown
(RealCritic). Predictions: 0-based step, -1 = "no wrong step", and ``UNPARSED`` (-3) for a critique
the parser could not read, which matches no label and so always counts as wrong.

When one class is absent (no wrong items, or no correct items) its accuracy is None and so is the
F1: a harmonic mean over a missing class would silently become the other accuracy or 0, and both
would mislead when averaging over splits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from scrit.domains.answers import answers_equal

__all__ = ["UNPARSED", "ItemResult", "ei_f1", "ei_f1_scrit", "cc_acc", "score_items", "aggregate", "f1"]

UNPARSED = -3
METRIC_KEYS = ("ei_f1", "ei_f1_scrit", "cc_acc", "acc_err", "acc_cor", "parse_rate")


class ItemResult(msgspec.Struct, frozen=True, kw_only=True):
    """One evaluated item: the label, what the critique predicted, and the answers needed for CC-Acc."""

    id: str
    split: str
    label: int
    predicted: int  # 0-based first wrong step, -1 = none
    parsed: bool
    correction_answer: str | None = None  # the final answer of the critique's correction
    solution_answer: str | None = None  # the final answer of the solution under critique
    judged_correct: bool | None = None  # the critique's "the solution is correct" verdict
    truth: str | None = None  # ground-truth answer, where the item has one


def f1(a: float | None, b: float | None) -> float | None:
    """Harmonic mean; 0.0 when both are 0, None when either is undefined."""
    if a is None or b is None:
        return None
    if a + b == 0:
        return 0.0
    return 2 * a * b / (a + b)


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _ei(hit_err: list[bool], hit_cor: list[bool]) -> dict[str, float | None]:
    acc_err, acc_cor = _share(hit_err), _share(hit_cor)
    return {"acc_err": acc_err, "acc_cor": acc_cor, "ei_f1": f1(acc_err, acc_cor)}


def _check_lengths(*seqs: Sequence[Any]) -> None:
    if len({len(s) for s in seqs}) > 1:
        raise ValueError(f"length mismatch: {[len(s) for s in seqs]}")


def ei_f1(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float | None]:
    """ProcessBench EI-F1: exact first-wrong-step match on wrong items, -1 on correct ones.

    A label of -2 (wrong, step unknown) is a hit for any predicted step >= 0.
    """
    _check_lengths(predictions, labels)
    hit_err: list[bool] = []
    hit_cor: list[bool] = []
    for pred, label in zip(predictions, labels):
        if label == -1:
            hit_cor.append(pred == -1)
        elif label == -2:
            hit_err.append(pred >= 0)
        elif label >= 0:
            hit_err.append(pred == label)
        else:
            raise ValueError(f"invalid label {label}")
    return _ei(hit_err, hit_cor)


def ei_f1_scrit(
    predictions: Sequence[int], labels: Sequence[int], correction_ok: Sequence[bool | None]
) -> dict[str, float | None]:
    """SCRIT's EI-F1: a predicted step within ±1 of the label counts, -1 must be exact, and where
    ``correction_ok[i]`` is not None (the item has a ground truth) it must also be True.
    """
    _check_lengths(predictions, labels, correction_ok)
    hit_err: list[bool] = []
    hit_cor: list[bool] = []
    for pred, label, ok in zip(predictions, labels, correction_ok):
        answer_ok = ok is None or ok
        if label == -1:
            hit_cor.append(pred == -1 and answer_ok)
        elif label == -2:
            hit_err.append(pred >= 0 and answer_ok)
        elif label >= 0:
            hit_err.append(pred >= 0 and abs(pred - label) <= 1 and answer_ok)
        else:
            raise ValueError(f"invalid label {label}")
    return _ei(hit_err, hit_cor)


def _final_answer(judged_correct: bool | None, correction: str | None, solution: str | None) -> str | None:
    """What the critique finally commits to: the solution's own answer if judged correct."""
    return solution if judged_correct else correction


def cc_acc(
    correction_answers: Sequence[str | None],
    truths: Sequence[str | None],
    judged_correct: Sequence[bool | None],
    solution_answers: Sequence[str | None],
) -> float | None:
    """Share of items with a ground truth whose critique ends in that answer; None if none has one."""
    _check_lengths(correction_answers, truths, judged_correct, solution_answers)
    hits = [
        answers_equal(_final_answer(judged, corr, sol), truth)
        for corr, truth, judged, sol in zip(correction_answers, truths, judged_correct, solution_answers)
        if truth is not None
    ]
    return _share(hits)


def _effective(item: ItemResult) -> tuple[int, bool, str | None]:
    """(prediction, judged correct, correction answer) with an unparsed critique made wrong everywhere."""
    if not item.parsed:
        return UNPARSED, False, None
    judged = item.judged_correct if item.judged_correct is not None else item.predicted == -1
    return item.predicted, judged, item.correction_answer


def score_items(items: Sequence[ItemResult]) -> dict[str, Any]:
    """All §6 metrics for one split: n, ei_f1, ei_f1_scrit, cc_acc, acc_err, acc_cor, parse_rate."""
    predictions: list[int] = []
    judged: list[bool] = []
    corrections: list[str | None] = []
    correction_ok: list[bool | None] = []
    for item in items:
        pred, is_judged, correction = _effective(item)
        predictions.append(pred)
        judged.append(is_judged)
        corrections.append(correction)
        if item.truth is None:
            correction_ok.append(None)
        elif not item.parsed:
            correction_ok.append(False)
        else:
            correction_ok.append(answers_equal(_final_answer(is_judged, correction, item.solution_answer), item.truth))
    labels = [item.label for item in items]
    base = ei_f1(predictions, labels)
    scrit = ei_f1_scrit(predictions, labels, correction_ok)
    with_truth = [ok for ok in correction_ok if ok is not None]
    return {
        "n": len(items),
        "ei_f1": base["ei_f1"],
        "ei_f1_scrit": scrit["ei_f1"],
        "cc_acc": _share([bool(ok) for ok in with_truth]),
        "acc_err": base["acc_err"],
        "acc_cor": base["acc_cor"],
        "parse_rate": _share([item.parsed for item in items]),
    }


def group_by_split(items: Sequence[ItemResult]) -> dict[str, list[ItemResult]]:
    """Items grouped by their split, in first-seen order."""
    groups: dict[str, list[ItemResult]] = {}
    for item in items:
        groups.setdefault(item.split, []).append(item)
    return groups


def aggregate(
    results_by_split: Mapping[str, Sequence[ItemResult] | Mapping[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(per-split metrics, average over splits); a split's value is its items or its ``score_items`` dict.

    The average is the unweighted mean over splits of each metric, skipping splits where it is None
    (None if it is None everywhere); ``n`` is the total.
    """
    per_split: dict[str, dict[str, Any]] = {}
    for split, value in results_by_split.items():
        per_split[split] = dict(value) if isinstance(value, Mapping) else score_items(value)
    average: dict[str, Any] = {"n": sum(int(m.get("n", 0)) for m in per_split.values())}
    for key in METRIC_KEYS:
        values = [m[key] for m in per_split.values() if m.get(key) is not None]
        average[key] = sum(values) / len(values) if values else None
    return per_split, average
