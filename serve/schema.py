"""Request and response shapes of the critic endpoint, and their validation (DESIGN.md §9).

Ray-free: the Serve deployment (``serve/app.py``) only decodes bodies with these helpers, turns an
``ApiError`` into a 4xx JSON response, and runs the model. Every client mistake is an ``ApiError``
naming the field and the problem, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "problem", "code": 400}}

Bodies are decoded with msgspec whatever the request's content type (``curl -d`` sends form
encoding), so malformed JSON, wrong types and unknown ``/v1/critique`` fields are all reported the
same way.

The two OpenAI APIs, chat completions and (legacy) completions, share their sampling fields
(``SamplingFields``), their validation (``request_sampling``) and their response writer
(``ResponseFormat``: the whole body, or the server-sent events of a stream, in either API's shape);
``StopHoldback`` keeps a stop string out of streamed text.

Each shape has one definition here, a msgspec Struct: the request bodies decode into them, the
responses are encoded from them, and ``openapi_components`` publishes their JSON Schema in the
app's OpenAPI document, with the replica's ``Limits`` written in as ``maxLength``, ``maximum``,
``enum``... so that what the schema allows is exactly what the validation accepts. The few rules
JSON Schema cannot state (sums over a list, counted lines, the body's size in bytes) are in the
field descriptions, ``x-scrit-limits`` and ``info.x-scrit-max-body-bytes``.
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from scrit.backends.base import Generation, SamplingParams
from scrit.parsing import parse_critique

__all__ = [
    "DONE_EVENT",
    "ApiError",
    "Capabilities",
    "ChatBody",
    "ChatCompletion",
    "ChatCompletionChunk",
    "CompletionBody",
    "CritiqueBody",
    "CritiqueResult",
    "ErrorResponse",
    "Health",
    "Limits",
    "ModelList",
    "ResponseFormat",
    "SamplingFields",
    "StopHoldback",
    "TextCompletion",
    "chat_prompt",
    "completion_prompts",
    "critique_input",
    "critique_result",
    "decode_body",
    "encode_error",
    "error_body",
    "error_event",
    "finish",
    "model_list",
    "openapi_components",
    "render_steps",
    "request_sampling",
]

T = TypeVar("T")

# Generation stops where a new prompt would begin (the critic writes its correction to the end).
CRITIQUE_STOPS: tuple[str, ...] = ("\nProblem:", "\nCritique the student")
# Whitespace as ``str.strip()`` strips it, spelled out: regex engines disagree on ``\s`` (Python's
# includes \x1c-\x1f, Rust's and ECMA-262's do not; ECMA's has \ufeff and not \x85), so a published pattern
# ``\S`` would let a validator accept a "\x1c" problem that the check below refuses as blank.
WHITESPACE = ("\\u0009-\\u000d\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f"
              "\\u205f\\u3000")
# "Not blank": the JSON Schema pattern of fields that must hold more than whitespace.
NOT_BLANK = f"[^{WHITESPACE}]"
# Temperatures below this are greedy decoding (as in vLLM): dividing logits by a subnormal number
# overflows them to inf and sampling fails.
SAMPLING_EPS = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts
MAX_STOPS, MAX_STOP_CHARS = 8, 200
TEMPERATURE_MAX = 2.0
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
_ROLES = ("assistant", "developer", "system", "tool", "user")


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


class ErrorDetail(msgspec.Struct, kw_only=True):
    """What went wrong; ``param`` names the request field at fault (null when the body as a whole is)."""

    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(msgspec.Struct, kw_only=True):
    """The body of every error response, 4xx and 5xx (OpenAI's error shape)."""

    error: ErrorDetail


def error_body(status: int, message: str, kind: str = "invalid_request_error",
               param: str | None = None) -> dict[str, Any]:
    return msgspec.to_builtins(ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=status)))


