"""Hostile input against the critic endpoint (issue 14, item 5): fuzzing, oversized and malformed bodies, the API key.

Ray-free checks first (the published JSON Schema and the validation agree), then one real Serve application
on 127.0.0.1 (``ray.init(num_cpus=2)``, the shipped seed critic, an API key) started once for the module.
Its limits are small (200-character problems, at most 8 generated tokens) so that the thousand-odd requests
schemathesis generates from the app's own ``/openapi.json`` each cost milliseconds of generation.
"""

from __future__ import annotations

import collections
import json
import os
import re
import select
import socket
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from helpers import free_port
import schemathesis

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scrit.serve.schema import (  # noqa: E402
    NOT_BLANK,
    ApiError,
    ChatBody,
    CompletionBody,
    CritiqueBody,
    Limits,
    chat_prompt,
    completion_prompts,
    critique_input,
    decode_body,
    openapi_components,
    request_sampling,
)

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(120.0)
MODEL = "scrit-critic"
# Cheap requests: generation is at most 8 tokens, texts at most 200 (problem) / 800 (chat) characters.
LIMITS = Limits(max_problem_chars=200, max_steps=8, max_prompt_chars=800, max_prompts=4, max_tokens=8,
                default_max_tokens=8)
ROUTES = {"GET /healthz", "GET /v1/models", "POST /v1/critique", "POST /v1/chat/completions", "POST /v1/completions"}
GENERATING = ("POST /v1/critique", "POST /v1/chat/completions", "POST /v1/completions")
FUZZ_SEED = int(os.environ.get("SCRIT_FUZZ_SEED", "14005"))  # fixed: CI runs the same cases every time
FUZZ_EXAMPLES = int(os.environ.get("SCRIT_FUZZ_EXAMPLES", "500"))  # hypothesis examples per operation and phase


# ------------------------------------------------------------------------------------------------
# Ray-free: the schema states what the validation accepts


def test_not_blank_pattern_agrees_with_str_strip_in_python_and_rust_regex() -> None:
    """The published "not blank" pattern and ``str.strip()`` (what the handlers check) agree on every code point,
    in Python's ``re`` and in the Rust regex that jsonschema-rs (schemathesis' validator) uses. With ``\\S`` they
    disagreed on U+001C..U+001F: the fuzzer's first critique failure."""
    import jsonschema_rs

    validator = jsonschema_rs.validator_for({"type": "string", "pattern": NOT_BLANK})
    pattern = re.compile(NOT_BLANK)
    for code in range(0x110000):
        if 0xD800 <= code < 0xE000:  # surrogates are not text (the JSON decoder refuses them)
            continue
        char = chr(code)
        assert (pattern.search(char) is None) == char.isspace(), hex(code)
        assert validator.is_valid(char) != char.isspace(), hex(code)


def _components() -> dict[str, Any]:
    return openapi_components(LIMITS, MODEL)


def _schema_accepts(name: str, body: Any) -> bool:
    import jsonschema_rs

    components = _components()
    schema = {**components[name], "$defs": components}
    text = json.dumps(schema).replace("#/components/schemas/", "#/$defs/")
    return jsonschema_rs.validator_for(json.loads(text)).is_valid(body)


def _handlers_accept(name: str, body: Any) -> bool:
    try:
        if name == "CritiqueBody":
            decoded = decode_body(json.dumps(body).encode(), CritiqueBody)
            if decoded.model not in (None, MODEL):
                return False
            critique_input(decoded, LIMITS)
        elif name == "ChatBody":
            chat = decode_body(json.dumps(body).encode(), ChatBody)
            if chat.model not in (None, MODEL):
                return False
            chat_prompt(chat, LIMITS)
            request_sampling(chat, LIMITS)
        else:
            completion = decode_body(json.dumps(body).encode(), CompletionBody)
            if completion.model not in (None, MODEL):
                return False
            completion_prompts(completion, LIMITS)
            request_sampling(completion, LIMITS)
    except ApiError:
        return False
    return True


