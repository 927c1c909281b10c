"""Metrics against hand-computed cases (DESIGN.md §6)."""

from __future__ import annotations

import pytest

from scrit.metrics import UNPARSED, ItemResult, aggregate, cc_acc, ei_f1, ei_f1_scrit, f1, group_by_split, score_items


def test_ei_f1_hand_computed() -> None:
    # wrong items: labels 2, 0, 3 predicted 2 (hit), 1 (miss), -1 (miss) -> acc_err 1/3
    # correct items: two -1 predicted -1 (hit), 0 (miss) -> acc_cor 1/2
    out = ei_f1([2, 1, -1, -1, 0], [2, 0, 3, -1, -1])
    assert out["acc_err"] == pytest.approx(1 / 3)
    assert out["acc_cor"] == pytest.approx(1 / 2)
    assert out["ei_f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4


def test_ei_f1_both_zero_is_zero() -> None:
    out = ei_f1([1, 0], [0, -1])
    assert out == {"acc_err": 0.0, "acc_cor": 0.0, "ei_f1": 0.0}


def test_ei_f1_one_zero_is_zero() -> None:
    out = ei_f1([0, 0, 0], [0, 1, -1])
    assert out["acc_err"] == pytest.approx(0.5)
    assert out["acc_cor"] == 0.0
    assert out["ei_f1"] == 0.0


def test_ei_f1_perfect() -> None:
    assert ei_f1([3, -1], [3, -1])["ei_f1"] == 1.0


def test_ei_f1_absent_class_is_none() -> None:
    only_wrong = ei_f1([1, 2], [1, 0])
    assert only_wrong["acc_err"] == 0.5
    assert only_wrong["acc_cor"] is None and only_wrong["ei_f1"] is None
    only_correct = ei_f1([-1], [-1])
    assert only_correct["acc_err"] is None and only_correct["acc_cor"] == 1.0
    assert only_correct["ei_f1"] is None
    assert ei_f1([], []) == {"acc_err": None, "acc_cor": None, "ei_f1": None}


def test_ei_f1_unknown_step_label() -> None:
    # label -2: wrong, step unknown -> any predicted step >= 0 is a hit; -1 and UNPARSED are misses
    out = ei_f1([0, 5, -1, UNPARSED, -1], [-2, -2, -2, -2, -1])
    assert out["acc_err"] == 0.5
    assert out["acc_cor"] == 1.0


def test_unparsed_matches_nothing() -> None:
    out = ei_f1([UNPARSED, UNPARSED], [0, -1])
    assert out["ei_f1"] == 0.0


def test_ei_f1_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ei_f1([0], [0, 1])
    with pytest.raises(ValueError):
        ei_f1([0], [-5])


def test_ei_f1_scrit_tolerance() -> None:
    labels = [3, 3, 3, 3, 0, -1, -1]
    preds = [2, 4, 5, -1, -1, -1, 0]
    ok = [None] * 7
    out = ei_f1_scrit(preds, labels, ok)
    # 2 and 4 are within ±1 of 3; 5 is not; -1 never counts as a step; label 0 predicted -1 is a miss
    assert out["acc_err"] == pytest.approx(2 / 5)
    assert out["acc_cor"] == pytest.approx(1 / 2)
    assert ei_f1(preds, labels)["acc_err"] == 0.0  # the exact version sees no hit


def test_ei_f1_scrit_requires_correction_when_known() -> None:
    labels = [1, 1, -1, -1, -2]
    preds = [1, 2, -1, -1, 0]
    out = ei_f1_scrit(preds, labels, [True, False, None, False, True])
    assert out["acc_err"] == pytest.approx(2 / 3)  # item 1 fails on its answer
    assert out["acc_cor"] == pytest.approx(1 / 2)  # item 3 fails on its answer
    assert out["ei_f1"] == pytest.approx(f1(2 / 3, 1 / 2))


def test_f1_edges() -> None:
    assert f1(0.0, 0.0) == 0.0
    assert f1(1.0, 0.0) == 0.0
    assert f1(None, 1.0) is None
    assert f1(0.5, 0.5) == 0.5


def test_cc_acc_judged_correct_rule() -> None:
    out = cc_acc(
        correction_answers=["5", "7", None, "9", "1"],
        truths=["5", "7", "3", None, "2"],
        judged_correct=[False, True, True, False, None],
        solution_answers=["4", "6", "3", "9", "2"],
    )
    # 0: corrected to 5 == 5 (hit); 1: judged correct -> own answer 6 != 7 (miss, even though the
    # correction says 7); 2: judged correct -> own 3 == 3 (hit); 3: no truth, skipped;
    # 4: verdict unknown -> correction 1 != 2 (miss)
    assert out == pytest.approx(2 / 4)


def test_cc_acc_uses_answer_equality_and_none_without_truths() -> None:
    assert cc_acc(["\\frac{1}{2}"], ["0.5"], [False], [None]) == 1.0
    assert cc_acc(["1"], [None], [False], ["1"]) is None
    assert cc_acc([], [], [], []) is None


def _item(**kw: object) -> ItemResult:
    base: dict[str, object] = {"id": "i", "split": "s", "label": -1, "predicted": -1, "parsed": True}
    base.update(kw)
    return ItemResult(**base)  # type: ignore[arg-type]


def test_score_items_hand_computed() -> None:
    items = [
        # wrong at 2, found at 2, corrected to the truth
        _item(id="a", label=2, predicted=2, correction_answer="10", solution_answer="9", judged_correct=False, truth="10"),
        # wrong at 2, found at 3 (±1 hit), but the correction misses the truth
        _item(id="b", label=2, predicted=3, correction_answer="8", solution_answer="9", judged_correct=False, truth="10"),
        # correct, judged correct, its own answer is the truth
        _item(id="c", label=-1, predicted=-1, solution_answer="4", judged_correct=True, truth="4"),
        # correct but the critique is unparseable: wrong everywhere, even with a right-looking answer
        _item(id="d", label=-1, predicted=-1, parsed=False, correction_answer="4", solution_answer="4", truth="4"),
    ]
    out = score_items(items)
    assert set(out) == {"n", "ei_f1", "ei_f1_scrit", "cc_acc", "acc_err", "acc_cor", "parse_rate"}
    assert out["n"] == 4
    assert out["parse_rate"] == 0.75
    assert out["acc_err"] == 0.5  # a hit, b miss
    assert out["acc_cor"] == 0.5  # c hit, d unparsed
    assert out["ei_f1"] == 0.5
    # scrit: a hit, b miss (answer), c hit, d miss -> 0.5 and 0.5
    assert out["ei_f1_scrit"] == 0.5
    assert out["cc_acc"] == 0.5  # a and c


def test_score_items_infers_verdict_and_no_truth() -> None:
    items = [
        _item(label=-1, predicted=-1, judged_correct=None, solution_answer="3", truth="3"),
        _item(label=0, predicted=1, judged_correct=None, correction_answer="5", truth=None),
    ]
    out = score_items(items)
    assert out["cc_acc"] == 1.0  # verdict inferred from predicted -1: own answer used
    assert out["ei_f1"] == 0.0  # acc_err 0 (exact), acc_cor 1
    assert out["ei_f1_scrit"] == 1.0  # 1 is within ±1 of 0, and no truth to check


def test_score_items_without_truths_has_no_cc_acc() -> None:
    out = score_items([_item(label=0, predicted=0), _item(label=-1, predicted=-1)])
    assert out["cc_acc"] is None
    assert out["ei_f1"] == 1.0 and out["ei_f1_scrit"] == 1.0


def test_aggregate_means_over_splits_skipping_none() -> None:
    items = [
        _item(id="1", split="x", label=0, predicted=0, truth="1", correction_answer="1"),
        _item(id="2", split="x", label=-1, predicted=-1, parsed=False, correction_answer="1", truth="1"),
        _item(id="3", split="y", label=0, predicted=0),
    ]
    per_split, average = aggregate(group_by_split(items))
    assert list(per_split) == ["x", "y"]
    assert per_split["x"]["ei_f1"] == 0.0 and per_split["y"]["ei_f1"] is None
    assert per_split["x"]["cc_acc"] == 0.5 and per_split["y"]["cc_acc"] is None
    assert average["n"] == 3
    assert average["ei_f1"] == 0.0  # y's None is skipped, not counted as 0
    assert average["acc_err"] == 1.0
    assert average["acc_cor"] == 0.0
    assert average["parse_rate"] == pytest.approx((0.5 + 1.0) / 2)
    assert average["cc_acc"] == 0.5


def test_aggregate_accepts_scored_dicts() -> None:
    scored = {
        "a": {"n": 10, "ei_f1": 0.2, "ei_f1_scrit": 0.4, "cc_acc": None, "acc_err": 0.1, "acc_cor": 0.9, "parse_rate": 1.0},
        "b": {"n": 30, "ei_f1": 0.6, "ei_f1_scrit": 0.8, "cc_acc": None, "acc_err": 0.5, "acc_cor": 0.7, "parse_rate": 0.5},
    }
    _, average = aggregate(scored)
    assert average["n"] == 40
    assert average["ei_f1"] == pytest.approx(0.4)  # unweighted over splits, not over items
    assert average["ei_f1_scrit"] == pytest.approx(0.6)
    assert average["cc_acc"] is None
