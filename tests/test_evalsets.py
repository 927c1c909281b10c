"""Evaluation-set readers on the real shared data and on malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scrit.domains import arith
from scrit.domains.base import EvalItem
from scrit.domains.evalsets import (
    read_eval_jsonl,
    read_processbench,
    read_realcritic,
    render_numbered_steps,
    split_paragraphs,
    write_eval_jsonl,
)
from scrit.evaluate import eval_due

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


def test_render_numbered_steps() -> None:
    assert render_numbered_steps(["a", " b "]) == "Step 1: a\nStep 2: b"
    assert render_numbered_steps(["a\nmore", "b"]) == "Step 1: a\nmore\n\nStep 2: b"


def test_split_paragraphs() -> None:
    assert split_paragraphs("one\ntwo\n\n three \n\n\n") == ["one\ntwo", "three"]
    assert split_paragraphs("line 1\nline 2\n\n") == ["line 1", "line 2"]
    assert split_paragraphs("  \n") == []


# --------------------------------------------------------------------------------------------------
# ProcessBench


def test_processbench_real(data_dir: Path) -> None:
    items = read_processbench(data_dir / "processbench")
    counts = {s: sum(1 for i in items if i.split == s) for s in ("gsm8k", "math", "olympiadbench", "omnimath")}
    assert counts == {"gsm8k": 400, "math": 1000, "olympiadbench": 1000, "omnimath": 1000}
    assert [i.split for i in items][:1] == ["gsm8k"]
    for item in items:
        assert -1 <= item.label < len(item.steps)
        assert item.answer is None
        assert item.solution is not None and item.solution.startswith("Step 1: ")
        assert f"Step {len(item.steps)}: " in item.solution
    assert any(i.label == -1 for i in items) and any(i.label >= 0 for i in items)
    # the NOTICE records one correction to the published data
    fixed = next(i for i in items if i.id == "math-688")
    assert fixed.label == 0


def test_processbench_splits_and_limit(data_dir: Path) -> None:
    items = read_processbench(data_dir / "processbench", splits=["math"], limit=3)
    assert [i.id for i in items] == ["math-0", "math-1", "math-2"]
    assert {i.split for i in items} == {"math"}
    single = read_processbench(data_dir / "processbench" / "gsm8k.json", limit=2)
    assert [i.split for i in single] == ["gsm8k", "gsm8k"]
    with pytest.raises(ValueError, match="unknown split"):
        read_processbench(data_dir / "processbench", splits=["nope"])


def _pb_item(**overrides: object) -> dict[str, object]:
    item: dict[str, object] = {"id": "x-0", "problem": "p", "steps": ["a", "b"], "label": 1}
    item.update(overrides)
    return item


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"label": "1"}, r"item 1: .*\$\[1\]\.label"),
        ({"steps": "a"}, r"\$\[1\]\.steps"),
        ({"problem": None}, r"\$\[1\]\.problem"),
        ({"label": 2}, "item 1"),
        ({"label": -2}, "item 1"),
        ({"steps": []}, "item 1"),
    ],
)
def test_processbench_malformed(tmp_path: Path, bad: dict[str, object], needle: str) -> None:
    path = tmp_path / "math.json"
    path.write_text(json.dumps([_pb_item(), _pb_item(**bad)]))
    with pytest.raises(ValueError, match=needle) as info:
        read_processbench(path)
    assert "math.json" in str(info.value)


def test_processbench_missing_field_and_bad_json(tmp_path: Path) -> None:
    item = _pb_item()
    del item["label"]
    (tmp_path / "gsm8k.json").write_text(json.dumps([_pb_item(), item]))
    with pytest.raises(ValueError, match=r"gsm8k\.json.*label"):
        read_processbench(tmp_path)
    (tmp_path / "gsm8k.json").write_text("[{")
    with pytest.raises(ValueError, match=r"gsm8k\.json"):
        read_processbench(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        read_processbench(tmp_path / "absent.json")
    with pytest.raises(ValueError, match=r"no \*\.json files"):
        read_processbench(tmp_path)


# --------------------------------------------------------------------------------------------------
# RealCritic


def test_realcritic_root_means_balanced(data_dir: Path) -> None:
    items = read_realcritic(data_dir / "realcritic")
    splits = {i.split for i in items}
    assert splits == {"gsm8k", "math", "olympiadbench"}
    assert len(items) == 273 + 268 + 267
    labels = {i.label for i in items}
    assert labels == {-1, -2}
    n_correct = sum(i.label == -1 for i in items)
    assert 0.45 < n_correct / len(items) < 0.55  # "balanced"
    for item in items:
        assert item.steps and all(s.strip() for s in item.steps)
        assert item.answer is not None and item.reference is not None
        assert item.solution is not None and item.solution.startswith("Step 1: ")
    first = items[0]
    assert first.id == "realcritic-gsm8k-0"
    assert first.answer == "540"
    assert first.label == -1  # its previous_score is [true]
    assert first.steps[0].startswith("To calculate the total meters")


def test_realcritic_incorrect_prefix_and_filter(data_dir: Path) -> None:
    items = read_realcritic(data_dir / "realcritic" / "incorrect", splits=["gsm8k"], limit=4)
    assert [i.split for i in items] == ["incorrect-gsm8k"] * 4
    assert all(i.label == -2 for i in items)
    assert all(i.id.startswith("realcritic-incorrect-gsm8k-") for i in items)
    one = read_realcritic(data_dir / "realcritic" / "balanced" / "math.jsonl", limit=2)
    assert [i.split for i in one] == ["math", "math"]


def _rc_row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "idx": 0, "question": "q", "reasoning": "a\n\nb", "gt": "1", "gt_cot": "c", "previous_score": [True]
    }
    row.update(overrides)
    return row


def test_realcritic_label_and_types(tmp_path: Path) -> None:
    rows = [
        _rc_row(),
        _rc_row(idx=1, previous_score=[False]),
        _rc_row(idx=2, previous_score=True, gt=7, reasoning="one line\nsecond line"),
        _rc_row(idx=3, previous_score=None),
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_realcritic(path)
    assert [i.label for i in items] == [-1, -2, -1, -2]
    assert items[2].answer == "7"
    assert items[2].steps == ["one line", "second line"]
    assert items[0].solution == "Step 1: a\nStep 2: b"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{broken", "line 2"),
        (json.dumps({"question": "q", "gt": "1"}), "line 2.*reasoning"),
        (json.dumps(_rc_row(reasoning=5)), "line 2"),
        (json.dumps(_rc_row(reasoning="   ")), "line 2.*no steps"),
    ],
)
def test_realcritic_malformed(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(_rc_row()) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=needle) as info:
        read_realcritic(path)
    assert "gsm8k.jsonl" in str(info.value)


# --------------------------------------------------------------------------------------------------
# generic eval JSONL


def test_eval_jsonl_roundtrip_and_default_render(tmp_path: Path) -> None:
    items = [
        EvalItem(id="a", problem="p", steps=["s1", "s2"], label=-1, answer="3", reference="r"),
        EvalItem(id="b", problem="p2", steps=["t1"], label=0),
    ]
    path = tmp_path / "mine.jsonl"
    assert write_eval_jsonl(path, items) == 2
    back = read_eval_jsonl(path)
    assert [(i.id, i.steps, i.label, i.answer, i.reference) for i in back] == [
        ("a", ["s1", "s2"], -1, "3", "r"),
        ("b", ["t1"], 0, None, None),
    ]
    assert back[0].split == "mine"
    assert back[0].solution == "Step 1: s1\nStep 2: s2"
    assert read_eval_jsonl(path, split="dev", limit=1)[0].split == "dev"
    assert len(read_eval_jsonl(path, limit=1)) == 1


def test_eval_jsonl_arith_render_uses_last_step_not_truth(tmp_path: Path) -> None:
    row = {
        "id": "arith-0",
        "problem": "Start with 12. Add 5. Multiply by 3. What is the result?",
        "steps": ["12 + 5 = 17", "17 * 3 = 52"],
        "label": 1,
        "answer": "51",
    }
    path = tmp_path / "arith.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (item,) = read_eval_jsonl(path, render=arith.render_solution)
    assert item.solution == "Step 1: 12 + 5 = 17\nStep 2: 17 * 3 = 52\nThe answer is \\boxed{52}."
    assert item.answer == "51"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("not json", "line 2"),
        (json.dumps({"id": "y", "problem": "p", "steps": ["s"]}), "line 2.*label"),
        (json.dumps({"id": "y", "problem": "p", "steps": ["s"], "label": "0"}), "line 2.*label"),
        (json.dumps({"id": 5, "problem": "p", "steps": ["s"], "label": 0}), "line 2.*id"),
        (json.dumps({"id": "y", "problem": "p", "steps": [1], "label": 0}), "line 2.*steps"),
        (json.dumps({"id": "y", "problem": "p", "steps": ["s"], "label": 1}), "line 2.*out of range"),
        (json.dumps({"id": "y", "problem": "p", "steps": [], "label": -1}), "line 2.*no steps"),
        (json.dumps({"id": "x", "problem": "p", "steps": ["s"], "label": 0}), "line 2.*duplicate"),
    ],
)
def test_eval_jsonl_malformed(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "evalset.jsonl"
    good = json.dumps({"id": "x", "problem": "p", "steps": ["s"], "label": -1})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=needle) as info:
        read_eval_jsonl(path)
    assert "evalset.jsonl" in str(info.value)


def test_eval_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        read_eval_jsonl(tmp_path / "absent.jsonl")


def test_the_harder_arith_set_has_6_to_8_operations_from_the_heldout_bucket() -> None:
    from scrit.domains.arith import arith_split, parse_problem
    from scrit.evaluate import build_arith_evalset, load_bench

    hard = load_bench("arith-hard", limit=40)
    assert len(hard) == 40 and {item.split for item in hard} == {"arith-hard"}
    assert all(6 <= len(parse_problem(item.problem).ops) <= 8 for item in hard)
    assert all(arith_split(item.problem) == "heldout" for item in hard)
    assert 10 <= sum(item.label >= 0 for item in hard) <= 30  # about half carry a wrong step
    assert not {i.problem for i in hard} & {i.problem for i in build_arith_evalset(300)}  # its own problems


@pytest.mark.parametrize(("every", "planned", "last_published", "scored"), [
    (1, 6, None, [0, 1, 2, 3, 4, 5, 6]),
    (2, 6, None, [0, 2, 4, 6]),
    (2, 5, None, [0, 2, 4, 5]),  # the last planned version, though odd
    (2, 6, 3, [0, 2, 3, 4, 6]),  # the run ended at version 3 (wall limit): its last version too
    (4, 6, None, [0, 4, 6]),
])
def test_in_run_evaluation_scores_the_seed_every_kth_and_the_last_version(every, planned, last_published, scored):
    assert [v for v in range(planned + 1) if eval_due(v, every, planned, last_published)] == scored
