"""Client for any OpenAI-compatible server: vLLM, SGLang, or scrit's own Serve endpoint (DESIGN.md §7).

The server owns the weights, so ``load_weights`` only records the version this client reports; when
the server sends an ``x-critic-version`` header (scrit's endpoint does), that value wins, so each
``Generation`` carries the version that actually produced it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import httpx

from scrit.backends.base import Generation, SamplingParams, truncate_at_stop

VERSION_HEADER = "x-critic-version"
_TRANSIENT_STATUS = {429, 502, 503, 504}
# Failures where the request most likely never ran (or the server restarted): safe to send again.
_TRANSIENT_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


def normalize_base_url(base_url: str) -> str:
    """Accept ``http://host:port``, ``.../`` and ``.../v1``; return the root without ``/v1``."""
    base = base_url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    return base


def _error_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI's ``{"error": {"message"}}``, FastAPI's ``{"detail"}``, or raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in body:
            return str(body["detail"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:500]


class OpenAIHTTPBackend:
    """One HTTP request per prompt, sent concurrently; retries transient failures with backoff."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        chat: bool = True,
        concurrency: int = 8,
        timeout: float = 120,
        version: int = 0,
        max_retries: int = 3,
        backoff: float = 0.5,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        """``model=None`` asks ``GET /v1/models`` (lazily, on first use) and takes the first id.

        ``extra_body`` is merged into every request, e.g. ``{"include_stop_str_in_output": True}``
        for vLLM. ``max_retries`` counts retries after the first attempt.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.base_url = normalize_base_url(base_url)
        self.chat = chat
        self.concurrency = concurrency
        self.max_retries = max(0, int(max_retries))
        self.backoff = backoff
        self.extra_body = dict(extra_body or {})
        self._version = int(version)
        self._model = model
        self._model_lock = threading.Lock()
        key = api_key or os.environ.get("SCRIT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="scrit-http")

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()

    def __enter__(self) -> "OpenAIHTTPBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None) -> httpx.Response:
        """Send with retries on connection errors and 429/5xx; raise RuntimeError with the server's message."""
        url = f"{self.base_url}{path}"
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                response = self._client.request(method, url, json=json)
            except _TRANSIENT_ERRORS as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
                continue
            except httpx.TransportError as exc:  # timeouts: the server is busy, resending only adds load
                raise RuntimeError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc
            if response.status_code in _TRANSIENT_STATUS:
                last_problem = f"HTTP {response.status_code}: {_error_message(response)}"
                continue
            if response.status_code >= 400:
                raise RuntimeError(
                    f"{method} {url} failed with HTTP {response.status_code}: {_error_message(response)}"
                )
            return response
        raise RuntimeError(f"{method} {url} failed after {self.max_retries + 1} attempts: {last_problem}")

    # ------------------------------------------------------------------ public

    @property
    def model(self) -> str:
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    body = self._request("GET", "/v1/models").json()
                    models = body.get("data") or []
                    if not models:
                        raise RuntimeError(f"{self.base_url}/v1/models lists no models")
                    self._model = str(models[0]["id"])
        return self._model

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, version: int, path: str) -> None:
        """Only records ``version``: the server owns and swaps its weights; ``path`` is ignored."""
        self._version = int(version)

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Generation]:
        """Results come back in input order; any failed request fails the whole call."""
        prompts = list(prompts)
        if not prompts:
            return []
        model = self.model  # resolve once, before fanning out
        futures = [self._pool.submit(self._generate_one, model, p, sampling) for p in prompts]
        return [f.result() for f in futures]

    def _generate_one(self, model: str, prompt: str, sampling: SamplingParams) -> Generation:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = prompt
            path = "/v1/completions"
        body.update(self.extra_body)
        response = self._request("POST", path, json=body)
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = (choice["message"]["content"] if self.chat else choice["text"]) or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"unexpected response from {self.base_url}{path}: {response.text[:300]!r}") from exc
        # OpenAI-style servers drop the matched stop string; scrit keeps it. vLLM names it in stop_reason.
        stop_reason = choice.get("stop_reason")
        if isinstance(stop_reason, str) and stop_reason in sampling.stop and not text.endswith(stop_reason):
            text += stop_reason
        text, _ = truncate_at_stop(text, sampling.stop)
        usage = payload.get("usage") or {}
        header = response.headers.get(VERSION_HEADER)
        try:
            version = int(header) if header is not None else self._version
        except ValueError:
            version = self._version
        return Generation(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            version=version,
        )