def encode_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> bytes:
    """The JSON error body as bytes. Never raises: text that cannot be UTF-8 (lone surrogates) is
    escaped, so an error about a hostile request is itself always deliverable."""
    detail = ErrorDetail(message=message, type=kind, param=param, code=status)
    try:
        return msgspec.json.encode(ErrorResponse(error=detail))
    except UnicodeEncodeError:
        safe = lambda text: text.encode("utf-8", "backslashreplace").decode("utf-8")  # noqa: E731
        detail = ErrorDetail(message=safe(message), type=kind, param=None if param is None else safe(param),
                             code=status)
        return msgspec.json.encode(ErrorResponse(error=detail))


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Request size limits (from ``ServeConfig``): a request over any of them gets a 400.

    ``openapi_components`` writes them into the published JSON Schema.
    """

    max_problem_chars: int = 4000  # each of problem, solution (all steps together) and reference
    max_steps: int = 64
    max_prompt_chars: int = 16000  # all message contents of one chat request together; each completions prompt
    max_prompts: int = 32  # prompts in one /v1/completions request
    max_tokens: int = 2048  # the largest max_tokens a chat or completions request may ask for
    default_max_tokens: int = 512  # a chat request's, when it gives none

    @classmethod
    def from_config(cls, serve_cfg: Any, critic_max_new_tokens: int = 512) -> Limits:
        """``max_prompt_chars`` is 4x ``max_problem_chars``: a critic prompt holds a problem, a
        reference and a solution plus the instructions."""
        chars = int(serve_cfg.max_problem_chars)
        return cls(max_problem_chars=chars, max_steps=int(serve_cfg.max_steps), max_prompt_chars=4 * chars,
                   max_tokens=max(2048, int(critic_max_new_tokens)), default_max_tokens=int(critic_max_new_tokens))

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read (413 beyond): the longest allowed text with every character
        written as an escaped surrogate pair (12 bytes), plus 64 KiB for the rest of the JSON."""
        return 12 * self.max_prompt_chars + 65536


_JSON_TYPES = ("application/json", "text/json")


def decode_body(raw: bytes, kind: type[T], content_type: str | None = None) -> T:
    """``raw`` decoded as ``kind``; ApiError(400) for an empty body, malformed JSON (invalid UTF-8 anywhere,
    nesting too deep for the decoder) or wrong types. ``content_type`` only improves the message."""
    if not raw.strip():
        raise ApiError(400, "the request body must be a JSON object; it is empty")
    try:  # msgspec skips ignored fields without checking their UTF-8
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"malformed JSON in the request body: invalid UTF-8 at byte {error.start}") from error
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as error:
        unknown = _unknown_field(raw, kind) if "unknown field" in str(error) else None
        if unknown is not None:  # the name as sent: msgspec's message cannot quote an empty or `-holding name
            raise ApiError(400, f"invalid request: unknown field {unknown!r}", param=unknown) from error
        raise ApiError(400, f"invalid request: {error}", param=_param_of(str(error))) from error
    except msgspec.DecodeError as error:
        hint = ""
        if content_type and not content_type.split(";")[0].strip().lower().endswith(("/json", "+json")):
            hint = f" (the body must be JSON; it was sent as {content_type.split(';')[0].strip()!r})"
        raise ApiError(400, f"malformed JSON in the request body: {error}{hint}") from error
    except RecursionError as error:  # msgspec recurses into ignored fields too
        raise ApiError(400, "malformed JSON in the request body: arrays or objects nested too deeply") from error


def _unknown_field(raw: bytes, kind: type) -> str | None:
    """The first top-level key of ``raw`` that is not a field of ``kind`` (which forbids unknown fields)."""
    try:
        document = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    fields = set(getattr(kind, "__struct_fields__", ()))
    return next((key for key in document if key not in fields), None) if isinstance(document, dict) else None


def _param_of(message: str) -> str | None:
    """The field a msgspec error names: ``... - at `$.steps[0]``` -> ``steps[0]``."""
    match = re.search(r"at `\$\.?([^`]*)`", message) or re.search(r"(?:unknown|required) field `([^`]*)`", message)
    return match.group(1) or None if match else None


# -------------------------------------------------------------------------------------------------
# POST /v1/critique


class CritiqueBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A solution to critique: ``problem`` and exactly one of ``solution`` (text) or ``steps`` (a list);
    ``reference`` (a correct solution) selects contrastive mode."""

    problem: str
    solution: str | None = None
    steps: list[str] | None = None
    reference: str | None = None
    model: str | None = None


class CritiqueUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int


class CritiqueResult(msgspec.Struct, kw_only=True):
    """The critic's verdicts. ``correct`` is null only when the critique is unparseable (``parsed`` is
    false and ``error`` says why); ``first_error_step`` is 0-based, -1 when no step is wrong."""

    correct: bool | None
    first_error_step: int
    step_verdicts: list[bool]
    correction: str | None
    answer: str | None
    critique: str
    critic_version: int
    mode: Literal["direct", "contrastive"]
    parsed: bool
    error: str | None
    usage: CritiqueUsage


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
    """(problem, solution text, reference or None) after every check; ApiError(400) naming the field.

    Lengths are of the text as sent (before stripping), as the published ``maxLength`` counts them.
    """
    _check_text("problem", body.problem, limits)
    problem = body.problem.strip()
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
            _check_chars(f"steps[{index}]", step, limits)
        total = sum(len(step) for step in body.steps)
        if total > limits.max_problem_chars:
            raise ApiError(400, f"'steps' are too long: {total} characters together "
                                f"(at most {limits.max_problem_chars})", param="steps")
        solution = render_steps(body.steps)
    else:
        _check_text("solution", body.solution or "", limits)
        solution = (body.solution or "").strip()
        lines = sum(1 for line in solution.splitlines() if line.strip())
        if lines > limits.max_steps + 1:  # +1: the final answer line
            raise ApiError(400, f"too many steps: the solution has {lines} lines (at most {limits.max_steps + 1})",
                           param="solution")
    reference = None
    if body.reference is not None:
        _check_text("reference", body.reference, limits)
        reference = body.reference.strip()
    return problem, solution, reference


def _check_text(name: str, text: str, limits: Limits) -> None:
    """A required text field: at most ``max_problem_chars`` characters and not blank."""
    _check_chars(name, text, limits)
    if not text.strip():
        raise ApiError(400, f"'{name}' must not be empty", param=name)


def _check_chars(name: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_problem_chars:
        raise ApiError(400, f"'{name}' is too long: {len(text)} characters (at most {limits.max_problem_chars})",
                       param=name)


def critique_result(text: str, generation: Generation, mode: str) -> CritiqueResult:
    """The /v1/critique response for the critic's output ``text``."""
    parsed = parse_critique(text)
    return CritiqueResult(
        correct=parsed.judged_correct if parsed.parsed else None,
        first_error_step=parsed.first_error_step,
        step_verdicts=list(parsed.step_verdicts),
        correction=parsed.correction,
        answer=parsed.answer,
        critique=text,
        critic_version=generation.version,
        mode="contrastive" if mode == "contrastive" else "direct",
        parsed=parsed.parsed,
        error=parsed.error,
        usage=CritiqueUsage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
    )


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


# JSON has one number type: 5.0 and 1e3 are integers to JSON Schema (and to most JSON encoders), so
# integer fields decode as int | float and ``_whole`` turns integral floats into ints (5.5 is a 400).
Integer = int | float


class SamplingFields(msgspec.Struct, kw_only=True):
    """The fields chat completions and completions share (``request_sampling`` checks them)."""

    model: str | None = None
    max_tokens: Integer | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: Integer | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Integer = 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatBody(SamplingFields, kw_only=True):
    """The OpenAI fields the endpoint uses; other fields (user, logit_bias, ...) are ignored."""

    messages: list[ChatMessage]
    max_completion_tokens: Integer | None = None


class CompletionBody(SamplingFields, kw_only=True):
    """A legacy completions request: ``prompt`` is one text or a list of texts (one choice each, in order).

    ``echo``, ``logprobs``, ``best_of`` and ``suffix`` are refused when they ask for what the endpoint
    does not do (a harness must not get a silently different answer); other fields are ignored."""

    prompt: str | list[str]
    echo: bool | None = None
    logprobs: Integer | None = None
    best_of: Integer | None = None
    suffix: str | None = None


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"]
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    """``stop_reason`` is the stop string that ended the text (vLLM's field; the text omits it)."""

    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    stop_reason: str | None


class ChatCompletion(msgspec.Struct, kw_only=True):
    """A chat completion (OpenAI's shape) plus the critic version that wrote it."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    critic_version: int
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None
    stop_reason: str | None | UnsetType = UNSET


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One ``data:`` event of a streamed completion (``stream: true``); the stream ends with
    ``data: [DONE]``. With ``stream_options.include_usage`` the last chunk has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    critic_version: int
    choices: list[ChunkChoice]
    usage: Usage | UnsetType = UNSET


class TextChoice(msgspec.Struct, kw_only=True):
    """One prompt's completion (``index``: the prompt's place in the request); in a streamed chunk ``text``
    is the new piece and ``finish_reason`` is null until the choice's last chunk."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: str | None | UnsetType = UNSET


