"""Every message exchanged between roles (DESIGN.md §3).

All are frozen, tagged msgspec structs so they cross process boundaries and storage as msgpack, and
a truncated or foreign byte string fails loudly (``MessageDecodeError``) instead of half-decoding.
Every message carrying model output records the model version that produced it.
"""

from __future__ import annotations

import time
from typing import Union

import msgspec

from scrit.backends.base import Generation, SamplingParams


class Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base for all messages; the class name is the msgpack tag."""


class Problem(Message):
    id: str
    domain: str
    question: str
    answer: str
    reference: str | None = None  # a known-correct worked solution, where the domain has one


class Solution(Message):
    problem_id: str
    solver: str
    text: str
    steps: list[str]
    answer: str | None
    correct: bool  # judged by the final answer alone, never by steps
    version: int = 0


class CritiqueRequest(Message):
    problem: Problem
    solution: Solution
    reference: Solution | None = None  # None = direct critique
    mode: str = "contrastive"  # contrastive | direct | bug_injection


class StepVerdict(msgspec.Struct, frozen=True):
    index: int  # 0-based
    correct: bool


class Critique(Message):
    problem_id: str
    mode: str
    raw_text: str
    parsed: bool
    step_verdicts: list[StepVerdict]
    judged_correct: bool | None
    first_error_step: int  # 0-based, -1 = none (also when unparseable)
    correction: str | None
    answer: str | None
    version: int


class Correction(Message):
    problem_id: str
    text: str
    steps: list[str]
    answer: str | None
    version: int


class Validation(Message):
    problem_id: str
    passed: bool
    verdict_correct: bool | None  # the validator's "correct, no wrong step" judgment
    answer_matches: bool | None  # None when the answer check is switched off
    raw_text: str
    version: int


class TrainingExample(Message):
    prompt: str  # problem + student solution, never the reference
    target: str  # step verdicts + conclusion + correction, no reference analysis
    student_correct: bool
    problem_id: str
    version: int  # critic version that produced the critique
    created_at: float = msgspec.field(default_factory=time.time)
    solver: str = ""  # the solver that wrote the student solution (reports per solver; "" in old logs)
    batch_id: int = -1  # the pipeline batch that made it: a batch sent again after a crash is stored once


class WeightVersion(Message):
    version: int
    uri: str  # a checkpoint directory readable by every subscriber
    checksum: str
    created_at: float = msgspec.field(default_factory=time.time)
    step: int = 0


# ------------------------------------------------------------------------------------------------
# Batches flowing through the producer pipeline (solver -> critic -> [corrector] -> validator -> buffer)


class StageTiming(msgspec.Struct, frozen=True):
    """When one stage worked on a batch (wall-clock seconds): the pipeline's overlap is read from these."""

    stage: str
    actor: str
    start: float
    end: float
    tokens: int = 0  # completion tokens the stage generated for the batch


class ProblemBatch(Message):
    batch_id: int
    problems: list[Problem]


class SolutionBatch(Message):
    batch_id: int
    solver: str
    solutions: list[Solution]
    timings: list[StageTiming] = msgspec.field(default_factory=list)


class CritiqueBatch(Message):
    """Critique requests of one batch with their critiques and (once written) corrections."""

    batch_id: int
    requests: list[CritiqueRequest]
    critiques: list[Critique]
    corrections: list[Correction] | None  # None until a corrector has written them
    counts: dict[str, int]
    timings: list[StageTiming] = msgspec.field(default_factory=list)


class ExampleBatch(Message):
    """A batch's kept critiques as training examples, with the counts of every stage."""

    batch_id: int
    examples: list[TrainingExample]
    counts: dict[str, int]
    timings: list[StageTiming] = msgspec.field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Roles and their model's engine (actors/engines.py)


class GenerationRequest(Message):
    """Prompts a role sends to its model's engine; ``min_version``: the engine must serve at least this
    critic version (the evaluator scoring a new version)."""

    prompts: list[str]
    sampling: SamplingParams
    min_version: int = 0
    engine: str = ""  # which of the host's engines (a host may hold several models); "" = its only one


class GenerationBatch(Message):
    """The engine's answer: one Generation per prompt, in order, each naming the version that made it."""

    generations: list[Generation]


AnyMessage = Union[
    Problem, Solution, CritiqueRequest, Critique, Correction, Validation, TrainingExample, WeightVersion,
    ProblemBatch, SolutionBatch, CritiqueBatch, ExampleBatch, GenerationRequest, GenerationBatch,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


class MessageDecodeError(ValueError):
    """Bytes that are not one complete, valid scrit message."""


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, expected: type[Message] | None = None) -> AnyMessage:
    """Decode msgpack bytes into a message; raises MessageDecodeError on anything incomplete or foreign."""
    try:
        message = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as error:
        raise MessageDecodeError(f"not a valid scrit message ({len(data)} bytes): {error}") from error
    if expected is not None and not isinstance(message, expected):
        raise MessageDecodeError(f"expected {expected.__name__}, got {type(message).__name__}")
    return message
