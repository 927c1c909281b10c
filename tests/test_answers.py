"""Answer extraction and equality: the tiers (string, exact number, sympy) and the never-raise rule."""

from __future__ import annotations

import time

import pytest

from scrit.domains.answers import answers_equal, extract_boxed, extract_final_answer, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{5}.", "5"),
        ("\\boxed{1} then revised: \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("first \\boxed{3} then \\fbox{7}", "7"),
        ("\\fbox{7} then \\boxed{3}", "3"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{ok} and a broken \\boxed{x", "ok"),
        ("\\boxed{4} then an empty \\boxed{}", "4"),
        ("no box here", None),
        ("\\boxed{unbalanced", None),
        ("", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So \\boxed{12}. #### 13", "12"),  # box beats the GSM8K marker
        ("She pays 3*4=<<3*4=12>>12\n#### 1,000", "1,000"),
        ("Thus the answer is 42.", "42"),
        ("The final answer is: $3.5$. Then more text.", "3.5"),
        ("Final Answer: x = 2", "x = 2"),
        ("the answer is 7\nand later the answer is 8", "8"),
        ("I am not sure.", None),
        (None, None),
    ],
)
def test_extract_final_answer(text: str | None, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$1,000$", "1000"),
        ("\\$1{,}000.", "1000"),
        ("5\\text{ cm}", "5"),
        ("\\text{even}", "even"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("90^\\circ", "90"),
        ("x = 3", "3"),
        ("  7 .", "7"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1,2)"),
        (None, ""),
    ],
)
def test_normalize_answer(raw: str | None, expected: str) -> None:
    assert normalize_answer(raw) == expected


EQUAL = [
    ("18", "18"),
    ("18", "18.0"),
    ("1,000", "1000"),
    ("$5", "5"),
    ("-7", "-7.00"),
    ("3/4", "0.75"),
    ("\\frac{3}{4}", "0.75"),
    ("\\dfrac{3}{4}", "3/4"),
    ("-\\frac{1}{2}", "-0.5"),
    ("2\\frac{1}{2}", "5/2"),
    ("50\\%", "50"),
    ("50%", "0.5"),
    ("\\sqrt{2}/2", "1/\\sqrt{2}"),
    ("2x+1", "1+2x"),
    ("x^2-1", "(x-1)(x+1)"),
    ("\\frac{8}{\\sqrt[3]{7}}", "8\\cdot 7^{-1/3}"),
    ("\\frac{67\\pi}{3}", "67\\pi/3"),
    ("1+2i", "2i+1"),
    ("(\\frac{3}{4},5)", "(0.75, 5)"),
    ("[-1,-\\frac{1}{2}]", "[-1,-0.5]"),
    ("(1,2,3)", "1,2,3"),
    ("4,8", "8,4"),
    ("\\text{even}", "Even"),
    ("x=3", "3"),
    ("\\infty", "\\infty"),
    ("\\begin{pmatrix}-\\frac{4}{9}\\\\\\frac{1}{9}\\end{pmatrix}", "\\begin{pmatrix}-4/9\\\\1/9\\end{pmatrix}"),
]

UNEQUAL = [
    ("18", "19"),
    ("0.33", "1/3"),
    ("\\pi", "3.14159"),
    ("[-1,-\\frac{1}{2}]", "(-1,-0.5)"),  # closed vs open interval
    ("(1,2,3)", "3,2,1"),  # a tuple is ordered
    ("4,8", "4,8,8"),
    ("-\\infty", "\\infty"),
    ("x+1", "y+1"),
    ("even", "odd"),
    ("13", "1,3"),
    ("5", ""),
    ("", ""),
]


@pytest.mark.parametrize(("predicted", "truth"), EQUAL)
def test_answers_equal_true(predicted: str, truth: str) -> None:
    assert answers_equal(predicted, truth)
    assert answers_equal(truth, predicted)


@pytest.mark.parametrize(("predicted", "truth"), UNEQUAL)
def test_answers_equal_false(predicted: str, truth: str) -> None:
    assert not answers_equal(predicted, truth)
    assert not answers_equal(truth, predicted)


def test_none_is_never_equal() -> None:
    assert not answers_equal(None, "1")
    assert not answers_equal("1", None)
    assert not answers_equal(None, None)


@pytest.mark.parametrize(
    "hostile",
    [
        "9^9^9^9",
        "2^{10000000}",
        "10^{10^{10}}",
        "2^{2^{2^{2^{2}}}}",
        "1e999999999",
        "9" * 5000,
        "__import__('os').system('true')",
        "\\frac{1}{0}",
        "\\frac{",
        "\\unknowncommand{3}",
        "{" * 500 + "1" + "}" * 500,
        "(" * 300 + "1" + ")" * 300,
        "\\sqrt[",
        "x^",
    ],
)
def test_hostile_input_returns_false_quickly(hostile: str) -> None:
    start = time.perf_counter()
    assert answers_equal(hostile, "12345") is False
    assert answers_equal("12345", hostile) is False
    assert time.perf_counter() - start < 2.0