P = "Add 2 and 3."
EDGE_CRITIQUES = [
    {"problem": P, "solution": "5"},
    {"problem": P, "steps": ["2 + 3 = 5"]},
    {"problem": P, "steps": ["2 + 3 = 5"], "solution": None},
    {"problem": P, "solution": "5", "steps": None, "reference": None, "model": None},
    {"problem": P, "solution": "5", "model": MODEL},
    {"problem": P, "solution": "5", "model": "gpt-4"},
    {"problem": P, "solution": "5", "steps": ["5"]},
    {"problem": P},
    {"problem": P, "solution": None, "steps": None},
    {"problem": "x" * 200, "solution": "y"},
    {"problem": "x" * 201, "solution": "y"},
    {"problem": " " * 150 + "x" + " " * 49, "solution": "y"},
    {"problem": " " * 150 + "x" + " " * 50, "solution": "y"},  # 201 characters as sent, 1 when stripped
    {"problem": "\x1c", "solution": "y"},
    {"problem": "\u3000\u2028", "solution": "y"},
    {"problem": "", "solution": "y"},
    {"problem": P, "steps": []},
    {"problem": P, "steps": ["1"] * 8},
    {"problem": P, "steps": ["1"] * 9},
    {"problem": P, "steps": ["1", "\t"]},
    {"problem": P, "steps": ["x" * 201]},
    {"problem": P, "solution": "5", "reference": " "},
    {"problem": P, "solution": "5", "reference": "r" * 201},
    {"problem": P, "solution": "5", "extra": 1},
]
EDGE_CHATS = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": []},
    {"messages": [{"role": "user", "content": " "}]},
    {"messages": [{"role": "user", "content": None}, {"role": "system", "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "hi"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "x" * 800}]},
    {"messages": [{"role": "user", "content": "x" * 801}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4.0},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4.5},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3, "max_completion_tokens": 4},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 2},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 2.0001},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 5e-324},
    {"messages": [{"role": "user", "content": "hi"}], "top_p": 0},
    {"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-300},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ""},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 9},
    {"messages": [{"role": "user", "content": "hi"}], "stop": "s" * 201},
    {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64 - 1},
    {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64},
    {"messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1},
    {"messages": [{"role": "user", "content": "hi"}], "n": 1.0},
    {"messages": [{"role": "user", "content": "hi"}], "n": 2},
    {"messages": [{"role": "user", "content": "hi"}], "stream": None},
    {"messages": [{"role": "user", "content": "hi"}], "model": "other"},
    {"messages": [{"role": "user", "content": "hi"}], "user": "ignored", "logit_bias": {"1": 2}},
]


EDGE_COMPLETIONS = [
    {"prompt": "hi"},
    {"prompt": ["hi", "there"]},
    {"prompt": []},
    {"prompt": ["hi"] * 4},
    {"prompt": ["hi"] * 5},
    {"prompt": " "},
    {"prompt": ["hi", "\u3000"]},
    {"prompt": ""},
    {"prompt": "x" * 800},
    {"prompt": "x" * 801},
    {"prompt": ["x" * 800, "y" * 800]},
    {"prompt": [1, 2]},
    {"prompt": None},
    {},
    {"prompt": "hi", "max_tokens": 8},
    {"prompt": "hi", "max_tokens": 9},
    {"prompt": "hi", "max_tokens": 2.0},
    {"prompt": "hi", "max_completion_tokens": 9},  # not a completions field: ignored
    {"prompt": "hi", "temperature": 0, "top_p": 0.5, "stop": ["\n"], "seed": 1},
    {"prompt": "hi", "n": 2},
    {"prompt": "hi", "echo": False},
    {"prompt": "hi", "echo": True},
    {"prompt": "hi", "echo": None, "logprobs": None, "best_of": None, "suffix": None},
    {"prompt": "hi", "logprobs": 0},
    {"prompt": "hi", "best_of": 1},
    {"prompt": "hi", "best_of": 1.0},
    {"prompt": "hi", "best_of": 2},
    {"prompt": "hi", "suffix": ""},
    {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
    {"prompt": "hi", "model": MODEL},
    {"prompt": "hi", "model": "other"},
    {"prompt": "hi", "user": "ignored", "logit_bias": {"1": 2}},
]


EDGES = ([("CritiqueBody", body) for body in EDGE_CRITIQUES] + [("ChatBody", body) for body in EDGE_CHATS]
         + [("CompletionBody", body) for body in EDGE_COMPLETIONS])


@pytest.mark.parametrize("name,body", EDGES, ids=[f"{name}-{i}" for i, (name, _) in enumerate(EDGES)])
def test_published_schema_and_handlers_agree_on_edge_cases(name: str, body: dict) -> None:
    """At every limit, null, integral float and blank string, the JSON Schema the app publishes accepts a body
    exactly when the handlers do (the fuzzer checks the same on random bodies)."""
    assert _schema_accepts(name, body) == _handlers_accept(name, body), body


def test_published_schema_states_the_configured_limits() -> None:
    limits = Limits(max_problem_chars=123, max_steps=7, max_prompt_chars=456, max_tokens=89)
    components = openapi_components(limits, "m")
    critique = components["CritiqueBody"]["properties"]
    assert critique["problem"]["maxLength"] == 123 and critique["problem"]["pattern"] == NOT_BLANK
    steps = next(b for b in critique["steps"]["anyOf"] if b.get("type") == "array")
    assert (steps["maxItems"], steps["items"]["maxLength"]) == (7, 123)
    for name in ("ChatBody", "CompletionBody"):
        props = components[name]["properties"]
        assert props["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 89}
        assert next(b for b in props["model"]["anyOf"] if b.get("type") == "string")["enum"] == ["m"]
    assert components["ChatMessage"]["properties"]["content"]["anyOf"][0]["maxLength"] == 456
    prompt = components["CompletionBody"]["properties"]["prompt"]["anyOf"]
    assert prompt[0]["maxLength"] == 456 and prompt[1]["maxItems"] == limits.max_prompts


# ------------------------------------------------------------------------------------------------
# One real Serve application for the rest of the module


@dataclass
class Hostile:
    url: str
    port: int
    limit: int  # max_body_bytes
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, headers=AUTH, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def hostile(ray_session):
    from ray import serve

    from scrit.config import default_config
    from scrit.serve.app import build_settings, critic_app, stop_critic_endpoint, wait_until_healthy

    cfg = default_config()
    cfg.critic.backend = "hf"  # thousands of 8-token requests: the fast-starting engine will do
    cfg.critic.max_new_tokens = 8
    settings = msgspec.structs.replace(build_settings(cfg, "seed", api_key=KEY), limits=LIMITS)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(critic_app(settings, num_cpus=0.5), name="scrit-critic-hostile", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 180)
    served = Hostile(url, port, LIMITS.max_body_bytes)
    yield served
    served.client.close()
    stop_critic_endpoint("scrit-critic-hostile")


def _error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The JSON error body of ``response``, checked for status and shape."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["code"] == status
    return error


def test_openapi_document_describes_bodies_limits_and_the_key(hostile: Hostile) -> None:
    spec = hostile.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, name in (("/v1/critique", "CritiqueBody"), ("/v1/chat/completions", "ChatBody"),
                       ("/v1/completions", "CompletionBody")):
        operation = spec["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(name)
        assert {"200", "400", "401", "404", "413"} <= set(operation["responses"])
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert schemas["CritiqueBody"]["properties"]["problem"]["maxLength"] == LIMITS.max_problem_chars
    assert spec["info"]["x-scrit-max-body-bytes"] == hostile.limit
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearer": []}] and spec["paths"]["/healthz"]["get"]["security"] == []


# ------------------------------------------------------------------------------------------------
# Fuzzing the running app with schemathesis, against its own /openapi.json


def _beyond_the_schema(path: str, body: Any, status: int, sent: bytes | None) -> str | None:
    """Which rule JSON Schema cannot state a schema-valid body breaks, recomputed from the body (the schema gives
    these rules in words: the body-size limit, sums over a list, counted lines), or None."""
    if status == 413:
        return "body over max_body_bytes" if sent is not None and len(sent) > LIMITS.max_body_bytes else None
    if status != 400 or not isinstance(body, dict):
        return None
    if path == "/v1/critique":
        steps, solution = body.get("steps"), body.get("solution")
        if isinstance(steps, list) and sum(len(s) for s in steps if isinstance(s, str)) > LIMITS.max_problem_chars:
            return "steps together over max_problem_chars"
        if isinstance(solution, str) and sum(1 for line in solution.strip().splitlines() if line.strip()) > (
                LIMITS.max_steps + 1):
            return "solution over max_steps + 1 non-blank lines"
    if path == "/v1/chat/completions":
        texts = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
            texts.append(content if isinstance(content, str) else "")
        joined = texts[0] if len(texts) == 1 else "\n".join(t for t in texts if t)
        if len(joined) > LIMITS.max_prompt_chars or any(len(t) > LIMITS.max_prompt_chars for t in texts):
            return "messages together over max_prompt_chars"
    return None


@dataclass
class FuzzTally:
    requests: collections.Counter = field(default_factory=collections.Counter)  # "METHOD /path" -> requests
    statuses: collections.Counter = field(default_factory=collections.Counter)  # ("METHOD /path", status) -> n
    failures: list[str] = field(default_factory=list)
    beyond_schema: list[str] = field(default_factory=list)  # positive bodies refused by a rule the schema can't state
    errors: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [f"{route:<32} {self.requests[route]:>5}  " + ", ".join(
            f"{status}: {n}" for (r, status), n in sorted(self.statuses.items()) if r == route)
            for route in sorted(self.requests, key=lambda r: -self.requests[r])]
        return "\n".join(rows + [f"{'total':<32} {sum(self.requests.values()):>5}"])


def _fuzz(url: str) -> FuzzTally:
    """Run schemathesis' engine (what ``st run`` runs: examples, coverage and fuzzing phases, positive and
    negative data, every built-in check plus ``error_bodies_name_the_problem``) against ``url``."""
    from schemathesis.engine import events, from_schema
    from schemathesis.openapi.checks import RejectedPositiveData

    tally = FuzzTally()
    # One worker: with two, CPython 3.11's ast module (used while generating) raised "AST constructor recursion
    # depth mismatch" in the client, a thread-safety bug of the interpreter, not of the app.
    config = schemathesis.Config.from_dict({
        "base-url": url, "headers": AUTH, "seed": FUZZ_SEED, "workers": 1, "continue-on-failure": True,
        "request-timeout": 120, "generation": {"max-examples": FUZZ_EXAMPLES, "mode": "all"},
        # An invalid body may also be too large: 413 refuses it as well as 400 does.
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 413]}},
    })
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config, headers=AUTH)

    @schema.hook
    def filter_failure(context: schemathesis.HookContext, failure: Exception, case: schemathesis.Case,
                       response: schemathesis.Response) -> bool:
        """Keep every failure but a schema-valid body refused by a rule the schema cannot state; those are
        tallied instead, so the report says how often the schema under-describes."""
        sent = response.request.body if isinstance(response.request.body, bytes) else None
        reason = _beyond_the_schema(case.path, case.body, response.status_code, sent)
        if isinstance(failure, RejectedPositiveData) and reason:
            tally.beyond_schema.append(f"{case.method} {case.path}: {reason}")
            return False
        return True

    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                case = recorder.cases[case_id].value
                route = f"{case.method} {case.path}"
                tally.requests[route] += 1
                if interaction.response is not None:
                    tally.statuses[(route, interaction.response.status_code)] += 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is not None:
                        case = recorder.cases[case_id].value
                        interaction = recorder.interactions.get(case_id)
                        response = interaction.response if interaction is not None else None
                        answer = f"{response.status_code} {response.content[:300]!r}" if response is not None else "-"
                        tally.failures.append(f"{check.name} on {case.method} {case.path}: {check.failure_info.failure}"
                                              f"\nanswer: {answer}\n{check.failure_info.code_sample[:1500]}")
        elif isinstance(event, events.NonFatalError):
            detail = "".join(traceback.format_exception(event.value))[-3000:]
            tally.errors.append(f"{event.label} ({event.phase}): {event.info.title}\n{detail}")
        elif isinstance(event, events.FatalError):
            tally.errors.append(f"fatal: {event.exception!r}")
    return tally


