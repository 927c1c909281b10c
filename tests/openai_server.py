"""A minimal OpenAI-compatible server over any scrit backend, for tests.

It behaves like vLLM where clients can tell: the matched stop string is removed from the text and
named in ``stop_reason``, usage counts are returned, errors use OpenAI's ``{"error": {...}}`` shape.
It also sets ``x-critic-version`` like scrit's own endpoint.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from scrit.backends.base import InferenceBackend, SamplingParams


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def make_app(backend: InferenceBackend, model_name: str = "tiny", api_key: str | None = None) -> FastAPI:
    app = FastAPI()
    app.state.requests = 0

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        app.state.requests += 1
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "Incorrect API key provided", "authentication_error")
        response = await call_next(request)
        response.headers["x-critic-version"] = str(backend.version)
        return response

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "scrit"}]}

    def run(prompt: str, body: dict[str, Any]) -> tuple[str, str, str | None, dict[str, int]]:
        stop = body.get("stop") or ()
        sampling = SamplingParams(
            max_new_tokens=int(body.get("max_tokens") or 16),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            seed=body.get("seed"),
        )
        gen = backend.generate([prompt], sampling)[0]
        text, finish, stop_reason = gen.text, "stop", None
        matched = [s for s in sampling.stop if text.endswith(s)]
        if matched:
            stop_reason = matched[0]
            text = text[: -len(stop_reason)]
        elif gen.completion_tokens >= sampling.max_new_tokens:
            finish = "length"
        usage = {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        }
        return text, finish, stop_reason, usage

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any]) -> Any:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty list")
        prompt = str(messages[-1].get("content", ""))
        text, finish, stop_reason, usage = run(prompt, body)
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "stop_reason": stop_reason,
                }
            ],
            "usage": usage,
        }

    @app.post("/v1/completions")
    def completions(body: dict[str, Any]) -> Any:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return _error(400, "'prompt' must be a string")
        text, finish, stop_reason, usage = run(prompt, body)
        return {
            "id": "cmpl-test",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "stop_reason": stop_reason}],
            "usage": usage,
        }

    return app


class ServerThread:
    """Run an ASGI app with uvicorn on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, app: FastAPI) -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self, timeout: float = 20.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test OpenAI server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def save_tiny_model(path: str, seed: int = 0) -> str:
    """Save a random-init tiny Qwen2 model plus the seed's char tokenizer to ``path``.

    ``initializer_range=0.5`` makes the random model's outputs varied (the default 0.02 just repeats
    one character), so stop strings, EOS and weight swaps are observable.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scrit.seed.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
