"""The OpenAI-compatible HTTP API (Starlette): /v1/completions (JSON or server-sent events),
/v1/models, /health, /metrics. Device work happens on the engines' threads; this event loop only
validates, submits and relays events. Errors use OpenAI's envelope
{"error": {"message", "type", "param", "code"}}.

Every request's work is bounded before it reaches an engine (docs/SERVING.md, "Limits"): the body
is read up to `Limits.max_body_bytes` (413) within `Limits.body_timeout` (408), must be
`application/json` (415), is parsed off the event loop, and its prompts, `n` and stop strings are
checked against the context, the server's capacity and MAX_STOP / MAX_STOP_CHARS (400). With an
API key every path but /health and /metrics needs `Authorization: Bearer KEY` (401)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import secrets
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moejax.errors import UserError
from moejax.serving.metrics import CONTENT_TYPE
from moejax.serving.chat import decode_chat, parse_detokenize, parse_tokenize
from moejax.serving.formats import ChatFormat, CompletionFormat
from moejax.serving.protocol import (ApiError, ServedModel, cut, decode_body, decode_completion, error_body,
                                     error_response)
from moejax.serving.replicas import EngineDead, QueueFull, Router
from moejax.serving.request import Event, Request
from moejax.serving.server import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES

# answered without the API key (as vLLM: the tokenizer endpoints are outside /v1 and open)
OPEN_PATHS = ("/health", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one HTTP request may cost (docs/SERVING.md, "Limits")."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a larger body is a 413, unread
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # seconds to upload the body (408 after)
    api_key: str | None = None  # Bearer key for every path but OPEN_PATHS (None: open)

    def __post_init__(self):
        if self.max_body_bytes < 1:
            raise UserError(f"--max-body-bytes {self.max_body_bytes} must be >= 1")
        if not (self.body_timeout > 0 and math.isfinite(self.body_timeout)):
            raise UserError(f"--body-timeout {self.body_timeout} must be > 0 seconds")


def _media_type(http: HttpRequest) -> str:
    return http.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(http: HttpRequest, limits: Limits) -> bytes:
    """The body, at most `limits.max_body_bytes` (ApiError 413; a Content-Length above it is refused
    before anything is read) within `limits.body_timeout` seconds (ApiError 408). A client that
    disconnects raises starlette's ClientDisconnect."""
    cap = limits.max_body_bytes
    too_large = ApiError(413, f"the request body is larger than this server's limit of {cap} bytes "
                         "(--max-body-bytes)", None, "request_too_large")
    declared = http.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > cap:
        raise too_large
    chunks, size = [], 0

    async def collect():
        nonlocal size
        async with contextlib.aclosing(http.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > cap:
                    raise too_large
                chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), limits.body_timeout)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout:g} s", None,
                       "request_timeout") from None
    return b"".join(chunks)


