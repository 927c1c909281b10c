"""OpenAIHTTPBackend against a real local OpenAI-compatible server backed by HFBackend."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    from openai_server import ServerThread, closed_port, make_app, save_tiny_model
except ImportError:  # tests/ imported as a package
    from tests.openai_server import ServerThread, closed_port, make_app, save_tiny_model

from scrit.backends import SamplingParams, make_backend
from scrit.backends.hf import HFBackend
from scrit.backends.openai_http import OpenAIHTTPBackend, normalize_base_url

PROMPTS = ["Start with 12. Add 5. What is the result?", "x", "Hello world", "Step 1: 2 + 2 = 4", "abc"]
GREEDY = SamplingParams(max_new_tokens=16)
KEY = "test-key"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run ~10x faster on one thread when the 2 cores are shared (OpenMP spin contention)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    path = save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"), seed=0)
    return HFBackend(path, device="cpu", version=7)


@pytest.fixture(scope="module")
def server(local: HFBackend):
    with ServerThread(make_app(local, model_name="tiny-critic", api_key=KEY)) as running:
        yield running


@pytest.fixture()
def client(server: ServerThread):
    with OpenAIHTTPBackend(server.url, api_key=KEY, concurrency=4) as backend:
        yield backend


def test_base_url_forms() -> None:
    for form in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert normalize_base_url(form) == "http://h:1"
    with pytest.raises(ValueError):
        normalize_base_url("h:1")


def test_model_discovered(client: OpenAIHTTPBackend) -> None:
    assert client.model == "tiny-critic"


@pytest.mark.parametrize("chat", [True, False])
def test_outputs_match_local_greedy(server: ServerThread, local: HFBackend, chat: bool) -> None:
    expected = local.generate(PROMPTS, GREEDY)
    with OpenAIHTTPBackend(server.url + "/v1", api_key=KEY, chat=chat, concurrency=3) as client:
        got = client.generate(PROMPTS, GREEDY)
    assert [g.text for g in got] == [g.text for g in expected]
    assert [(g.prompt_tokens, g.completion_tokens) for g in got] == [
        (g.prompt_tokens, g.completion_tokens) for g in expected
    ]
    assert all(g.prompt_tokens > 0 and g.completion_tokens > 0 for g in got)


def test_stop_string_kept_like_local(client: OpenAIHTTPBackend, local: HFBackend) -> None:
    free = local.generate([PROMPTS[0]], GREEDY)[0].text
    sampling = SamplingParams(max_new_tokens=16, stop=(free[3:5],))
    expected = local.generate(PROMPTS, sampling)
    got = client.generate(PROMPTS, sampling)
    assert [g.text for g in got] == [g.text for g in expected]
    assert got[0].text.endswith(free[3:5])


def test_seeded_sampling_reproducible(client: OpenAIHTTPBackend) -> None:
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5)
    assert client.generate(PROMPTS[:2], sampling) == client.generate(PROMPTS[:2], sampling)


def test_version_header_wins(client: OpenAIHTTPBackend) -> None:
    assert client.version == 0
    assert {g.version for g in client.generate(PROMPTS[:2], GREEDY)} == {7}
    client.load_weights(3, "/ignored")  # the server owns the weights; only the number is recorded
    assert client.version == 3


def test_wrong_key_is_a_clear_error(server: ServerThread) -> None:
    with OpenAIHTTPBackend(server.url, model="tiny-critic", api_key="wrong") as client:
        with pytest.raises(RuntimeError, match=r"401.*Incorrect API key"):
            client.generate(["hi"], GREEDY)


def test_key_from_environment(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("SCRIT_API_KEY", KEY)
    with OpenAIHTTPBackend(server.url) as client:
        assert len(client.generate(["hi"], GREEDY)) == 1


def test_bad_request_is_not_retried(server: ServerThread) -> None:
    app = server._server.config.app
    with OpenAIHTTPBackend(server.url, model="tiny-critic", api_key=KEY, backoff=5) as client:
        before = app.state.requests
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"400.*prompt"):
            client._request("POST", "/v1/completions", json={"model": "tiny-critic", "prompt": 3})
        assert app.state.requests == before + 1
        assert time.monotonic() - started < 5


def test_closed_port_fails_after_retries() -> None:
    port = closed_port()
    with OpenAIHTTPBackend(f"http://127.0.0.1:{port}", model="m", max_retries=2, backoff=0.01) as client:
        with pytest.raises(RuntimeError, match=rf"127.0.0.1:{port}.*after 3 attempts.*Connect"):
            client.generate(["hi"], GREEDY)


def test_make_backend_http(server: ServerThread) -> None:
    backend = make_backend(server.url + "/v1", api_key=KEY)
    assert isinstance(backend, OpenAIHTTPBackend)
    assert backend.generate(["x"], GREEDY)[0].version == 7
    backend.close()