@schemathesis.check
def error_bodies_name_the_problem(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                                  case: schemathesis.Case) -> bool | None:
    """Every 4xx is a JSON error body with a message; a 400 about a JSON object names the field (``param``; an
    unknown field named "" is named "")."""
    if response.status_code < 400:
        return None
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert error["code"] == response.status_code and isinstance(error["type"], str), error
    if response.status_code == 400 and isinstance(case.body, dict):
        assert isinstance(error["param"], str), f"400 without param: {error}"
    return True


@pytest.mark.slow
def test_schemathesis_fuzzing_finds_no_server_error_and_only_json_errors(hostile: Hostile) -> None:
    """Over a thousand requests generated from the app's own schema, on every route (wrong methods and missing
    keys included): no 5xx, responses match the declared schemas, schema-valid bodies are accepted and invalid
    ones refused with a JSON error naming the field."""
    started = time.monotonic()
    tally = _fuzz(hostile.url)
    report = f"{tally.table()}\nin {time.monotonic() - started:.0f}s; beyond the schema: {tally.beyond_schema}"
    print(report)
    assert not tally.errors, "\n\n".join(tally.errors) + "\n\n" + report
    distinct = sorted({failure.split(":")[0] + " | " + failure.partition("\nanswer: ")[2].split("\n")[0][:200]
                       for failure in tally.failures})
    assert not tally.failures, (f"{len(tally.failures)} failures, {len(distinct)} distinct:\n" + "\n".join(distinct)
                                + "\n\nfirst 5 in full:\n" + "\n\n".join(tally.failures[:5]) + "\n\n" + report)
    assert not [key for key in tally.statuses if key[1] >= 500], report
    assert sum(tally.requests.values()) >= 1000, report
    assert ROUTES <= set(tally.requests), report
    for route in ROUTES - {"GET /healthz"}:  # schemathesis also sent each secured route without the key
        assert tally.statuses[(route, 401)] >= 1, report
    for route in GENERATING:  # both accepted and refused bodies
        assert tally.statuses[(route, 200)] >= 50 and tally.statuses[(route, 400)] >= 50, report