class TextCompletion(msgspec.Struct, kw_only=True):
    """A completion (OpenAI's ``text_completion``) plus the critic version that wrote it. Streamed
    (``stream: true``), each ``data:`` event is one of these with the new text, the stream ends with
    ``data: [DONE]``, and with ``stream_options.include_usage`` the last one has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    critic_version: int
    choices: list[TextChoice]
    usage: Usage | UnsetType = UNSET


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
            raise ApiError(400, f"messages[{index}].role {message.role!r} is not one of {list(_ROLES)}",
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
                                        f"(got type {part.type!r}{'' if part.text is not None else ' without text'})",
                                   param=f"messages[{index}].content[{part_index}]")
                parts.append(part.text)
            text = "".join(parts)
        if len(text) > limits.max_prompt_chars:
            raise ApiError(400, f"messages[{index}].content is too long: {len(text)} characters "
                                f"(at most {limits.max_prompt_chars})", param=f"messages[{index}].content")
        texts.append(text)
    prompt = texts[0] if len(texts) == 1 else "\n".join(t for t in texts if t)
    if not prompt.strip():
        raise ApiError(400, "the messages contain no text", param="messages")
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(400, f"the messages are too long: {len(prompt)} characters together "
                            f"(at most {limits.max_prompt_chars})", param="messages")
    return prompt


def completion_prompts(body: CompletionBody, limits: Limits) -> list[str]:
    """The prompts of a completions request (one text, or 1 to ``max_prompts`` of them), each used as it
    is; ApiError(400) for a blank or too long one and for the options the endpoint does not have."""
    for name, value, allowed in (("echo", body.echo, (None, False)), ("logprobs", body.logprobs, (None,)),
                                 ("best_of", _whole("best_of", body.best_of), (None, 1)),
                                 ("suffix", body.suffix, (None,))):
        if value not in allowed:
            raise ApiError(400, f"'{name}' is not supported by this endpoint (got {value!r})", param=name)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > limits.max_prompts:
        raise ApiError(400, f"'prompt' must be a string or a list of 1 to {limits.max_prompts} strings "
                            f"(got {len(prompts)})", param="prompt")
    for index, prompt in enumerate(prompts):
        param = "prompt" if isinstance(body.prompt, str) else f"prompt[{index}]"
        if len(prompt) > limits.max_prompt_chars:
            raise ApiError(400, f"'{param}' is too long: {len(prompt)} characters (at most {limits.max_prompt_chars})",
                           param=param)
        if not prompt.strip():
            raise ApiError(400, f"'{param}' must not be empty", param=param)
    return prompts


def request_sampling(body: ChatBody | CompletionBody, limits: Limits) -> SamplingParams:
    """SamplingParams for a chat or completions request; ApiError(400) for out-of-range values.

    Without a token limit a chat request gets ``limits.default_max_tokens`` (the critic's length) and a
    completions request OpenAI's 16. ``max_completion_tokens`` (chat only, OpenAI's newer name) wins over
    ``max_tokens``, but both are checked.
    """
    if _whole("n", body.n) != 1:
        raise ApiError(400, f"'n' must be 1 (got {body.n})", param="n")
    names = ("max_tokens", "max_completion_tokens") if isinstance(body, ChatBody) else ("max_tokens",)
    counts = {name: _whole(name, getattr(body, name)) for name in names}
    for name, value in counts.items():
        if value is not None and not 1 <= value <= limits.max_tokens:
            raise ApiError(400, f"'{name}' must be between 1 and {limits.max_tokens} (got {value})", param=name)
    max_tokens = counts.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = counts["max_tokens"]
    if max_tokens is None:
        default = limits.default_max_tokens if isinstance(body, ChatBody) else COMPLETIONS_DEFAULT_MAX_TOKENS
        max_tokens = min(default, limits.max_tokens)
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    if not 0.0 <= temperature <= TEMPERATURE_MAX:
        raise ApiError(400, f"'temperature' must be between 0 and {TEMPERATURE_MAX:g} (got {temperature})",
                       param="temperature")
    if temperature < SAMPLING_EPS:
        temperature = 0.0
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"'top_p' must be in (0, 1] (got {top_p})", param="top_p")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"'stop' must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                            "characters", param="stop")
    seed = _whole("seed", body.seed)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(400, f"'seed' must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (got {body.seed})",
                       param="seed")
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                          seed=seed)


def _whole(name: str, value: int | float | None) -> int | None:
    """An integer field's value as an int: 5.0 is 5; 5.5 is a 400."""
    if value is None or isinstance(value, int):
        return value
    if not value.is_integer():
        raise ApiError(400, f"'{name}' must be an integer (got {value})", param=name)
    return int(value)


