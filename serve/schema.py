"""Request and response shapes of the critic endpoint, and their validation (DESIGN.md §9).

Ray-free: the Serve deployment (``serve/app.py``) only decodes bodies with these helpers, turns an
``ApiError`` into a 4xx JSON response, and runs the model. Every client mistake is an ``ApiError``
naming the field and the problem, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "problem", "code": 400}}

Bodies are decoded with msgspec whatever the request's content type (``curl -d`` sends form
encoding), so malformed JSON, wrong types and unknown ``/v1/critique`` fields are all reported the
same way.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Iterator, TypeVar

import msgspec

from scrit.backends.base import Generation, SamplingParams
from scrit.parsing import parse_critique

__all__ = [
    "ApiError",
    "ChatBody",
    "CritiqueBody",
    "Limits",
    "chat_chunks",
    "chat_completion",
    "chat_prompt",
    "chat_sampling",
    "critique_input",
    "critique_result",
    "decode_body",
    "error_body",
    "render_steps",
]

T = TypeVar("T")

# Generation stops where a new prompt would begin (the critic writes its correction to the end).
CRITIQUE_STOPS: tuple[str, ...] = ("\nProblem:", "\nCritique the student")


class ApiError(Exception):
    """A request the endpoint refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.kind, self.param)


def error_body(status: int, message: str, kind: str = "invalid_request_error",
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Request size limits (from ``ServeConfig``): a request over any of them gets a 400."""

    max_problem_chars: int = 4000  # each of problem, solution (all steps together) and reference
    max_steps: int = 64
    max_prompt_chars: int = 16000  # all message contents of one chat request together
    max_tokens: int = 2048  # the largest max_tokens a chat request may ask for
    default_max_tokens: int = 512

    @classmethod
    def from_config(cls, serve_cfg: Any, critic_max_new_tokens: int = 512) -> "Limits":
        """``max_prompt_chars`` is 4x ``max_problem_chars``: a critic prompt holds a problem, a
        reference and a solution plus the instructions."""
        chars = int(serve_cfg.max_problem_chars)
        return cls(max_problem_chars=chars, max_steps=int(serve_cfg.max_steps), max_prompt_chars=4 * chars,
                   max_tokens=max(2048, int(critic_max_new_tokens)), default_max_tokens=int(critic_max_new_tokens))


def decode_body(raw: bytes, kind: type[T]) -> T:
    """``raw`` decoded as ``kind``; ApiError(400) for an empty body, malformed JSON or wrong types."""
    if not raw.strip():
        raise ApiError(400, "the request body must be a JSON object; it is empty")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as error:
        raise ApiError(400, f"invalid request: {error}", param=_param_of(str(error))) from error
    except msgspec.DecodeError as error:
        raise ApiError(400, f"malformed JSON in the request body: {error}") from error


def _param_of(message: str) -> str | None:
    """The field a msgspec error names: ``... - at `$.steps[0]``` -> ``steps[0]``."""
    match = re.search(r"at `\$\.?([^`]*)`", message) or re.search(r"(?:unknown|required) field `([^`]*)`", message)
    return match.group(1) or None if match else None


# -------------------------------------------------------------------------------------------------
# POST /v1/critique


class CritiqueBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``{"problem", "solution"}`` or ``{"problem", "steps"}``; ``reference`` selects contrastive mode."""

    problem: str
    solution: str | None = None
    steps: list[str] | None = None
    reference: str | None = None
    model: str | None = None


_STEP_PREFIX = re.compile(r"^\s*step\s*\d+\s*[:.)]\s*", re.IGNORECASE)


def render_steps(steps: list[str]) -> str:
    """A solution text from its steps, laid out as the critic was trained to read them.

    Arith steps (``12 + 5 = 17``) get the arith layout (``Step k:`` lines and the boxed answer, as in
    ``scrit eval``); anything else numbered ``Step k:`` lines. A ``Step k:`` prefix the client already
    wrote is not doubled.
    """
    from scrit.domains import arith
    from scrit.domains.evalsets import render_numbered_steps

    bare = [_STEP_PREFIX.sub("", step, count=1).strip() for step in steps]
    if all(arith.STEP_PATTERN.match(step) for step in bare):
        return arith.render_solution(bare)
    return render_numbered_steps(bare)


def critique_input(body: CritiqueBody, limits: Limits) -> tuple[str, str, str | None]:
    """(problem, solution text, reference or None) after every check; ApiError(400) naming the field."""
    problem = body.problem.strip()
    if not problem:
        raise ApiError(400, "'problem' must not be empty", param="problem")
    _check_chars("problem", problem, limits)
    if (body.solution is None) == (body.steps is None):
        raise ApiError(400, "give exactly one of 'solution' (a string) or 'steps' (a list of strings)",
                       param="solution")
    if body.steps is not None:
        if not body.steps:
            raise ApiError(400, "'steps' must not be empty", param="steps")
        if len(body.steps) > limits.max_steps:
            raise ApiError(400, f"too many steps: {len(body.steps)} (at most {limits.max_steps})", param="steps")
        for index, step in enumerate(body.steps):
            if not step.strip():
                raise ApiError(400, f"step {index} is empty", param=f"steps[{index}]")
        if sum(len(step) for step in body.steps) > limits.max_problem_chars:
            raise ApiError(400, f"'steps' are too long: {sum(len(s) for s in body.steps)} characters "
                                f"(at most {limits.max_problem_chars})", param="steps")
        solution = render_steps(body.steps)
    else:
        solution = (body.solution or "").strip()
        if not solution:
            raise ApiError(400, "'solution' must not be empty", param="solution")
        _check_chars("solution", solution, limits)
        lines = sum(1 for line in solution.splitlines() if line.strip())
        if lines > limits.max_steps + 1:  # +1: the final answer line
            raise ApiError(400, f"too many steps: the solution has {lines} lines (at most {limits.max_steps})",
                           param="solution")
    reference = None
    if body.reference is not None:
        reference = body.reference.strip()
        if not reference:
            raise ApiError(400, "'reference' must not be empty when given", param="reference")
        _check_chars("reference", reference, limits)
    return problem, solution, reference


def _check_chars(name: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_problem_chars:
        raise ApiError(400, f"'{name}' is too long: {len(text)} characters (at most {limits.max_problem_chars})",
                       param=name)


def critique_result(text: str, generation: Generation, mode: str) -> dict[str, Any]:
    """The /v1/critique response for the critic's output ``text``.

    ``correct`` is null only when the critique is unparseable (``parsed`` false, ``error`` says why).
    """
    parsed = parse_critique(text)
    return {
        "correct": parsed.judged_correct if parsed.parsed else None,
        "first_error_step": parsed.first_error_step,
        "step_verdicts": list(parsed.step_verdicts),
        "correction": parsed.correction,
        "answer": parsed.answer,
        "critique": text,
        "critic_version": generation.version,
        "mode": mode,
        "parsed": parsed.parsed,
        "error": parsed.error,
        "usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens},
    }


# -------------------------------------------------------------------------------------------------
# POST /v1/chat/completions


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatBody(msgspec.Struct, kw_only=True):
    """The OpenAI fields the endpoint uses; other fields (user, logit_bias, ...) are ignored."""

    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def chat_prompt(body: ChatBody, limits: Limits) -> str:
    """The model's prompt: the messages' text in order (one user message: exactly its text).

    The critic is a prompt-driven completion model (the seed has no chat template), so a client such
    as ``OpenAIHTTPBackend`` sends the whole critic prompt as one user message.
    """
    if not body.messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    texts = []
    for index, message in enumerate(body.messages):
        if message.role not in _ROLES:
            raise ApiError(400, f"messages[{index}].role {message.role!r} is not one of {sorted(_ROLES)}",
                           param=f"messages[{index}].role")
        content = message.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            parts = []
            for part_index, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"messages[{index}].content[{part_index}]: only text parts are supported "
                                        f"(got type {part.type!r})", param=f"messages[{index}].content")
                parts.append(part.text)
            text = "".join(parts)
        texts.append(text)
    prompt = texts[0] if len(texts) == 1 else "\n".join(t for t in texts if t)
    if not prompt.strip():
        raise ApiError(400, "the messages contain no text", param="messages")
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(400, f"the messages are too long: {len(prompt)} characters (at most {limits.max_prompt_chars})",
                       param="messages")
    return prompt


def chat_sampling(body: ChatBody, limits: Limits) -> SamplingParams:
    """SamplingParams for a chat request; ApiError(400) for out-of-range values."""
    if body.n != 1:
        raise ApiError(400, f"'n' must be 1 (got {body.n})", param="n")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"'max_tokens' must be between 1 and {limits.max_tokens} (got {max_tokens})",
                       param="max_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"'temperature' must be between 0 and 2 (got {temperature})", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"'top_p' must be in (0, 1] (got {top_p})", param="top_p")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 8 or any(not s or len(s) > 200 for s in stop):
        raise ApiError(400, "'stop' must be at most 8 non-empty strings of at most 200 characters", param="stop")
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                          seed=body.seed)


