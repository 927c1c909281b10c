"""GSM8K loading: references cleaned of calculator annotations, boxed answer, stable ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scrit.domains.answers import extract_final_answer
from scrit.domains.gsm8k import GSM8KDomain, load_gsm8k, reference_from_worked_answer
from scrit.messages import Problem

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def gsm8k_dir() -> Path:
    path = DATA / "gsm8k"
    if not (path / "test.jsonl").exists():
        pytest.skip(f"GSM8K data not found at {path}")
    return path


def test_reference_from_worked_answer() -> None:
    worked = "He has 2*3=<<2*3=6>>6 apples.\nThen 6+994=<<6+994=1000>>1000.\n#### 1,000"
    reference, answer = reference_from_worked_answer(worked)
    assert answer == "1000"
    assert reference == "He has 2*3=6 apples.\nThen 6+994=1000.\nThe answer is \\boxed{1000}."


def test_reference_without_final_line_is_rejected() -> None:
    with pytest.raises(ValueError, match="####"):
        reference_from_worked_answer("no final line")


def test_load_real_test_split(gsm8k_dir: Path) -> None:
    problems = load_gsm8k(gsm8k_dir / "test.jsonl")
    assert len(problems) == 1319
    first = problems[0]
    assert isinstance(first, Problem)
    assert first.id == "gsm8k-test-0"
    assert first.domain == "gsm8k"
    assert first.question.startswith("Janet")
    assert first.answer == "18"
    assert first.reference is not None and first.reference.endswith("The answer is \\boxed{18}.")
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert p.reference is not None
        assert "<<" not in p.reference and "####" not in p.reference
        assert "," not in p.answer
        assert extract_final_answer(p.reference) == p.answer


def test_limit_and_train_ids(gsm8k_dir: Path) -> None:
    problems = load_gsm8k(gsm8k_dir / "train.jsonl", limit=5)
    assert [p.id for p in problems] == [f"gsm8k-train-{i}" for i in range(5)]


def test_comma_answers_are_cleaned(gsm8k_dir: Path) -> None:
    raw = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]
    with_comma = [i for i, row in enumerate(raw) if "," in row["answer"].rsplit("####", 1)[1]]
    assert with_comma, "expected some GSM8K answers with thousands separators"
    problems = load_gsm8k(gsm8k_dir / "test.jsonl")
    for i in with_comma:
        assert problems[i].answer == raw[i]["answer"].rsplit("####", 1)[1].strip().replace(",", "")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "line 2"),
        ('{"question": "q"}', "line 2"),
        ('{"question": 3, "answer": "#### 4"}', "line 2"),
        ('{"question": "q", "answer": "no final"}', "line 2"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "x\\n#### 1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=needle) as info:
        load_gsm8k(path)
    assert "bad.jsonl" in str(info.value)


def test_domain_methods() -> None:
    domain = GSM8KDomain()
    assert domain.name == "gsm8k"
    text = domain.render_solution(["First 2+2=4.", "Then 4*3=12."], "12")
    assert text == "First 2+2=4.\nThen 4*3=12.\nThe answer is \\boxed{12}."
    assert domain.split_steps("a\n\n  b  \n\nc") == ["a", "b", "c"]
    assert domain.extract_answer(text) == "12"
    assert domain.extract_answer("blah\n#### 7") == "7"
    assert domain.answers_equal("1,200", "1200")
    assert not domain.answers_equal("12", "13")