def finish(generation: Generation, sampling: SamplingParams) -> tuple[str, Literal["stop", "length"], str | None]:
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


class StopHoldback:
    """What of a streamed generation may be sent so far: never a stop string, nor the start of one.

    The engine reports text with the stop string kept (scrit's convention) and ends the request when
    one is complete, so while it runs the text holds no whole stop string; ``feed`` holds back the
    longest tail that could still become one, and ``finish`` sends the rest of the final text, which
    ``finish()`` has cut at its stop string, so the pieces add up to the non-streamed text exactly.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.text = ""
        self.sent = 0  # characters of ``text`` sent
        # Every proper prefix of a stop string, by its last character, longest first: only those ending in
        # the text's last character can be its tail (one dict lookup per piece).
        self._prefixes: dict[str, list[str]] = {}
        for marker in stop:
            for k in range(1, len(marker)):
                self._prefixes.setdefault(marker[k - 1], []).append(marker[:k])
        for prefixes in self._prefixes.values():
            prefixes.sort(key=len, reverse=True)

    def feed(self, delta: str) -> str:
        """The text now safe to send after ``delta`` arrived (possibly empty)."""
        self.text += delta
        candidates = self._prefixes.get(self.text[-1:], ())
        held = next((len(prefix) for prefix in candidates if self.text.endswith(prefix)), 0)
        safe = len(self.text) - held
        piece = self.text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return piece

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (the whole answer, stop string cut) after what was sent."""
        piece = final_text[self.sent:]
        self.sent = len(final_text)
        return piece


def _usage(generations: list[Generation]) -> Usage:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.completion_tokens for g in generations)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ResponseFormat:
    """One response's bodies in one of the two OpenAI APIs: ``chat`` (``chat.completion`` and its
    ``chat.completion.chunk`` events) or ``text`` (``text_completion``, also its events). The id, creation
    time and critic version are fixed per response; choice ``index`` is the prompt's place (0 for chat)."""

    def __init__(self, api: Literal["chat", "text"], model: str, version: int) -> None:
        self.api = api
        self.model = model
        self.version = version
        self.id = f"{'chatcmpl' if api == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def completion(self, generations: list[Generation], sampling: SamplingParams) -> ChatCompletion | TextCompletion:
        """The whole (non-streamed) response."""
        finished = [finish(generation, sampling) for generation in generations]
        if self.api == "chat":
            choices: list[Any] = [ChatChoice(index=i, message=AssistantMessage(role="assistant", content=text),
                                             finish_reason=reason, stop_reason=stop)
                                  for i, (text, reason, stop) in enumerate(finished)]
            return ChatCompletion(id=self.id, object="chat.completion", created=self.created, model=self.model,
                                  critic_version=self.version, choices=choices, usage=_usage(generations))
        choices = [TextChoice(index=i, text=text, finish_reason=reason, stop_reason=stop)
                   for i, (text, reason, stop) in enumerate(finished)]
        return TextCompletion(id=self.id, object="text_completion", created=self.created, model=self.model,
                              critic_version=self.version, choices=choices, usage=_usage(generations))

    def opening(self, count: int) -> bytes:
        """The events before any text: chat announces the assistant role per choice, text sends none."""
        if self.api == "text":
            return b""
        return b"".join(self._event([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""),
                                                 finish_reason=None)]) for i in range(count))

    def piece(self, index: int, text: str) -> bytes:
        """An event with the next piece of choice ``index``'s text."""
        if self.api == "chat":
            return self._event([ChunkChoice(index=index, delta=ChunkDelta(content=text), finish_reason=None)])
        return self._event([TextChoice(index=index, text=text, finish_reason=None)])

    def end(self, index: int, reason: Literal["stop", "length"], stop: str | None) -> bytes:
        """The event that ends choice ``index``: its finish_reason (and the stop string that ended it)."""
        if self.api == "chat":
            return self._event([ChunkChoice(index=index, delta=ChunkDelta(), finish_reason=reason, stop_reason=stop)])
        return self._event([TextChoice(index=index, text="", finish_reason=reason, stop_reason=stop)])

    def usage(self, generations: list[Generation]) -> bytes:
        """The last event with ``stream_options.include_usage``: no choices, the usage of all of them."""
        return self._event([], _usage(generations))

    def _event(self, choices: list[Any], usage: Usage | UnsetType = UNSET) -> bytes:
        chunk: ChatCompletionChunk | TextCompletion
        if self.api == "chat":
            chunk = ChatCompletionChunk(id=self.id, object="chat.completion.chunk", created=self.created,
                                        model=self.model, critic_version=self.version, choices=choices, usage=usage)
        else:
            chunk = TextCompletion(id=self.id, object="text_completion", created=self.created, model=self.model,
                                   critic_version=self.version, choices=choices, usage=usage)
        return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


