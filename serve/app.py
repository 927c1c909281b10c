"""The critic endpoint: a Ray Serve application with a FastAPI ingress (DESIGN.md §9).

Routes (every response carries ``x-critic-version``, the version that produced it, and
``x-critic-replica``, the replica that answered; ``x-critic-version-since`` is when that replica
started serving the version):

* ``POST /v1/critique``: ``{"problem", "solution"}`` or ``{"problem", "steps": [...]}``, optional
  ``"reference"`` (contrastive mode) -> verdicts, first wrong step (0-based, -1 = none), correction,
  answer, the critique text and ``critic_version``;
* ``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI-compatible, ``stream: true``
  gives server-sent events) and ``GET /v1/models`` (with how this replica streams and batches);
* ``GET /healthz``: the replica's version, swap counters; never needs the API key.

``GET /openapi.json`` (``/docs``) describes every request, response and error body, with this
replica's limits (``serve/schema.py: openapi_components``). With an API key configured, every path
but ``/healthz`` (unknown paths, wrong methods and the docs included) answers 401 without it. Every
error is a JSON body naming the problem (and the field, ``param``); a body over the size limit is
refused with 413 as soon as the bytes received pass it: the replica never holds it whole (Ray's HTTP
proxy does read ahead of the replica until the 413 is sent).

On vLLM every request goes to the engine as it arrives (continuous batching: the engine's step loop
runs whatever is in flight, and each request ends when it is done) and a streamed response sends the
text as the engine makes it, holding back only what could be the start of a stop string; a client
that disconnects has its request aborted in the engine. On the HF backend requests are grouped with
``@serve.batch`` (``serve.max_batch_size``, ``serve.batch_wait_timeout_s``) into padded forward passes
and a stream sends the finished text in pieces. Both routes of the OpenAI APIs share one path
(``_respond``). Hot swap is in ``serve/service.py``: replicas follow the run's registry file and
switch between requests, each request finishing on the version it started with.

Entry points: ``start_critic_endpoint`` / ``stop_critic_endpoint`` (Ray already initialised; the
``scrit run`` driver and ``scrit serve`` use them).
"""

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from scrit.backends.base import Generation, PromptTooLong, SamplingParams
from scrit.serve.schema import (
    CRITIQUE_STOPS,
    DONE_EVENT,
    ApiError,
    Capabilities,
    ChatBody,
    CompletionBody,
    CritiqueBody,
    Limits,
    ResponseFormat,
    SamplingFields,
    StopHoldback,
    chat_prompt,
    completion_prompts,
    critique_input,
    critique_result,
    decode_body,
    encode_error,
    error_event,
    finish,
    model_list,
    openapi_components,
    request_sampling,
)
from scrit.serve.service import ROLE, CriticService, Delta, Generations, ServeSettings, telemetry

__all__ = [
    "APP_NAME",
    "CriticServer",
    "build_settings",
    "critic_app",
    "start_critic_endpoint",
    "stop_critic_endpoint",
    "wait_until_healthy",
]

log = logging.getLogger("ray.serve")

APP_NAME = "scrit-critic"
MODEL_NAME = "scrit-critic"
VERSION_HEADER = "x-critic-version"
REPLICA_HEADER = "x-critic-replica"
SINCE_HEADER = "x-critic-version-since"
OPEN_PATHS = frozenset({"/healthz"})  # answered without the API key (liveness probes carry no secrets)
ROUTES = frozenset({"/healthz", "/v1/models", "/v1/critique", "/v1/chat/completions", "/v1/completions"})  # metrics


class _CriticAPI(FastAPI):
    """The FastAPI app whose OpenAPI document describes the replica it runs in.

    The routes parse their bodies with msgspec (``serve/schema.py``), so FastAPI sees no body
    parameters; the request, response and error shapes are declared per route as ``$ref``s and
    ``openapi`` fills in ``components`` from ``openapi_components``, with this replica's limits and
    model name, plus the bearer-key security scheme when a key is configured.
    """

    def openapi(self) -> dict[str, Any]:
        spec = super().openapi()  # cached by FastAPI; filled in once below
        components = spec.setdefault("components", {})
        if "CritiqueBody" not in components.get("schemas", {}):
            server = _server()
            limits = server.limits if server is not None else Limits()
            name = server.settings.model_name if server is not None else MODEL_NAME
            components["schemas"] = {**components.get("schemas", {}), **openapi_components(limits, name)}
            if server is not None and server.settings.api_key_sha256 is not None:
                components["securitySchemes"] = {"bearer": {
                    "type": "http", "scheme": "bearer",
                    "description": "Every route but /healthz needs 'Authorization: Bearer <key>' (401 otherwise)."}}
                spec["security"] = [{"bearer": []}]
            spec["info"]["x-scrit-max-body-bytes"] = limits.max_body_bytes
        return spec


