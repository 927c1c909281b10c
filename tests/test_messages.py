"""Messages round-trip through msgpack, and bad bytes never decode into a half-filled message."""

from __future__ import annotations

import random

import msgspec
import pytest

from scrit import messages as m
from scrit.backends.base import Generation, SamplingParams
from scrit.messages import MessageDecodeError, decode, encode

PROBLEM = m.Problem(
    id="arith-7",
    domain="arith",
    question="Start with 12. Add 5. Multiply by 3. Subtract 4. What is the result?",
    answer="47",
    reference="Step 1: 12 + 5 = 17\nStep 2: 17 * 3 = 51\nStep 3: 51 - 4 = 47\nThe answer is \\boxed{47}.",
)
STUDENT = m.Solution(
    problem_id="arith-7",
    solver="seed@t1.0",
    text="Step 1: 12 + 5 = 17\nStep 2: 17 * 3 = 52\nStep 3: 52 - 4 = 48\nThe answer is \\boxed{48}.",
    steps=["12 + 5 = 17", "17 * 3 = 52", "52 - 4 = 48"],
    answer="48",
    correct=False,
    version=3,
)
REFERENCE = m.Solution(
    problem_id="arith-7", solver="seed@t1.0", text="…ünïcode ok", steps=["12 + 5 = 17"],
    answer=None, correct=True, version=2,
)

SAMPLES: list[m.Message] = [
    PROBLEM,
    m.Problem(id="p", domain="gsm8k", question="q", answer="1"),
    STUDENT,
    REFERENCE,
    m.CritiqueRequest(problem=PROBLEM, solution=STUDENT, reference=REFERENCE),
    m.CritiqueRequest(problem=PROBLEM, solution=STUDENT, mode="direct"),
    m.Critique(
        problem_id="arith-7", mode="contrastive", raw_text="Step 1: correct\nStep 2: incorrect\n...",
        parsed=True, step_verdicts=[m.StepVerdict(0, True), m.StepVerdict(1, False)],
        judged_correct=False, first_error_step=1, correction="Step 2: 17 * 3 = 51\n...", answer="47",
        version=5,
    ),
    m.Critique(
        problem_id="x", mode="direct", raw_text="???", parsed=False, step_verdicts=[],
        judged_correct=None, first_error_step=-1, correction=None, answer=None, version=0,
    ),
    m.Correction(problem_id="arith-7", text="...", steps=["12 + 5 = 17", "17 * 3 = 51"], answer="47",
                 version=5),
    m.Validation(problem_id="arith-7", passed=True, verdict_correct=True, answer_matches=None,
                 raw_text="ok", version=5),
    m.TrainingExample(prompt="problem + student", target="verdicts", student_correct=False,
                      problem_id="arith-7", version=4, created_at=1234.5),
    m.WeightVersion(version=6, uri="/runs/x/versions/6", checksum="sha256:abc", created_at=99.0, step=150),
    m.ProblemBatch(batch_id=3, problems=[PROBLEM]),
    m.SolutionBatch(batch_id=3, solver="solver0", solutions=[STUDENT, REFERENCE],
                    timings=[m.StageTiming("solve", "solver0.0", 10.0, 12.5, 240)]),
    m.CritiqueBatch(batch_id=3, requests=[m.CritiqueRequest(problem=PROBLEM, solution=STUDENT, reference=REFERENCE)],
                    critiques=[], corrections=None, counts={"problems": 1, "critiques": 1}),
    m.ExampleBatch(batch_id=3, examples=[m.TrainingExample(prompt="p", target="t", student_correct=True,
                                                           problem_id="arith-7", version=4, created_at=1.0,
                                                           solver="solver0")],
                   counts={"validated": 1}, timings=[m.StageTiming("validate", "validator.0", 13.0, 14.0)]),
    m.GenerationRequest(prompts=["Critique the student solution.\n", "…"],
                        sampling=SamplingParams(max_new_tokens=9, stop=("Correction:",), seed=3), min_version=2),
    m.GenerationBatch(generations=[Generation(text="Step 1: ok", prompt_tokens=30, completion_tokens=10, version=2)]),
]
IDS = [f"{i}-{type(s).__name__}" for i, s in enumerate(SAMPLES)]
MESSAGE_TYPES = [m.Problem, m.Solution, m.CritiqueRequest, m.Critique, m.Correction, m.Validation,
                 m.TrainingExample, m.WeightVersion, m.ProblemBatch, m.SolutionBatch, m.CritiqueBatch,
                 m.ExampleBatch, m.GenerationRequest, m.GenerationBatch]