def error_event(status: int, message: str, kind: str = "server_error") -> bytes:
    """A failure after a stream began (its status line is sent): the error body as one event, as vLLM
    sends it (the ``openai`` client raises it as an ``APIError``)."""
    return b"data: " + encode_error(status, message, kind) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


# -------------------------------------------------------------------------------------------------
# GET /v1/models, GET /healthz


class Capabilities(msgspec.Struct, kw_only=True):
    """How this replica's engine serves: with ``token_streaming`` a streamed response sends text as the
    engine makes it (vLLM), without it the text is made first and then sent in pieces (HF); with
    ``continuous_batching`` requests enter the engine as they arrive and finish independently, without
    it they are grouped into batches (``serve.max_batch_size``) that run to their end together."""

    backend: str
    token_streaming: bool
    continuous_batching: bool


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    critic_version: int
    capabilities: Capabilities


class ModelList(msgspec.Struct, kw_only=True):
    """The one model this endpoint serves, and the critic version it serves now."""

    object: Literal["list"]
    data: list[ModelCard]


def model_list(model: str, created: float, version: int, capabilities: Capabilities) -> ModelList:
    return ModelList(object="list", data=[ModelCard(id=model, object="model", created=int(created), owned_by="scrit",
                                                     critic_version=version, capabilities=capabilities)])


class Health(msgspec.Struct, kw_only=True):
    """Liveness and the replica's version; the replica's service adds its swap counters and history."""

    status: Literal["ok"]
    replica: str
    model: str
    critic_version: int


# -------------------------------------------------------------------------------------------------
# The published JSON Schema (OpenAPI components)

PUBLISHED: tuple[type, ...] = (CritiqueBody, CritiqueResult, ChatBody, ChatCompletion, ChatCompletionChunk,
                               CompletionBody, TextCompletion, ModelList, Health, ErrorResponse)
SCHEMA_REF = "#/components/schemas/{name}"