app = _CriticAPI(title="scrit critic", description="The evolving SCRIT critic (DESIGN.md §9).", version="1")


def _ref(name: str) -> dict[str, Any]:
    return {"schema": {"$ref": f"#/components/schemas/{name}"}}


def _responses(ok: str, ok_description: str, *errors: int, chunk: str | None = None) -> dict[int | str, Any]:
    """OpenAPI ``responses`` of a route: ``ok`` (a component name) for 200 and the error body for
    each status in ``errors``; ``chunk`` names the event body of a streamed (``stream: true``) 200."""
    content = {"application/json": _ref(ok)}
    if chunk is not None:
        content["text/event-stream"] = {"schema": {  # one event (OpenAPI 3.1: the schema of each event)
            "type": "object", "required": ["data"],
            "description": f"With stream: true: one {chunk} per event, then the event 'data: [DONE]' (an error "
                           "after the stream began is one ErrorResponse event before it).",
            "properties": {"data": {"anyOf": [
                {"type": "string", "const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": f"#/components/schemas/{chunk}"}},
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": "#/components/schemas/ErrorResponse"}},
            ]}},
        }}
    out: dict[int | str, Any] = {200: {"description": ok_description, "content": content}}
    for status in errors:
        out[status] = {"description": _ERROR_DESCRIPTIONS[status],
                       "content": {"application/json": _ref("ErrorResponse")}}
    return out


def _json_body(name: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": _ref(name)}}}


_ERROR_DESCRIPTIONS = {
    400: "The body is not valid: the error names the field at fault (param) and the problem.",
    401: "Missing or wrong API key.",
    404: "A model other than the one served.",
    413: "The body is larger than info.x-scrit-max-body-bytes.",
    500: "The model failed to generate (or a bug); the message says which.",
}


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict[str, str] | None = None) -> Response:
    return Response(encode_error(status, message, kind, param), status_code=status, headers=headers,
                    media_type="application/json")


def _json(body: msgspec.Struct, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), media_type="application/json", headers=headers)