class ApiKeyAuth:
    """ASGI middleware: every HTTP path but OPEN_PATHS needs `Authorization: Bearer KEY` (401 in
    OpenAI's envelope otherwise). Keys are compared as SHA-256 digests in constant time."""

    def __init__(self, app, key: str):
        self.app, self.digest = app, hashlib.sha256(key.encode()).digest()

    def allowed(self, headers) -> bool:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and secrets.compare_digest(
                    hashlib.sha256(token.strip()).digest(), self.digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self.allowed(scope["headers"]):
            response = error_response(401, "a valid API key is required: send the header "
                                      "'Authorization: Bearer KEY' (the server's --api-key)", None,
                                      "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Lifecycle:
    """The app's open completions, for the server's stop (moejax/serving/server.py): `draining`
    refuses new ones (503); `cut(reason)` ends every open one at once (a stream with an error
    event and `data: [DONE]`, a JSON request with a 503); `dropped` counts those so ended. Used
    on the event loop only."""

    def __init__(self):
        self.draining = False
        self.open: dict[int, asyncio.Queue] = {}
        self.dropped = 0
        self._ids = 0

    def register(self, events: asyncio.Queue) -> int:
        self._ids += 1
        self.open[self._ids] = events
        return self._ids

    def cut(self, reason: str) -> int:
        for events in self.open.values():
            events.put_nowait((None, Event([], "", "abort", error=reason)))
        return len(self.open)


class _Stream(StreamingResponse):
    """A StreamingResponse that runs `cleanup` however it ends (even when the client leaves before
    the body iterator started, so its generator's own `finally` never ran)."""

    def __init__(self, content, cleanup, **kw):
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def create_app(router: Router, metrics, served: ServedModel, limits: Limits | None = None) -> Starlette:
    """The app; `app.state.lifecycle` (a Lifecycle) is how the server drains it."""
    limits = limits or Limits()
    life = Lifecycle()
    shutting_down = "shutting_down"

    def generation(decode, fmt_class):
        """A handler of generation requests: `decode(raw, served, capacity)` parses the body into
        (prompts, n, params, options); `fmt_class` (formats.py) shapes the engine's events."""

        async def handler(http: HttpRequest):
            if _media_type(http) != "application/json":
                return error_response(415, f"Content-Type must be application/json, not "
                                      f"{cut(http.headers.get('content-type', '(none)'), 60)!r}", None,
                                      "unsupported_media_type")
            try:
                if life.draining:
                    raise ApiError(503, "the server is shutting down", None, shutting_down)
                raw = await read_body(http, limits)
                prompts, n, params, opt = await asyncio.to_thread(decode, raw, served, router.capacity)
                if life.draining:  # the stop began while it was read
                    raise ApiError(503, "the server is shutting down", None, shutting_down)
            except ClientDisconnect:  # the client left during its upload: nobody to answer, nothing to log
                return Response(status_code=499)
            except ApiError as e:
                return error_response(e.status, e.message, e.param, e.code)
            return await run(http, prompts, n, params, opt, fmt_class(served, opt, prompts, n))
        return handler

    async def run(http: HttpRequest, prompts, n, params, opt, fmt):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(choice: int, ev):  # called on an engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (choice, ev))
            except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
                pass

        subs = []
        try:
            for i, prompt in enumerate(prompts):
                for j in range(n):
                    p = dataclasses.replace(params, seed=params.seed + j) if n > 1 else params
                    choice = i * n + j
                    req = Request(prompt, p, lambda ev, c=choice: deliver(c, ev), served.tok.detokenizer(prompt))
                    subs.append((req, router.submit(req)))
        except (QueueFull, EngineDead) as e:
            for req, engine in subs:
                engine.abort(req)
            if isinstance(e, EngineDead):
                return error_response(503, f"the engine has stopped: {e}")
            return error_response(429, f"the server is full: {e}; retry later", None, "queue_full")
        key = life.register(events)
        usage = {"prompt_tokens": sum(len(r.prompt) for r, _ in subs), "completion_tokens": 0, "total_tokens": 0}

        def abort_all():
            life.open.pop(key, None)
            for req, engine in subs:
                if req.finish_reason is None:
                    engine.abort(req)

        def finish_usage():
            usage["completion_tokens"] = sum(len(r.generated) for r, _ in subs)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return usage

        if opt["stream"]:
            async def stream():
                open_ = len(subs)
                try:
                    while open_:
                        c, ev = await events.get()
                        if ev.error:  # the stream ends with an error event, then [DONE] as always
                            if c is None:  # the server's stop cut it short
                                life.dropped += 1
                                err = error_body(503, ev.error, None, shutting_down)
                            else:
                                err = error_body(500, ev.error)
                            yield _sse(err)
                            yield "data: [DONE]\n\n"
                            return
                        chunks = fmt.chunks(c, ev)
                        open_ -= ev.finish_reason is not None
                        if not open_:
                            chunks[-1]["usage"] = finish_usage()
                        for chunk in chunks:
                            yield _sse(chunk)
                    if opt["include_usage"]:
                        yield _sse({**fmt.head, "object": fmt.chunk_obj, "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                finally:  # a client that disconnects lands here too (the task is cancelled)
                    abort_all()
            return _Stream(stream(), abort_all, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        open_ = len(subs)
        checked = time.monotonic()
        try:
            while open_:
                try:
                    c, ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    c = ev = None
                if time.monotonic() - checked > 1.0:  # a client that went away frees its slots
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return Response(status_code=499)
                if ev is None:
                    continue
                if ev.error:
                    if c is None:  # the server's stop cut it short
                        life.dropped += 1
                        return error_response(503, ev.error, None, shutting_down)
                    return error_response(503, f"the engine stopped while serving the request: {ev.error}")
                fmt.add(c, ev)
                open_ -= ev.finish_reason is not None
        finally:
            abort_all()
        return JSONResponse(fmt.response(finish_usage()))

    async def models(_):
        return JSONResponse({"object": "list", "data": [
            {"id": served.id, "object": "model", "created": served.created, "owned_by": "moejax",
             "root": served.root or served.id, "parent": None, "max_model_len": served.max_len}]})

    def tokenizer_endpoint(parse):
        async def handler(http: HttpRequest):
            if _media_type(http) != "application/json":
                return error_response(415, "Content-Type must be application/json", None, "unsupported_media_type")
            try:
                raw = await read_body(http, limits)
                return JSONResponse(await asyncio.to_thread(decode_body, raw, parse, served))
            except ClientDisconnect:
                return Response(status_code=499)
            except ApiError as e:
                return error_response(e.status, e.message, e.param, e.code)
        return handler

    async def tokenizer_info(_):
        return JSONResponse(served.tok.info())

    async def health(_):
        if router.dead:
            return error_response(503, f"the engine has stopped: {router.dead}")
        return Response(status_code=200)

    async def metrics_(_):
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(_, exc: HTTPException):
        return error_response(exc.status_code, exc.detail or "error")

    async def server_error(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {cut(str(exc), 200)}")

    routes = [Route("/v1/completions", generation(decode_completion, CompletionFormat), methods=["POST"]),
              Route("/v1/chat/completions", generation(decode_chat, ChatFormat), methods=["POST"]),
              Route("/v1/models", models),
              Route("/tokenize", tokenizer_endpoint(parse_tokenize), methods=["POST"]),
              Route("/detokenize", tokenizer_endpoint(parse_detokenize), methods=["POST"]),
              Route("/tokenizer_info", tokenizer_info), Route("/health", health), Route("/metrics", metrics_)]
    middleware = [Middleware(ApiKeyAuth, key=limits.api_key)] if limits.api_key else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.lifecycle = life
    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