def test_samples_cover_every_message_type() -> None:
    assert {type(s) for s in SAMPLES} == set(MESSAGE_TYPES)
    assert set(MESSAGE_TYPES) == set(m.AnyMessage.__args__)


@pytest.mark.parametrize("message", SAMPLES, ids=IDS)
def test_round_trip(message: m.Message) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    back = decode(data)
    assert type(back) is type(message)
    assert back == message
    assert decode(data, expected=type(message)) == message


@pytest.mark.parametrize("message", SAMPLES, ids=IDS)
def test_every_truncated_prefix_raises(message: m.Message) -> None:
    data = encode(message)
    for length in range(len(data)):
        with pytest.raises(MessageDecodeError):
            decode(data[:length])


@pytest.mark.parametrize("message", SAMPLES, ids=IDS)
def test_trailing_bytes_raise(message: m.Message) -> None:
    with pytest.raises(MessageDecodeError):
        decode(encode(message) + b"\x00")


def test_random_garbage_raises() -> None:
    rng = random.Random(20250113)
    for _ in range(3000):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        with pytest.raises(MessageDecodeError):
            decode(garbage)


def test_corrupted_bytes_never_give_a_different_valid_message() -> None:
    """Flipping a byte either raises MessageDecodeError (nothing else) or yields a complete Critique."""
    rng = random.Random(7)
    data = bytearray(encode(SAMPLES[6]))
    for _ in range(500):
        corrupt = bytearray(data)
        corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        try:
            back = decode(bytes(corrupt))
        except MessageDecodeError:
            continue
        assert type(back) is m.Critique  # one byte cannot turn the tag into another class name


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc0", msgspec.msgpack.encode({"type": "Nope", "id": "x"}), msgspec.msgpack.encode({"id": "x"}),
     msgspec.msgpack.encode([1, 2, 3]), msgspec.msgpack.encode({"type": "Problem", "id": "x"}),
     msgspec.json.encode(PROBLEM)],
    ids=["empty", "nil", "unknown-tag", "no-tag", "array", "missing-fields", "json"],
)
def test_foreign_bytes_raise(data: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        decode(data)


def test_invalid_utf8_in_a_string_field_raises() -> None:
    """msgspec reports bad UTF-8 as UnicodeDecodeError, which decode() must turn into MessageDecodeError."""
    fields = {"type": "Problem", "id": "x", "domain": "arith", "question": "ab", "answer": "1"}
    raw = msgspec.msgpack.encode(fields)
    assert raw.count(b"\xa2ab") == 1
    with pytest.raises(MessageDecodeError):
        decode(raw.replace(b"\xa2ab", b"\xa2\xff\xfe"))


def test_wrong_field_type_raises() -> None:
    raw = msgspec.msgpack.encode({"type": "Solution", "problem_id": "p", "solver": "s", "text": "t",
                                  "steps": "not a list", "answer": None, "correct": True, "version": 1})
    with pytest.raises(MessageDecodeError):
        decode(raw)


def test_expected_type_mismatch_raises() -> None:
    data = encode(PROBLEM)
    with pytest.raises(MessageDecodeError, match="expected Critique"):
        decode(data, expected=m.Critique)
    assert decode(data, expected=m.Problem) == PROBLEM


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(MessageDecodeError, ValueError)


@pytest.mark.parametrize("message", SAMPLES, ids=IDS)
def test_messages_are_frozen(message: m.Message) -> None:
    field = message.__struct_fields__[0]
    with pytest.raises(AttributeError):
        setattr(message, field, getattr(message, field))


def test_step_verdict_frozen() -> None:
    verdict = m.StepVerdict(0, True)
    with pytest.raises(AttributeError):
        verdict.correct = False  # type: ignore[misc]


@pytest.mark.parametrize("cls", [m.Solution, m.Critique, m.Correction, m.Validation, m.TrainingExample,
                                 m.WeightVersion])
def test_model_output_messages_carry_version(cls: type[m.Message]) -> None:
    assert "version" in cls.__struct_fields__
    info = msgspec.inspect.type_info(cls)
    version = next(f for f in info.fields if f.name == "version")
    assert isinstance(version.type, msgspec.inspect.IntType)


def test_version_survives_round_trip() -> None:
    for message in SAMPLES:
        if "version" in message.__struct_fields__:
            assert decode(encode(message)).version == message.version  # type: ignore[union-attr]


def test_messages_are_tagged_by_class_name() -> None:
    for message in SAMPLES:
        raw = msgspec.msgpack.decode(encode(message))
        assert raw["type"] == type(message).__name__