@app.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> Response:
    return _error(error.status, error.message, error.kind, error.param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> Response:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return _error(error.status_code, str(error.detail), kind, headers=getattr(error, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> Response:
    return _error(400, f"invalid request: {error.errors()}")


@app.exception_handler(Exception)
async def _server_error(_: Request, error: Exception) -> Response:
    """A bug, not a client mistake: still an error body in the API's shape (Starlette logs the traceback)."""
    return _error(500, f"internal error: {type(error).__name__}", "server_error")


class _AuthAndHeaders:
    """Pure ASGI middleware: the API key check (401) and the version/replica headers on every response.

    A route that generated text sets ``x-critic-version`` itself (the version of the batch that
    produced it); any other response, errors included, gets the replica's active version.
    """

    def __init__(self, asgi_app: Any) -> None:
        self.app = asgi_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = _server()
        if server is None:  # not inside a replica (cannot happen under Serve)
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        defaults = server.headers(server.service.active.version)
        status = [500]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in defaults.items() if k.encode() not in present]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        try:
            if path not in OPEN_PATHS and not server.authorized(scope):
                response = _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                  "authentication_error", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_with_headers)
                return
            await self.app(scope, receive, send_with_headers)
        finally:
            metrics = telemetry(server.settings)
            if metrics is not None:
                metrics.observe_request(path if path in ROUTES else "other", status[0], time.perf_counter() - started)


app.add_middleware(_AuthAndHeaders)


def _server() -> "CriticServer | None":
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - outside a replica
        return None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _generation_failed(error: BaseException) -> ApiError:
    if isinstance(error, PromptTooLong):  # the request's fault: a prompt over the model's context
        return ApiError(400, f"the prompt is too long for this model: {error}")
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")


async def _events(form: ResponseFormat, generations: Generations, first: Delta, sampling: SamplingParams,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed response: each choice's text as it is made (never a stop
    string or what could be the start of one: ``StopHoldback``), its end with the finish reason, the
    usage if asked, ``[DONE]``. Whatever ends the stream early (a client that went away cancels it)
    aborts the generations still running."""
    holdbacks = [StopHoldback(sampling.stop) for _ in range(generations.count)]
    finals: list[Generation] = []
    try:
        opening = form.opening(generations.count)
        if opening:
            yield opening
        delta: Delta | None = first
        while delta is not None:
            holdback = holdbacks[delta.index]
            if delta.final is None:
                piece = holdback.feed(delta.text)
                if piece:
                    yield form.piece(delta.index, piece)
            else:
                text, reason, stop = finish(delta.final, sampling)
                piece = holdback.finish(text)
                if piece:
                    yield form.piece(delta.index, piece)
                yield form.end(delta.index, reason, stop)
                finals.append(delta.final)
            delta = await anext(generations, None)
        if include_usage:
            yield form.usage(finals)
    except Exception as error:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        log.exception("generation failed during a stream")
        yield error_event(500, _generation_failed(error).message)
    finally:
        generations.close()
    yield DONE_EVENT


# Everything the routes use is defined above: ``serve.ingress`` pickles the FastAPI app, and with it the
# module globals its routes name, when the class below is decorated (a helper defined later is missing).
@serve.deployment(name="CriticServer")
@serve.ingress(app)
class CriticServer:
    """One replica: a ``CriticService`` (active model + registry follower) behind the FastAPI routes."""

    def __init__(self, settings: ServeSettings) -> None:
        import torch

        torch.set_num_threads(max(1, int(settings.role.num_cpus)))  # the whole CPUs the replica asked for
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        self.settings = settings
        self.limits = settings.limits
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
            self.replica_id = f"local-{os.getpid()}"
        self.targets_file = self._start_metrics()
        self.service = CriticService(settings)
        self.critique_sampling = msgspec.structs.replace(settings.role.sampling, stop=CRITIQUE_STOPS)
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        log.info("critic replica %s serving version %d from %s", self.replica_id, self.service.active.version,
                 self.service.active.uri)

    def _start_metrics(self) -> Path | None:
        """This replica's Prometheus exporter (``scrit.telemetry``, role ``serve``), when metrics are on.

        When following a run, the exporter is listed in ``RUN_DIR/prometheus_targets-serve-REPLICA.json``
        beside the driver's targets file, so the run's Prometheus config scrapes it too.
        """
        if self.settings.metrics_run is None:
            return None
        try:
            from scrit import telemetry as metrics

            url = metrics.start_exporter(run=self.settings.metrics_run)
            if self.settings.follow_run_dir is None:
                return None
            path = Path(self.settings.follow_run_dir) / f"prometheus_targets-serve-{self.replica_id}.json"
            metrics.write_targets(path, {f"{ROLE}-{self.replica_id}": url})
            return path
        except Exception as error:  # noqa: BLE001 - serving never depends on metrics
            log.warning("no metrics exporter for this replica: %s", error)
            return None

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()
        targets = getattr(self, "targets_file", None)
        if targets is not None:
            targets.unlink(missing_ok=True)

    def check_health(self) -> None:
        """Serve's periodic health check: the replica is unhealthy only if it has no model."""
        if self.service.active is None:
            raise RuntimeError("no active critic model")

    # ------------------------------------------------------------------------------ helpers

    def headers(self, version: int) -> dict[str, str]:
        since = self.service.since(version)
        out = {VERSION_HEADER: str(version), REPLICA_HEADER: self.replica_id}
        if since is not None:
            out[SINCE_HEADER] = f"{since:.6f}"
        return out

    def authorized(self, scope: dict) -> bool:
        expected = self.settings.api_key_sha256
        if expected is None:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(_sha256(token.strip()), expected)
        return False

    async def _read(self, request: Request) -> bytes:
        """The request body, read as it streams in and refused (413) as soon as it is over the limit:
        at once when ``Content-Length`` says so, else when the bytes received pass it (a chunked body,
        or one whose ``Content-Length`` lies), so an oversized body is never held whole."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body too large: {length} bytes (at most {limit})")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"request body too large: over {limit} bytes")
        except ClientDisconnect as error:
            raise ApiError(400, "the client disconnected before sending the whole body") from error
        return bytes(body)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this endpoint serves {self.settings.model_name!r}",
                           "not_found_error", param="model")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, requests: list[tuple[list[str], SamplingParams]]
                              ) -> list[list[Generation] | Exception]:
        return await self.service.generate_batch(requests)

    async def _start(self, prompts: list[str], sampling: SamplingParams) -> Generations:
        """One request's generations: on a continuous engine they start now and stream as they are made;
        otherwise the request joins a ``@serve.batch`` batch and its finished text is handed out in pieces."""
        try:
            if self.service.continuous:
                return await self.service.submit(prompts, sampling)
            result = await self._generate_batch((prompts, sampling))
        except Exception as error:  # noqa: BLE001 - the engine refused the request (e.g. it was closed)
            raise _generation_failed(error) from error
        if isinstance(result, Exception):
            raise _generation_failed(result)
        refused = next((generation.error for generation in result if generation.error), None)
        if refused:  # a batch backend (HF) generates nothing for a prompt over the context
            raise _generation_failed(PromptTooLong(refused))
        return Generations.finished(result)

    async def _generate(self, prompts: list[str], sampling: SamplingParams) -> list[Generation]:
        """The finished generations of ``prompts``, in order."""
        generations = await self._start(prompts, sampling)
        try:
            return await generations.results()
        except Exception as error:  # noqa: BLE001 - a 500 in the API's shape
            raise _generation_failed(error) from error

    async def _respond(self, api: Literal["chat", "text"], prompts: list[str], sampling: SamplingParams,
                       body: SamplingFields) -> Response:
        """The response of either OpenAI API: the whole completion, or (``stream``) its events as the
        text is made. The version that makes it is known once the request is in the engine, so it is in
        the headers of both; an error before the first piece of text is still a JSON error."""
        if not body.stream:
            results = await self._generate(prompts, sampling)
            form = ResponseFormat(api, self.settings.model_name, results[0].version)
            return _json(form.completion(results, sampling), self.headers(results[0].version))
        generations = await self._start(prompts, sampling)
        try:
            first = await anext(generations)
        except Exception as error:  # noqa: BLE001 - nothing is sent yet: a JSON error
            raise _generation_failed(error) from error
        form = ResponseFormat(api, self.settings.model_name, generations.version)
        events = _events(form, generations, first, sampling, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={**self.headers(generations.version), "Cache-Control": "no-cache"})

    # ------------------------------------------------------------------------------- routes

    @app.get("/healthz", openapi_extra={"security": []},
             responses=_responses("Health", "Alive; the replica's version (needs no API key)."))
    async def healthz(self) -> JSONResponse:
        health = await asyncio.to_thread(self.service.health)  # asks the engine thread (between two steps)
        return JSONResponse({"status": "ok", "replica": self.replica_id, "model": self.settings.model_name, **health})

    @app.get("/v1/models", responses=_responses("ModelList", "The served model.", 401))
    async def models(self) -> Response:
        active = self.service.active
        continuous = self.service.continuous
        capabilities = Capabilities(backend=self.settings.role.engine.backend, token_streaming=continuous,
                                    continuous_batching=continuous)
        return _json(model_list(self.settings.model_name, active.since, active.version, capabilities))

    @app.post("/v1/critique", openapi_extra=_json_body("CritiqueBody"),
              responses=_responses("CritiqueResult", "The critique.", 400, 401, 404, 413, 500))
    async def critique(self, request: Request) -> Response:
        from scrit.prompts import critic_prompt

        body = decode_body(await self._read(request), CritiqueBody, request.headers.get("content-type"))
        self._check_model(body.model)
        problem, solution, reference = critique_input(body, self.limits)
        prompt = critic_prompt(problem, solution, reference, self.settings.prompt_style)
        generation = (await self._generate([prompt], self.critique_sampling))[0]
        text = generation.text
        for marker in CRITIQUE_STOPS:  # a stop marker is the start of something else, not critique
            if text.endswith(marker):
                text = text[: -len(marker)]
        result = critique_result(text.rstrip(), generation, "contrastive" if reference is not None else "direct")
        return _json(result, self.headers(generation.version))

    @app.post("/v1/chat/completions", openapi_extra=_json_body("ChatBody"),
              responses=_responses("ChatCompletion", "The completion (stream: false) or its events (stream: true).",
                                   400, 401, 404, 413, 500, chunk="ChatCompletionChunk"))
    async def chat_completions(self, request: Request) -> Response:
        body = decode_body(await self._read(request), ChatBody, request.headers.get("content-type"))
        self._check_model(body.model)
        prompt = chat_prompt(body, self.limits)
        return await self._respond("chat", [prompt], request_sampling(body, self.limits), body)

    @app.post("/v1/completions", openapi_extra=_json_body("CompletionBody"),
              responses=_responses("TextCompletion", "The completion of each prompt (stream: false) or their events "
                                   "(stream: true).", 400, 401, 404, 413, 500, chunk="TextCompletion"))
    async def completions(self, request: Request) -> Response:
        body = decode_body(await self._read(request), CompletionBody, request.headers.get("content-type"))
        self._check_model(body.model)
        prompts = completion_prompts(body, self.limits)
        return await self._respond("text", prompts, request_sampling(body, self.limits), body)


# ------------------------------------------------------------------------------------------------
# Entry points


def _published_version_of(model_uri: str) -> int | None:
    """The version number of ``model_uri`` when it is a published checkpoint of some run
    (``RUN/versions/vNNNN`` listed in ``RUN/versions/registry.jsonl``), else None."""
    from scrit.checkpoints import RegistryTail

    path = Path(model_uri)
    if not path.is_dir() or path.parent.name != "versions":
        return None
    target = path.resolve()
    for version in RegistryTail(path.parent.parent).poll():
        if Path(version.uri).resolve() == target:
            return version.version
    return None


def build_settings(cfg: Any, model_uri: str | None = None, follow_run_dir: str | os.PathLike[str] | None = None,
                   *, api_key: str | None = None, start_version: int | None = None,
                   poll_s: float = 0.2) -> ServeSettings:
    """Replica settings from a ``ScritConfig``.

    ``model_uri`` (a spec: ``seed``, a checkpoint directory) is what is served until a newer version
    is published; it defaults to ``critic.model``, or with ``follow_run_dir`` to the model the run
    started from. Its version number is ``start_version``, else the number it was published under
    (for ``RUN/versions/vNNNN``), else 0. The API key is ``api_key``, else ``serve.api_key``, else
    ``$SCRIT_API_KEY``; replicas get only its sha256.
    """
    from scrit.backends import resolve_model_path
    from scrit.factory import serve_role
    from scrit.serve.follow import run_seed_model

    follow = str(Path(follow_run_dir).resolve()) if follow_run_dir is not None else None
    resolved = resolve_model_path(model_uri or (run_seed_model(follow) if follow else cfg.critic.model))
    if start_version is None:
        start_version = _published_version_of(resolved) or 0
    key = api_key or cfg.serve.resolved_api_key()
    return ServeSettings(
        role=serve_role(cfg, resolved, follows=follow is not None),  # the critic's backend, as the run builds it
        start_version=int(start_version),
        follow_run_dir=follow,
        poll_s=poll_s,
        model_name=MODEL_NAME,
        limits=Limits.from_config(cfg.serve, cfg.critic.max_new_tokens),
        api_key_sha256=_sha256(key) if key else None,
        max_batch_size=cfg.serve.max_batch_size,
        batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s,
        metrics_run=cfg.run.name if cfg.metrics.enabled else None,
    )


def critic_app(settings: ServeSettings, *, replicas: int = 1, num_cpus: float = 0.25, num_gpus: float = 0.0,
               max_ongoing_requests: int | None = None) -> Any:
    """The bound Serve application (not yet running)."""
    ongoing = max_ongoing_requests or max(64, 4 * settings.max_batch_size)
    return CriticServer.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=ongoing,
        graceful_shutdown_timeout_s=10,
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(settings)


def wait_until_healthy(url: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll ``url/healthz`` until it answers 200; returns its JSON. TimeoutError otherwise."""
    import httpx

    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5.0)
            if response.status_code == 200:
                return response.json()
            problem = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}: {error}"
        time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz did not become healthy in {timeout:.0f}s ({problem})")