def _branch(prop: dict[str, Any], kind: str) -> dict[str, Any]:
    """The part of a property's schema of JSON type ``kind`` (msgspec writes ``X | None`` as anyOf)."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == kind:
            return option
    raise KeyError(f"no {kind!r} branch in {prop}")


def _text(chars: int, blank: bool = False) -> dict[str, Any]:
    text: dict[str, Any] = {"maxLength": chars}
    if not blank:
        text.update(minLength=1, pattern=NOT_BLANK)
    return text


def openapi_components(limits: Limits, model_name: str) -> dict[str, Any]:
    """JSON Schemas of every request and response body, named as ``#/components/schemas/NAME``.

    The shapes come from the Structs above; the replica's ``limits`` and model name are written in,
    so the schema allows exactly what ``critique_input``, ``chat_prompt`` and ``chat_sampling``
    accept, except for the rules JSON Schema cannot state, which the descriptions give.
    """
    _, components = msgspec.json.schema_components(PUBLISHED, ref_template=SCHEMA_REF)
    components = copy.deepcopy(components)
    chars, steps, prompt = limits.max_problem_chars, limits.max_steps, limits.max_prompt_chars

    critique = components["CritiqueBody"]
    props = critique["properties"]
    props["problem"].update(_text(chars), description=f"The problem; not blank, at most {chars} characters.")
    _branch(props["solution"], "string").update(_text(chars))
    props["solution"]["description"] = (f"The solution as text, one step per line: not blank, at most {chars} "
                                        f"characters and {steps + 1} non-blank lines (the steps and the answer).")
    _branch(props["steps"], "array").update(minItems=1, maxItems=steps, items={"type": "string", **_text(chars)})
    props["steps"]["description"] = (f"The solution as a list of steps: 1 to {steps} non-blank steps of at most "
                                     f"{chars} characters together.")
    _branch(props["reference"], "string").update(_text(chars))
    props["reference"]["description"] = f"A correct solution (contrastive mode); not blank, at most {chars} characters."
    _branch(props["model"], "string")["enum"] = [model_name]
    critique["oneOf"] = [  # exactly one of the two, and not null
        {"required": ["solution"], "properties": {"solution": {"type": "string"}}},
        {"required": ["steps"], "properties": {"steps": {"type": "array"}}},
    ]
    critique["x-scrit-limits"] = {"steps_total_chars": chars, "solution_non_blank_lines": steps + 1}

    part = components["ContentPart"]
    part["properties"]["type"] = {"type": "string", "enum": ["text"]}
    part["properties"]["text"] = {"type": "string", "maxLength": prompt}
    part["required"] = ["type", "text"]
    message = components["ChatMessage"]
    message["properties"]["role"] = {"type": "string", "enum": list(_ROLES)}
    _branch(message["properties"]["content"], "string")["maxLength"] = prompt

    for name in ("ChatBody", "CompletionBody"):  # the sampling fields both share (request_sampling)
        props = components[name]["properties"]
        _branch(props["model"], "string")["enum"] = [model_name]
        integers = [("max_tokens", 1, limits.max_tokens), ("seed", *SEED_RANGE), ("n", 1, 1)]
        if name == "ChatBody":
            integers.append(("max_completion_tokens", 1, limits.max_tokens))
        else:
            integers.append(("best_of", 1, 1))
        for field_name, low, high in integers:
            _integer(props, field_name, low, high)
        _branch(props["temperature"], "number").update(minimum=0, maximum=TEMPERATURE_MAX)
        props["temperature"]["description"] = f"Below {SAMPLING_EPS:g}: greedy decoding. Default 1."
        _branch(props["top_p"], "number").update(exclusiveMinimum=0, maximum=1)
        _branch(props["stop"], "string").update(minLength=1, maxLength=MAX_STOP_CHARS)
        _branch(props["stop"], "array").update(maxItems=MAX_STOPS, items={"type": "string", "minLength": 1,
                                                                          "maxLength": MAX_STOP_CHARS})

    chat = components["ChatBody"]
    props = chat["properties"]
    has_text = {"required": ["content"], "properties": {"content": {"anyOf": [
        {"type": "string", "pattern": NOT_BLANK},
        {"type": "array", "contains": {"required": ["text"], "properties": {"text": {"pattern": NOT_BLANK}}}},
    ]}}}
    props["messages"].update(minItems=1, contains=has_text, description=(
        f"The conversation; some message must hold text, and all contents together are at most {prompt} characters."))
    props["max_completion_tokens"]["description"] = "Wins over max_tokens when both are given."
    props["max_tokens"]["description"] = f"Default {limits.default_max_tokens} (the critic's length)."
    chat["x-scrit-limits"] = {"messages_total_chars": prompt}

    props = components["CompletionBody"]["properties"]
    text = {"type": "string", **_text(prompt)}
    props["prompt"] = {"anyOf": [text, {"type": "array", "minItems": 1, "maxItems": limits.max_prompts, "items": text}],
                       "description": f"One prompt, or a list of 1 to {limits.max_prompts} (one choice each, in "
                                     f"order); each not blank and at most {prompt} characters, used as it is."}
    props["max_tokens"]["description"] = f"Default {COMPLETIONS_DEFAULT_MAX_TOKENS} (OpenAI's)."
    props["echo"] = {"anyOf": [{"type": "boolean", "enum": [False]}, {"type": "null"}],
                     "description": "Not supported: only false or null."}
    for name in ("logprobs", "suffix"):
        props[name] = {"type": "null", "description": "Not supported: only null."}
    props["best_of"]["description"] = "Only 1 (or null)."

    components["ErrorDetail"]["properties"]["message"]["minLength"] = 1
    return components


def _integer(props: dict[str, Any], name: str, low: int, high: int) -> None:
    """An integer field's schema: ``low..high`` (or null where the field may be null); not ``Integer``'s
    "number" branch (integral floats are accepted, but a schema need not offer them)."""
    integer = {"type": "integer", "minimum": low, "maximum": high}
    nullable = any(option.get("type") == "null" for option in props[name].get("anyOf", []))
    props[name] = {key: value for key, value in props[name].items() if key != "anyOf"}
    props[name].update({"anyOf": [integer, {"type": "null"}]} if nullable else integer)