def _finish(generation: Generation, sampling: SamplingParams) -> tuple[str, str, str | None]:
    """(text without the matched stop string, finish_reason, stop_reason) as vLLM reports them.

    OpenAI servers drop the stop string from the text; vLLM names it in ``stop_reason``, which
    ``OpenAIHTTPBackend`` uses to put it back (scrit keeps stop strings).
    """
    text = generation.text
    for marker in sampling.stop:
        if text.endswith(marker):
            return text[: -len(marker)], "stop", marker
    if generation.completion_tokens >= sampling.max_new_tokens:
        return text, "length", None
    return text, "stop", None


def _usage(generation: Generation) -> dict[str, int]:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def chat_completion(generation: Generation, sampling: SamplingParams, model: str) -> dict[str, Any]:
    text, finish, stop_reason = _finish(generation, sampling)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "critic_version": generation.version,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish, "stop_reason": stop_reason}],
        "usage": _usage(generation),
    }


def chat_chunks(generation: Generation, sampling: SamplingParams, model: str, include_usage: bool = False,
                piece_chars: int = 16) -> Iterator[bytes]:
    """Server-sent events of a streamed chat completion, ending with ``data: [DONE]``.

    The text is generated by one batched forward pass and then sent in pieces of ``piece_chars``
    characters: the wire format is OpenAI's streaming format, the generation itself is not incremental.
    """
    text, finish, stop_reason = _finish(generation, sampling)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
        chunk: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "critic_version": generation.version,
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, **extra}]}
        return b"data: " + msgspec.json.encode(chunk) + b"\n\n"

    yield event({"role": "assistant", "content": ""})
    for start in range(0, len(text), piece_chars):
        yield event({"content": text[start:start + piece_chars]})
    yield event({}, finish, stop_reason=stop_reason)
    if include_usage:
        usage = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [], "usage": _usage(generation)}
        yield b"data: " + msgspec.json.encode(usage) + b"\n\n"
    yield b"data: [DONE]\n\n"