def start_critic_endpoint(cfg: Any, model_uri: str | None = None,
                          follow_run_dir: str | os.PathLike[str] | None = None, *, host: str | None = None,
                          port: int | None = None, replicas: int | None = None, api_key: str | None = None,
                          app_name: str = APP_NAME, route_prefix: str = "/", start_version: int | None = None,
                          poll_s: float = 0.2, ready_timeout_s: float = 180.0, weights: Any = None) -> str:
    """Deploy the critic endpoint on the running Ray cluster; returns its base URL once it answers.

    Ray must already be initialised. ``cfg`` is a ``ScritConfig``: ``serve.*`` gives host, port,
    limits, batching and the API key, ``resources.serve_replicas`` / ``serve_replica_num_cpus`` /
    ``serve_replica_num_gpus`` size the replicas, ``critic.*`` the backend and generation length.
    Keyword arguments override the config. With ``follow_run_dir`` every replica follows that run's
    ``versions/registry.jsonl`` (a running or finished run) and hot-swaps to each new version; it
    starts on the newest published version that loads; ``weights`` (the run's
    ``scrit.actors.registry.ObjectStoreWeights``, when the run starts its own endpoint) lets replicas
    take versions from Ray's object store instead of the checkpoint. Serve's HTTP options are
    cluster-wide: if Serve is already running on another host/port, that one is kept, and this raises
    when the URL does not answer.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("start_critic_endpoint needs Ray to be initialised (ray.init) first")
    settings = msgspec.structs.replace(build_settings(cfg, model_uri, follow_run_dir, api_key=api_key,
                                                      start_version=start_version, poll_s=poll_s), weights=weights)
    host = host or cfg.serve.host
    port = int(port if port is not None else cfg.serve.port)
    serve.start(http_options={"host": host, "port": port})
    application = critic_app(settings, replicas=replicas or cfg.resources.serve_replicas,
                             num_cpus=cfg.resources.serve_replica_num_cpus,
                             num_gpus=cfg.resources.serve_replica_num_gpus)
    prefix = "/" + route_prefix.strip("/") if route_prefix.strip("/") else "/"
    serve.run(application, name=app_name, route_prefix=prefix, blocking=False)
    host, port = _serving_address(host, port)
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{probe_host}:{port}{'' if prefix == '/' else prefix}"
    health = wait_until_healthy(url, ready_timeout_s)
    log.info("critic endpoint %s up at %s (version %s)", app_name, url, health.get("critic_version"))
    return url


def _serving_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxy really listens: ``serve.start`` keeps the HTTP options of a Serve instance
    that was already running, so an endpoint deployed there answers on that instance's host and port."""
    try:
        from ray.serve.context import _get_global_client

        options = _get_global_client().http_config  # private API: fall back to what was asked for
        actual_host, actual_port = str(options.host), int(options.port)
    except Exception:  # noqa: BLE001
        return host, port
    if (actual_host, actual_port) != (host, port):
        log.warning("Serve was already running on %s:%d; the critic endpoint is served there, not on %s:%d",
                    actual_host, actual_port, host, port)
    return actual_host, actual_port


def stop_critic_endpoint(app_name: str = APP_NAME, shutdown_serve: bool = True) -> None:
    """Delete the endpoint's application (replicas finish in-flight requests first, up to 10 s); with
    ``shutdown_serve`` also stop Serve itself (proxy and controller) when no other application is left.
    Ray keeps running. Safe to call when nothing is deployed."""
    import ray

    if not ray.is_initialized():
        return
    try:
        serve.delete(app_name)
    except Exception as error:  # noqa: BLE001 - nothing deployed, or Serve already gone
        log.debug("serve.delete(%s): %s", app_name, error)
    if shutdown_serve:
        try:
            remaining = serve.status().applications
        except Exception:  # noqa: BLE001
            remaining = {}
        if not remaining:
            serve.shutdown()
