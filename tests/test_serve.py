"""The critic endpoint (serve/): API contract, errors, auth, OpenAI compatibility and hot swap under load.

Ray-free parts (registry tail, request validation, in-process swap semantics) run first; then one real
Serve application on 127.0.0.1 (``ray.init(num_cpus=2)``, the shipped seed critic, one replica
following a temporary run directory) is started once for the module. Versions are the seed's weights
plus noise, published through ``WeightRegistry`` exactly as the trainer publishes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scrit.actors.registry import WeightRegistry  # noqa: E402
from scrit.backends.base import Generation, SamplingParams  # noqa: E402
from scrit.serve.schema import (  # noqa: E402
    ApiError,
    ChatBody,
    CompletionBody,
    CritiqueBody,
    Limits,
    StopHoldback,
    completion_prompts,
    critique_input,
    decode_body,
    finish,
    render_steps,
    request_sampling,
)
from scrit.serve.testing import publish, save_perturbed  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(180.0)
PROBLEM = "Start with 25. Multiply by 2. Add 45. What is the result?"
STEPS = ["25 * 2 = 50", "50 + 45 = 95"]
WRONG_STEPS = ["25 * 2 = 50", "50 + 45 = 96"]
REFERENCE = "Step 1: 25 * 2 = 50\nStep 2: 50 + 45 = 95\nThe answer is \\boxed{95}."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five stand-in versions (seed + 1% noise); index i holds version i + 1's checkpoint."""
    root = tmp_path_factory.mktemp("checkpoints")
    return [save_perturbed("seed", root / f"v{v:04d}", seed=v) for v in range(1, 6)]


# ------------------------------------------------------------------------------------------------
# Ray-free