# ------------------------------------------------------------------------------------------------
# Oversized bodies: refused with 413 as soon as they pass the limit, never read whole


def _request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _send_until_answered(port: int, head: bytes, chunks: Iterable[bytes]) -> tuple[int, int, dict[str, str], bytes]:
    """Send ``head`` then ``chunks`` on a raw socket, stopping as soon as the server answers (or the chunks run
    out; then wait up to 30 s for the answer); returns (body bytes sent, status, headers, response body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sent = 0
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed
                break
            sent += len(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            assert piece, f"connection closed without an answer after {sent} bytes: {data!r}"
            data += piece
        header_block, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
        while len(body) < int(headers.get("content-length", "0")):
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
    return sent, int(status_line.split()[1]), headers, body


def _chunked(total: int, piece: int = 65536, end: bool = True) -> Iterator[bytes]:
    """``total`` bytes of body as chunked transfer encoding; without ``end`` the body stays open."""
    while total > 0:
        size = min(piece, total)
        yield b"%x\r\n" % size + b"a" * size + b"\r\n"
        total -= size
    if end:
        yield b"0\r\n\r\n"


JSON_HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.mark.parametrize("path", ["/v1/critique", "/v1/chat/completions", "/v1/completions"])
def test_truthful_content_length_over_the_limit_is_refused_before_the_body_is_sent(hostile: Hostile, path: str) -> None:
    """A 1 GiB Content-Length gets its 413 from the header alone: the client has sent no body byte."""
    head = _request_head("POST", path, {**JSON_HEADERS, "Content-Length": str(1 << 30)})
    sent, status, headers, body = _send_until_answered(hostile.port, head, [])
    assert (sent, status) == (0, 413)
    assert headers["content-type"] == "application/json"
    assert str(hostile.limit) in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/critique", "/v1/chat/completions", "/v1/completions"])
def test_chunked_body_that_never_ends_is_refused_at_the_limit(hostile: Hostile, path: str) -> None:
    """A chunked body (no Content-Length to trust) that passes the limit and then never ends: a server that read
    bodies whole would wait for the end forever; the replica answers 413 once the limit is passed."""
    head = _request_head("POST", path, {**JSON_HEADERS, "Transfer-Encoding": "chunked"})
    started = time.monotonic()
    sent, status, headers, body = _send_until_answered(hostile.port, head, _chunked(hostile.limit + 65536, end=False))
    assert status == 413 and headers["content-type"] == "application/json"
    assert f"over {hostile.limit} bytes" in json.loads(body)["error"]["message"]
    assert time.monotonic() - started < 30


def test_body_limit_is_exact_with_and_without_content_length(hostile: Hostile) -> None:
    """A body of exactly the limit is read (and answered); one byte more is a 413, chunked or not."""
    start = b'{"problem": "Add 2 and 3.", "steps": ["2 + 3 = 5"]}'
    exact = start + b" " * (hostile.limit - len(start))
    assert hostile.client.post("/v1/critique", content=exact).status_code == 200
    assert hostile.client.post("/v1/critique", content=iter([exact])).status_code == 200  # chunked
    _error_of(hostile.client.post("/v1/critique", content=exact + b" "), 413)
    _error_of(hostile.client.post("/v1/critique", content=iter([exact, b" "])), 413)


# ------------------------------------------------------------------------------------------------
# Malformed bodies: 4xx JSON, never a 500 or a hang

CHAT = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'
DEEP = 30_000  # nesting depth that fits the module's 75 KB body limit (100k brackets are a 413 there)
MALFORMED = [
    ("/v1/critique", b'{"problem": "\xff\xfe", "solution": "x"}', "invalid UTF-8 at byte 13"),
    ("/v1/critique", b'{"\xc3\x28": 1}', "invalid UTF-8 at byte 2"),
    ("/v1/chat/completions", CHAT + b', "user": "\xed\xa0\x80"}', "invalid UTF-8"),  # ignored field, encoded surrogate
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "malformed JSON"),
    ("/v1/critique", b"[" * DEEP, "Expected `object`"),
    ("/v1/chat/completions", b"[" * DEEP + b"]" * DEEP, "Expected `object`"),
    ("/v1/chat/completions", CHAT + b', "ignored": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
    ("/v1/chat/completions", CHAT + b', "ignored": ' + b'{"a":' * (DEEP // 4) + b"1" + b"}" * (DEEP // 4) + b"}",
     "nested too deeply"),
    ("/v1/critique", b'{"problem": "x", "steps": ' + b"[" * DEEP + b"]" * DEEP + b"}", "$.steps[0]"),
    ("/v1/critique", b"", "it is empty"),
    ("/v1/critique", b" \r\n\t ", "it is empty"),
    ("/v1/critique", b"null", "Expected `object`, got `null`"),
    ("/v1/critique", b'"problem"', "Expected `object`, got `str`"),
    ("/v1/critique", b'{"problem": "x", "solution": "y"} trailing', "trailing characters"),
    ("/v1/critique", b'\xef\xbb\xbf{"problem": "x", "solution": "y"}', "malformed JSON"),
    ("/v1/chat/completions", CHAT + b', "temperature": NaN}', "malformed JSON"),
    ("/v1/chat/completions", CHAT + b', "temperature": Infinity}', "malformed JSON"),
    ("/v1/chat/completions", CHAT + b', "temperature": 1e400}', "Number out of range"),
]


@pytest.mark.parametrize("path,raw,words", MALFORMED, ids=[f"{i}-{w}" for i, (_, _, w) in enumerate(MALFORMED)])
def test_malformed_bodies_get_a_json_400_quickly(hostile: Hostile, path: str, raw: bytes, words: str) -> None:
    started = time.monotonic()
    error = _error_of(hostile.client.post(path, content=raw, headers={"Content-Type": "application/json"}), 400)
    assert words in error["message"], error
    assert time.monotonic() - started < 10


def test_100k_brackets_are_a_413_here_and_a_400_under_the_default_limit(hostile: Hostile) -> None:
    raw = b"[" * 100_000
    assert len(raw) > hostile.limit
    _error_of(hostile.client.post("/v1/critique", content=raw), 413)
    with pytest.raises(ApiError, match="Expected `object`, got `array`"):
        decode_body(raw, CritiqueBody)
    with pytest.raises(ApiError, match="nested too deeply"):
        decode_body(CHAT + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ChatBody)


def test_content_types_other_than_json(hostile: Hostile) -> None:
    """JSON is decoded whatever the content type says (``curl -d`` sends form encoding); a body that is not JSON
    gets a 400 that names the content type it was sent as."""
    body = json.dumps({"problem": "Add 2 and 3.", "steps": ["2 + 3 = 5"]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        assert hostile.client.post("/v1/critique", content=body, headers=headers).status_code == 200, content_type
    error = _error_of(hostile.client.post("/v1/critique", data={"problem": "x", "solution": "y"}), 400)
    assert "application/x-www-form-urlencoded" in error["message"]
    error = _error_of(hostile.client.post("/v1/critique", files={"problem": b"x"}), 400)
    assert "multipart/form-data" in error["message"]


def _chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Add 2 and 3."}], "max_tokens": 4, **fields}


NUMBERS = [
    (_chat(max_tokens=10**30), 400, "max_tokens"),
    (_chat(max_tokens=-1), 400, "max_tokens"),
    (_chat(max_tokens=0), 400, "max_tokens"),
    (_chat(max_tokens=4.5), 400, "max_tokens"),
    (_chat(max_tokens=4.0), 200, None),
    (_chat(max_tokens=True), 400, "max_tokens"),
    (_chat(max_tokens="4"), 400, "max_tokens"),
    (_chat(max_tokens=-5, max_completion_tokens=4), 400, "max_tokens"),
    (_chat(max_completion_tokens=9), 400, "max_completion_tokens"),
    (_chat(temperature=-0.0), 200, None),
    (_chat(temperature=5e-324, seed=1), 200, None),  # subnormal: greedy, not an inf logit (was a 500)
    (_chat(temperature=2.5), 400, "temperature"),
    (_chat(top_p=0.0), 400, "top_p"),
    (_chat(seed=2**64 - 1, temperature=1.0), 200, None),
    (_chat(seed=2**64, temperature=1.0), 400, "seed"),  # torch.manual_seed overflowed (was a 500)
    (_chat(seed=-(2**63), temperature=1.0), 200, None),
    (_chat(seed=1e300), 400, "seed"),
    (_chat(n=1.0), 200, None),
    (_chat(n=0), 400, "n"),
]


@pytest.mark.parametrize("body,status,param", NUMBERS, ids=[str(i) for i in range(len(NUMBERS))])
def test_huge_negative_fractional_and_subnormal_numbers(hostile: Hostile, body: dict, status: int,
                                                        param: str | None) -> None:
    response = hostile.client.post("/v1/chat/completions", json=body)
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert _error_of(response, status)["param"] == param


def test_unknown_fields_are_refused_by_critique_and_ignored_by_chat(hostile: Hostile) -> None:
    for name in ("solutoin", "", "a`b", "\u00e9\U0001f600"):
        error = _error_of(hostile.client.post("/v1/critique", json={"problem": "x", "solution": "y", name: "z"}), 400)
        assert error["param"] == name and f"unknown field {name!r}" in error["message"], error
    response = hostile.client.post("/v1/chat/completions", json=_chat(user="u", logit_bias={"5": 1}, tools=[{}]))
    assert response.status_code == 200, response.text


def test_stream_true_errors_are_json_not_events(hostile: Hostile) -> None:
    """Errors are found before the stream starts, so a streaming request gets the same JSON error as any other."""
    completion = {"prompt": "Add 2 and 3.", "max_tokens": 4}
    for path, body, status, param in (
            ("/v1/chat/completions", _chat(stream=True, max_tokens=-1), 400, "max_tokens"),
            ("/v1/chat/completions", _chat(stream=True, model="gpt-4"), 404, "model"),
            ("/v1/chat/completions", _chat(stream=True, messages=[]), 400, "messages"),
            ("/v1/chat/completions", _chat(stream="yes"), 400, "stream"),
            ("/v1/completions", {**completion, "stream": True, "max_tokens": 0}, 400, "max_tokens"),
            ("/v1/completions", {**completion, "stream": True, "prompt": ["a", " "]}, 400, "prompt[1]"),
            ("/v1/completions", {**completion, "stream": True, "logprobs": 2}, 400, "logprobs")):
        assert _error_of(hostile.client.post(path, json=body), status)["param"] == param
    for path, body in (("/v1/chat/completions", _chat(stream=True)),
                       ("/v1/completions", {**completion, "stream": True})):
        with hostile.client.stream("POST", path, json=body) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"


# ------------------------------------------------------------------------------------------------
# The API key

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
PATHS = ("/v1/models", "/v1/critique", "/v1/chat/completions", "/v1/completions", "/openapi.json", "/docs", "/redoc",
         "/", "/nope", "/v1/critique/x", "/healthz/", "/HEALTHZ", "//healthz")
WRONG_KEYS: tuple[dict[str, Any], ...] = (
    {}, {"Authorization": ""}, {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY.upper()}"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
    {"Authorization": f"Token {KEY}"}, {"X-API-Key": KEY}, {"Authorization": b"Bearer \xff\xfe"},
)


def test_every_route_but_healthz_needs_the_key(hostile: Hostile) -> None:
    """Without the right key every method on every path (real routes, wrong methods, unknown paths, the docs)
    gets a JSON 401 before any routing; ``GET /healthz`` alone answers without it."""
    checked = 0
    with httpx.Client(base_url=hostile.url, timeout=TIMEOUT) as bare:
        for headers in WRONG_KEYS:
            for method in METHODS:
                for path in PATHS:
                    response = bare.request(method, path, headers=headers, content=b'{"problem": "x"}')
                    assert response.status_code == 401, (method, path, headers, response.status_code)
                    assert response.headers["www-authenticate"] == "Bearer"
                    if method != "HEAD":
                        assert _error_of(response, 401)["type"] == "authentication_error"
                    checked += 1
            assert bare.get("/healthz", headers=headers).status_code == 200
        for good in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY}"):
            assert bare.get("/v1/models", headers={"Authorization": good}).status_code == 200, good
        assert _error_of(bare.get("/nope", headers=AUTH), 404)["type"] == "not_found_error"
        assert _error_of(bare.put("/v1/critique", headers=AUTH), 405)["message"]
    assert checked == len(WRONG_KEYS) * len(METHODS) * len(PATHS)