def _critique_error(body: dict, limits: Limits | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        critique_input(decode_body(json.dumps(body).encode(), CritiqueBody), limits or Limits())
    return caught.value


def test_critique_validation_names_the_problem() -> None:
    assert "'problem' must not be empty" in _critique_error({"problem": "  ", "solution": "x"}).message
    assert "exactly one of" in _critique_error({"problem": "p"}).message
    assert "exactly one of" in _critique_error({"problem": "p", "solution": "s", "steps": ["a"]}).message
    assert "too many steps" in _critique_error({"problem": "p", "steps": ["1 + 1 = 2"] * 3}, Limits(max_steps=2)).message
    assert "step 1 is empty" in _critique_error({"problem": "p", "steps": ["a", " "]}).message
    error = _critique_error({"problem": "p" * 50, "solution": "s"}, Limits(max_problem_chars=40))
    assert error.param == "problem" and "too long" in error.message
    with pytest.raises(ApiError, match="unknown field 'solutoin'"):
        decode_body(b'{"problem": "p", "solutoin": "s"}', CritiqueBody)
    with pytest.raises(ApiError, match=r"Expected `str`, got `int` - at `\$.problem`") as caught:
        decode_body(b'{"problem": 5, "solution": "s"}', CritiqueBody)
    assert caught.value.param == "problem"
    with pytest.raises(ApiError, match="malformed JSON"):
        decode_body(b'{"problem": ', CritiqueBody)
    with pytest.raises(ApiError, match="empty"):
        decode_body(b"", CritiqueBody)


def test_steps_render_like_the_eval_harness() -> None:
    assert render_steps(STEPS) == "Step 1: 25 * 2 = 50\nStep 2: 50 + 45 = 95\nThe answer is \\boxed{95}."
    assert render_steps(["Step 1: 25 * 2 = 50", "step 2: 50 + 45 = 95"]) == render_steps(STEPS)
    assert render_steps(["Add them.", "So 7."]) == "Step 1: Add them.\nStep 2: So 7."


def test_sampling_limits_of_chat_and_completions() -> None:
    chat = lambda **kw: decode_body(  # noqa: E731
        json.dumps({"messages": [{"role": "user", "content": "x"}], **kw}).encode(), ChatBody)
    text = lambda **kw: decode_body(json.dumps({"prompt": "x", **kw}).encode(), CompletionBody)  # noqa: E731
    assert request_sampling(chat(), Limits()).temperature == 1.0
    assert request_sampling(chat(), Limits()).max_new_tokens == Limits().default_max_tokens
    assert request_sampling(text(), Limits()).max_new_tokens == 16  # OpenAI's default for completions
    for body in (chat, text):
        sampling = request_sampling(body(max_tokens=7, temperature=0, stop="\n\n", seed=3), Limits())
        assert (sampling.max_new_tokens, sampling.temperature, sampling.stop, sampling.seed) == (7, 0.0, ("\n\n",), 3)
        for bad, param in [({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10**6}, "max_tokens"),
                           ({"temperature": 3}, "temperature"), ({"stop": [""]}, "stop")]:
            with pytest.raises(ApiError) as caught:
                request_sampling(body(**bad), Limits())
            assert caught.value.param == param and caught.value.status == 400


def test_completion_prompts_and_the_options_it_refuses() -> None:
    body = lambda **kw: decode_body(json.dumps(kw).encode(), CompletionBody)  # noqa: E731
    assert completion_prompts(body(prompt="a"), Limits()) == ["a"]
    assert completion_prompts(body(prompt=["a", "b"], echo=False, best_of=1), Limits()) == ["a", "b"]
    for bad, param in [({"prompt": []}, "prompt"), ({"prompt": ["a"] * 3}, "prompt"), ({"prompt": " "}, "prompt"),
                       ({"prompt": ["a", "\n"]}, "prompt[1]"), ({"prompt": "x" * 11}, "prompt"),
                       ({"prompt": "a", "echo": True}, "echo"), ({"prompt": "a", "logprobs": 1}, "logprobs"),
                       ({"prompt": "a", "best_of": 2}, "best_of"), ({"prompt": "a", "suffix": "z"}, "suffix")]:
        with pytest.raises(ApiError) as caught:
            completion_prompts(body(**bad), Limits(max_prompts=2, max_prompt_chars=10))
        assert caught.value.param == param and caught.value.status == 400, bad
    with pytest.raises(ApiError, match=r"Expected `str`, got `int` - at `\$.prompt\[0\]`"):
        decode_body(b'{"prompt": [1, 2]}', CompletionBody)  # token ids are not supported


def _engine_pieces(text: str, stops: tuple[str, ...], rng) -> tuple[list[str], str]:
    """``text`` in random pieces as the engine streams it: it ends (stop string kept) once a stop string
    is complete in the text, as vLLM does with ``include_stop_str_in_output``."""
    pieces, made = [], ""
    while made != text:
        piece = text[len(made):len(made) + rng.randint(1, 3)]
        made += piece
        pieces.append(piece)
        ends = [made.find(stop) + len(stop) for stop in stops if stop in made]
        if ends:
            cut = min(ends)
            pieces[-1] = piece[:len(piece) - (len(made) - cut)]
            made = made[:cut]
            break
    return pieces, made


def test_stop_holdback_sends_exactly_the_non_streamed_text_and_never_a_stop_string() -> None:
    import random

    rng = random.Random(0)
    for _ in range(3000):
        alphabet = "ab\n:"
        stops = tuple(sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                              for _ in range(rng.randint(0, 3))}))
        pieces, made = _engine_pieces("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))), stops, rng)
        sampling = SamplingParams(max_new_tokens=10**6, stop=stops)
        expected, _, _ = finish(Generation(text=made, prompt_tokens=1, completion_tokens=len(made), version=0),
                                sampling)
        holdback, sent = StopHoldback(stops), ""
        for piece in pieces[:-1]:
            sent += holdback.feed(piece)
            assert not any(stop in sent for stop in stops), (stops, pieces, sent)
            assert expected.startswith(sent), (stops, pieces, sent, expected)
        sent += holdback.finish(expected)
        assert sent == expected, (stops, pieces)
    # What could still become a stop string is held back, and only that.
    holdback = StopHoldback(("\nProblem:",))
    assert holdback.feed("Step 1\nPro") == "Step 1"
    assert holdback.feed("of") == "\nProof"


def _hf_settings(run_dir: Path):
    """A replica's settings as ``scrit serve --follow RUN_DIR`` builds them, on the HF backend on CPU."""
    from scrit.config import load_config
    from scrit.factory import serve_role
    from scrit.serve.service import ServeSettings

    cfg = load_config(None, ["critic.backend=hf", "critic.device=cpu"])
    return ServeSettings(role=serve_role(cfg, "seed", follows=True), follow_run_dir=str(run_dir))


def test_service_swaps_between_batches_and_skips_broken_checkpoints(tmp_path: Path, checkpoints: list[Path]) -> None:
    """In-flight work finishes on the version it started with; a checksum mismatch is never served."""
    import torch

    from scrit.serve.service import CriticService

    torch.set_num_threads(1)
    registry = WeightRegistry(tmp_path, "seed")
    service = CriticService(_hf_settings(tmp_path), start_following=False)
    try:
        assert service.active.version == 0
        prompt = f"Critique the student solution.\nProblem: {PROBLEM}\nStudent:\n{render_steps(STEPS)}\nCritique:\n"
        long, short = SamplingParams(max_new_tokens=150), SamplingParams(max_new_tokens=4)
        publish(registry, 1, checkpoints[0])

        async def scenario() -> tuple[list, bool, list]:
            in_flight = asyncio.create_task(service.generate_batch([([prompt], long), ([prompt, prompt], short)]))
            await asyncio.sleep(0.05)  # the batch has taken its model
            swapped = await asyncio.to_thread(service.poll_once)
            return await in_flight, swapped, await service.generate_batch([([prompt], short)])

        first, swapped, after = asyncio.run(scenario())
        assert swapped
        assert [[g.version for g in request] for request in first] == [[0], [0, 0]] and after[0][0].version == 1
        assert all(isinstance(g, Generation) for request in first + after for g in request)

        publish(registry, 2, checkpoints[1], checksum="sha256:" + "0" * 64)  # broken
        assert not service.poll_once()
        assert service.active.version == 1 and service.swap_errors == 1
        publish(registry, 3, checkpoints[2])
        assert service.poll_once() and service.active.version == 3
        assert not service.poll_once()  # version 2 is never retried
        assert service.health()["swaps"] == 2
    finally:
        service.close()


def test_service_starts_on_the_newest_version_that_loads(tmp_path: Path, checkpoints: list[Path]) -> None:
    from scrit.serve.service import CriticService

    registry = WeightRegistry(tmp_path, "seed")
    publish(registry, 1, checkpoints[0])
    publish(registry, 2, checkpoints[1], checksum="sha256:bad")
    service = CriticService(_hf_settings(tmp_path), start_following=False)
    assert service.active.version == 1 and service.active.uri == str(checkpoints[0].resolve())
    assert service.swap_errors == 1


# ------------------------------------------------------------------------------------------------
# `scrit serve` in its own process (own Ray instance; runs before the module's endpoint starts)


@pytest.mark.slow
def test_cli_serve_answers_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local",
           # this checkout's code (cwd is tmp_path), not what the interpreter has installed
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                     os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen(
        [sys.executable, "-m", "scrit.cli", "serve", "--model", "seed", "--set", "critic.backend=hf", "--port", str(port), "--api-key", "cli-key",
         "--set", "resources.serve_replica_num_cpus=0.25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while not lines and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
        assert lines and lines[0].strip() == url, (lines, process.poll())
        response = httpx.post(f"{url}/v1/critique", json={"problem": PROBLEM, "steps": STEPS},
                              headers={"Authorization": "Bearer cli-key"}, timeout=TIMEOUT)
        assert response.status_code == 200 and response.json()["critic_version"] == 0
        assert httpx.get(f"{url}/v1/models", timeout=TIMEOUT).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, process.stderr.read()[-3000:]


# ------------------------------------------------------------------------------------------------
# One real Serve application for the rest of the module


class Endpoint:
    def __init__(self, url: str, run_dir: Path, registry: WeightRegistry, checkpoints: list[Path]) -> None:
        self.url = url
        self.run_dir = run_dir
        self.registry = registry
        self.checkpoints = checkpoints
        self.client = httpx.Client(base_url=url, headers=AUTH, timeout=TIMEOUT)

    def publish(self, version: int, checksum: str | None = None) -> float:
        publish(self.registry, version, self.checkpoints[version - 1], checksum)
        return time.time()

    def wait_for_version(self, version: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/healthz", timeout=TIMEOUT).json()["critic_version"] >= version:
                return
            time.sleep(0.1)
        raise AssertionError(f"version {version} not served within {timeout}s")


@pytest.fixture(scope="module")
def serve_session(ray_session):
    """The session's Ray, with this module's Serve applications deleted (and Serve stopped) at the end."""
    yield ray_session
    from scrit.serve.app import stop_critic_endpoint

    stop_critic_endpoint("scrit-critic-two", shutdown_serve=False)
    stop_critic_endpoint()


@pytest.fixture(scope="module")
def endpoint(serve_session, tmp_path_factory: pytest.TempPathFactory, checkpoints: list[Path]):
    from scrit.config import default_config
    from scrit.serve.app import start_critic_endpoint

    run_dir = tmp_path_factory.mktemp("run")
    registry = WeightRegistry(run_dir, "seed")
    cfg = default_config()
    cfg.critic.backend = "hf"  # these replicas test the HF swap path; test_vllm_system.py the vLLM one
    cfg.serve.api_key = KEY
    url = start_critic_endpoint(cfg, "seed", run_dir, port=free_port())
    served = Endpoint(url, run_dir, registry, checkpoints)
    yield served
    served.client.close()


@pytest.fixture(scope="module")
def local_seed():
    import torch

    from scrit.backends.hf import HFBackend

    torch.set_num_threads(1)
    from scrit.backends import resolve_model_path

    return HFBackend(resolve_model_path("seed"), device="cpu")


def _check_critique(response: httpx.Response, mode: str) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"correct", "first_error_step", "step_verdicts", "correction", "answer", "critique",
                         "critic_version"}
    assert isinstance(body["correct"], bool) and isinstance(body["first_error_step"], int)
    assert all(isinstance(v, bool) for v in body["step_verdicts"])
    assert body["mode"] == mode and body["parsed"] is True
    assert response.headers["x-critic-version"] == str(body["critic_version"])
    assert response.headers["x-critic-replica"]
    return body


def test_critique_steps_and_solution_forms_agree(endpoint: Endpoint) -> None:
    by_steps = _check_critique(endpoint.client.post("/v1/critique", json={"problem": PROBLEM, "steps": STEPS}),
                               "direct")
    by_text = _check_critique(endpoint.client.post("/v1/critique",
                                                   json={"problem": PROBLEM, "solution": render_steps(STEPS)}), "direct")
    assert by_steps["critique"] == by_text["critique"]
    assert by_steps["critic_version"] == 0
    assert by_steps["correct"] is True and by_steps["first_error_step"] == -1
    assert by_steps["answer"] == "95" and by_steps["critique"].startswith("Step 1:")


def test_critique_contrastive_finds_the_wrong_step(endpoint: Endpoint) -> None:
    body = _check_critique(endpoint.client.post("/v1/critique", json={
        "problem": PROBLEM, "steps": WRONG_STEPS, "reference": REFERENCE}), "contrastive")
    assert body["correct"] is False and body["first_error_step"] == 1
    assert body["step_verdicts"] == [True, False]
    assert body["answer"] == "95" and body["correction"]


def test_models_and_healthz(endpoint: Endpoint) -> None:
    models = endpoint.client.get("/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "scrit-critic"
    health = httpx.get(f"{endpoint.url}/healthz", timeout=TIMEOUT)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["x-critic-version"] == str(health.json()["critic_version"])


def test_chat_completions_plain_and_streaming_agree(endpoint: Endpoint) -> None:
    request = {"model": "scrit-critic", "temperature": 0, "max_tokens": 40,
               "messages": [{"role": "user", "content": f"Solve the problem step by step.\nProblem: {PROBLEM}\nSolution:\n"}]}
    plain = endpoint.client.post("/v1/chat/completions", json=request)
    assert plain.status_code == 200, plain.text
    body = plain.json()
    text = body["choices"][0]["message"]["content"]
    assert text and body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
    assert body["choices"][0]["finish_reason"] in ("stop", "length")

    with endpoint.client.stream("POST", "/v1/chat/completions",
                                json={**request, "stream": True, "stream_options": {"include_usage": True}}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-critic-version"] == plain.headers["x-critic-version"]
        chunks = _events(stream)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == body["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == body["usage"]


def _events(stream: httpx.Response) -> list[dict]:
    events = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_completions_agree_with_chat_and_hf_streams_after_the_fact(endpoint: Endpoint) -> None:
    """/v1/completions gives the chat route's text for the same prompt (one choice per prompt of a list); on
    HF, /v1/models says so, the text is made first and then streamed in pieces."""
    card = endpoint.client.get("/v1/models").json()["data"][0]
    assert card["capabilities"] == {"backend": "hf", "token_streaming": False, "continuous_batching": False}
    prompts = [f"Solve the problem step by step.\nProblem: {PROBLEM}\nSolution:\n", "Start with 3. Add 4."]
    options = {"model": "scrit-critic", "temperature": 0, "max_tokens": 30}
    chat = endpoint.client.post("/v1/chat/completions", json={**options, "messages": [
        {"role": "user", "content": prompts[0]}]}).json()
    one = endpoint.client.post("/v1/completions", json={**options, "prompt": prompts[0]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert body["usage"] == chat["usage"] and one.headers["x-critic-version"] == str(body["critic_version"])

    both = endpoint.client.post("/v1/completions", json={**options, "prompt": prompts}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == body["choices"][0]["text"]
    with endpoint.client.stream("POST", "/v1/completions", json={**options, "prompt": prompts, "stream": True,
                                                                  "stream_options": {"include_usage": True}}) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        chunks = _events(stream)
    assert all(c["object"] == "text_completion" for c in chunks)
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in both["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == both["usage"]


def test_openai_http_backend_and_scrit_eval_talk_to_it(endpoint: Endpoint, local_seed, monkeypatch) -> None:
    from typer.testing import CliRunner

    from scrit.backends import make_backend
    from scrit.cli import app
    from scrit.evaluate import build_arith_evalset, build_prompts, evaluate

    items = build_arith_evalset(n=3)
    prompts = build_prompts(items, "direct")
    sampling = SamplingParams(max_new_tokens=400, stop=("Correction:",))
    expected = local_seed.generate(prompts, sampling)
    with make_backend(endpoint.url, api_key=KEY, concurrency=4) as client:
        assert client.model == "scrit-critic"
        got = client.generate(prompts, sampling)
    assert [g.text for g in got] == [g.text for g in expected]  # stop string kept, like the local backend
    assert all(g.text.endswith("Correction:") for g in got)
    assert [g.version for g in got] == [0] * 3
    assert [(g.prompt_tokens, g.completion_tokens) for g in got] == [
        (g.prompt_tokens, g.completion_tokens) for g in expected]

    # `scrit eval` against the endpoint scores exactly like the local model (seed prompts: compact style).
    monkeypatch.setenv("SCRIT_API_KEY", KEY)
    result = CliRunner().invoke(app, ["eval", "--model", endpoint.url, "--bench", "arith", "--limit", "3",
                                      "--prompt-style", "compact", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    local = evaluate(local_seed, items, mode="direct", style="compact")
    assert report["splits"]["arith"] == local["splits"]["arith"]
    assert report["average"]["parse_rate"] == 1.0


def test_replica_exports_prometheus_metrics_listed_in_the_run_dir(endpoint: Endpoint) -> None:
    """Each replica serves scrit.telemetry metrics (role "serve", endpoint requests) and lists its
    exporter in RUN_DIR/prometheus_targets-serve-REPLICA.json, which deploy/prometheus.yml picks up."""
    pytest.importorskip("scrit.telemetry")
    endpoint.client.post("/v1/critique", json={"problem": PROBLEM, "steps": STEPS})
    files = list(endpoint.run_dir.glob("prometheus_targets-serve-*.json"))
    assert len(files) == 1
    group = json.loads(files[0].read_text())[0]
    text = httpx.get(f"http://{group['targets'][0]}/metrics", timeout=TIMEOUT).text

    def series(name: str, *labels: str) -> bool:
        return any(line.startswith(name + "{") and all(label in line for label in labels)
                   for line in text.splitlines())

    assert series("scrit_endpoint_requests_total", 'route="/v1/critique"', 'code="200"')
    assert series("scrit_items_total", 'role="serve"') and series("scrit_critic_version", 'role="serve"')


BAD_CRITIQUES = [
    (b'{"problem": "x", "steps": [', 400, "malformed JSON"),
    (b'["not", "an", "object"]', 400, "Expected `object`"),
    (b'{"problem": 12, "solution": "x"}', 400, "$.problem"),
    (b'{"problem": "x", "steps": "1 + 1 = 2"}', 400, "$.steps"),
    (b'{"problem": "x", "steps": [1, 2]}', 400, "$.steps[0]"),
    (b'{"problem": "   ", "solution": "Step 1: 1 + 1 = 2"}', 400, "'problem' must not be empty"),
    (b'{"problem": "x"}', 400, "exactly one of"),
    (json.dumps({"problem": "x", "steps": ["1 + 1 = 2"] * 65}).encode(), 400, "too many steps"),
    (json.dumps({"problem": "x" * 4001, "solution": "y"}).encode(), 400, "'problem' is too long"),
    (json.dumps({"problem": "x", "solution": "y", "reference": "z" * 4001}).encode(), 400, "'reference' is too long"),
    (b'{"problem": "x", "solution": "y", "model": "gpt-4"}', 404, "model 'gpt-4' does not exist"),
    (b'{"problem": "x", "solutoin": "y"}', 400, "unknown field 'solutoin'"),
]


@pytest.mark.parametrize("raw,status,words", BAD_CRITIQUES, ids=[w for _, _, w in BAD_CRITIQUES])
def test_bad_critique_requests_get_a_json_4xx(endpoint: Endpoint, raw: bytes, status: int, words: str) -> None:
    response = endpoint.client.post("/v1/critique", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["code"] == status
    assert response.headers["x-critic-version"].isdigit()


BAD_CHATS = [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "$.messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, "model 'nope' does not exist"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "'max_tokens' must be between"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "'n' must be 1"),
    ({"messages": [{"role": "user", "content": "x" * 16001}]}, "too long"),
    # under the endpoint's character limit, over the seed's 1,024-token context: a 400, not a failed generation
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, "too long for this model"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "$.temperature"),
]


@pytest.mark.parametrize("body,words", BAD_CHATS, ids=[w for _, w in BAD_CHATS])
def test_bad_chat_requests_get_a_json_4xx(endpoint: Endpoint, body: dict, words: str) -> None:
    response = endpoint.client.post("/v1/chat/completions", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert words in response.json()["error"]["message"]


def test_unknown_route_and_method_are_json_4xx(endpoint: Endpoint) -> None:
    assert endpoint.client.get("/v1/nothing").json()["error"]["code"] == 404
    assert endpoint.client.get("/v1/critique").status_code == 405


def test_api_key_is_required_except_for_healthz(endpoint: Endpoint) -> None:
    body = {"problem": PROBLEM, "steps": STEPS}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        response = httpx.post(f"{endpoint.url}/v1/critique", json=body, headers=headers, timeout=TIMEOUT)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["x-critic-version"].isdigit()
    assert httpx.get(f"{endpoint.url}/v1/models", timeout=TIMEOUT).status_code == 401
    assert httpx.get(f"{endpoint.url}/v1/models", headers={"Authorization": f"bearer {KEY}"},
                     timeout=TIMEOUT).status_code == 200
    assert httpx.get(f"{endpoint.url}/healthz", timeout=TIMEOUT).status_code == 200


def test_version_header_follows_publishes_and_broken_versions_are_skipped(endpoint: Endpoint) -> None:
    request = {"problem": PROBLEM, "steps": STEPS}
    assert endpoint.client.post("/v1/critique", json=request).headers["x-critic-version"] == "0"
    endpoint.publish(1)
    endpoint.wait_for_version(1)
    response = endpoint.client.post("/v1/critique", json=request)
    assert response.headers["x-critic-version"] == "1" and response.json()["critic_version"] == 1

    endpoint.publish(2, checksum="sha256:" + "0" * 64)  # a checkpoint that does not match its checksum
    time.sleep(2.0)  # ten polls
    health = httpx.get(f"{endpoint.url}/healthz", timeout=TIMEOUT).json()
    assert health["critic_version"] == 1 and health["swap_errors"] >= 1
    assert endpoint.client.post("/v1/critique", json=request).json()["critic_version"] == 1
    endpoint.publish(3)
    endpoint.wait_for_version(3)
    assert endpoint.client.post("/v1/critique", json=request).json()["critic_version"] == 3


async def _hammer(url: str, clients: int, stop: asyncio.Event, log: list[tuple[int, int, str, int | None, str]]) -> None:
    """Clients alternate critiques and short chat completions until ``stop``; log (client, status, replica,
    version, error) per response."""
    bodies = [("/v1/critique", {"problem": PROBLEM, "steps": WRONG_STEPS if i % 2 else STEPS}) for i in range(2)]
    bodies.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "Solve the problem step by "
                                                          f"step.\nProblem: {PROBLEM}\nSolution:\n"}],
                                            "max_tokens": 24, "temperature": 0}))

    async def one(client: int, http: httpx.AsyncClient) -> None:
        n = client
        while not stop.is_set():
            path, body = bodies[n % len(bodies)]
            n += 1
            try:
                response = await http.post(path, json=body)
            except httpx.HTTPError as error:
                log.append((client, -1, "", None, repr(error)))
                continue
            version = response.headers.get("x-critic-version")
            log.append((client, response.status_code, response.headers.get("x-critic-replica", ""),
                        int(version) if version else None, "" if response.status_code == 200 else response.text))

    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=TIMEOUT,
                                 limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(one(i, http) for i in range(clients)))


def _load_across_swaps(endpoint: Endpoint, versions: list[int], clients: int, replicas: int) -> list[tuple]:
    """Clients busy while each version in ``versions`` is published, served by every replica, and answered
    at least twice more; returns the response log."""
    log: list[tuple] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_hammer(endpoint.url, clients, stop, log))
        while len(log) < 2:  # some answers on the current version first
            assert not load.done(), load.exception()
            await asyncio.sleep(0.2)
        for version in versions:
            await asyncio.to_thread(endpoint.publish, version)
            deadline = time.monotonic() + 180
            while True:  # every replica has answered on this version (or later)
                on_it = {replica for _, status, replica, v, _ in log if status == 200 and v is not None and v >= version}
                if len(on_it) >= replicas and sum(1 for e in log if e[3] is not None and e[3] >= version) >= 2 * replicas:
                    break
                assert time.monotonic() < deadline, f"version {version} not served by {replicas} replicas"
                assert not load.done(), load.exception()
                await asyncio.sleep(0.2)
        stop.set()
        await load

    asyncio.run(scenario())
    return log


def _assert_no_failures_and_monotonic(log: list[tuple], per_replica: bool) -> None:
    failures = [entry for entry in log if entry[1] != 200]
    assert not failures, failures[:5]
    last: dict[tuple, int] = {}
    for client, _, replica, version, _ in log:  # in completion order
        key = (client, replica) if per_replica else (client,)
        assert version >= last.get(key, -1), f"client {client} got version {version} after {last[key]}"
        last[key] = version


@pytest.mark.slow
def test_concurrent_load_across_two_swaps_has_no_failures(endpoint: Endpoint) -> None:
    endpoint.wait_for_version(3)
    log = _load_across_swaps(endpoint, [4, 5], clients=8, replicas=1)
    _assert_no_failures_and_monotonic(log, per_replica=False)
    assert {entry[3] for entry in log} >= {3, 4, 5}
    assert len(log) >= 16


@pytest.mark.slow
def test_two_replicas_swap_under_load(endpoint: Endpoint, serve_session, tmp_path_factory, checkpoints) -> None:
    """A second application with two replicas (on /two, same proxy) following its own run."""
    from scrit.config import default_config
    from scrit.serve.app import start_critic_endpoint, stop_critic_endpoint

    run_dir = tmp_path_factory.mktemp("run-two")
    cfg = default_config()
    cfg.critic.backend = "hf"  # these replicas test the HF swap path; test_vllm_system.py the vLLM one
    cfg.serve.api_key = KEY
    port = int(endpoint.url.rsplit(":", 1)[1])
    url = start_critic_endpoint(cfg, "seed", run_dir, port=port, replicas=2, app_name="scrit-critic-two",
                                route_prefix="/two")
    assert url.endswith("/two")
    try:
        two = Endpoint(url, run_dir, WeightRegistry(run_dir, "seed"), checkpoints)
        log = _load_across_swaps(two, [1, 2], clients=8, replicas=2)
        _assert_no_failures_and_monotonic(log, per_replica=True)
        replicas = {entry[2] for entry in log}
        assert len(replicas) == 2
        for replica in replicas:  # every replica reached the last version
            assert max(v for _, _, r, v, _ in log if r == replica) == 2
        two.client.close()
    finally:
        stop_critic_endpoint("scrit-critic-two", shutdown_serve=False)
