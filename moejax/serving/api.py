"""The OpenAI-compatible HTTP API (Starlette): /v1/completions (JSON or server-sent events),
/v1/models, /health, /metrics. Device work happens on the engines' threads; this event loop only
validates, submits and relays events. Errors use OpenAI's envelope
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moejax.serving.metrics import CONTENT_TYPE
from moejax.serving.replicas import EngineDead, QueueFull, Router
from moejax.serving.request import Request, SamplingParams
from moejax.tokenizer import encode

# fields OpenAI defines that this server does not implement: accepted only at their default
UNSUPPORTED = {"logprobs": (None,), "echo": (False, None), "suffix": (None, ""), "best_of": (None, 1),
               "logit_bias": (None, {}), "presence_penalty": (0, None), "frequency_penalty": (0, None),
               "min_p": (0, None)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = {429: "rate_limit_error", 503: "service_unavailable"}.get(
        status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    id: str
    max_len: int  # prompt + max_tokens must fit (the KV cache's positions)
    vocab_size: int
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param, "invalid_value")


def _number(body: dict, name: str, default, lo, hi, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v):
        raise _bad(f"{name} {v!r} must be {'an integer' if integer else 'a finite number'}", name)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise _bad(f"{name} {v!r} must be {low}" + (f" and <= {hi}" if hi is not None else ""), name)
    return v


def _token_list(v, name: str, vocab: int) -> list[int]:
    if not v:
        raise _bad(f"{name} is empty: give at least one token", name)
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int):
            raise _bad(f"{name}: {t!r} is not a token id (an integer)", name)
        if not 0 <= t < vocab:
            raise _bad(f"{name}: token id {t} is outside the vocabulary [0, {vocab})", name)
    return list(v)


def _prompts(v, vocab: int) -> list[list[int]]:
    """prompt: a string, a list of token ids, or a list of either (one choice each)."""
    if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(t, int) for t in v)):
        v = [v]
    if not isinstance(v, list) or not v:
        raise _bad("prompt must be a string, a list of token ids, or a non-empty list of those", "prompt")
    out = []
    for p in v:
        if isinstance(p, str):
            if vocab < 256:
                raise _bad(f"text prompts need the 256 byte tokens; this model's vocabulary is {vocab}: "
                           "send token ids", "prompt")
            try:
                ids = encode(p, vocab)
            except UnicodeEncodeError as e:
                raise _bad(f"prompt is not valid Unicode text ({e.reason} at character {e.start})", "prompt") from None
            out.append(_token_list(ids, "prompt", vocab))
        elif isinstance(p, list):
            out.append(_token_list(p, "prompt", vocab))
        else:
            raise _bad(f"prompt element {p!r} is neither a string nor a list of token ids", "prompt")
    return out


def parse_completion(body, served: ServedModel) -> tuple[list[list[int]], int, SamplingParams, dict]:
    """(prompts, n, sampling settings, options) from a /v1/completions body, or ApiError."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    model = body.get("model", served.id)
    if model != served.id:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {served.id!r}", "model",
                       "model_not_found")
    if "prompt" not in body:
        raise ApiError(400, "prompt is required", "prompt", "missing")
    prompts = _prompts(body["prompt"], served.vocab_size)
    for name, neutral in UNSUPPORTED.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            raise _bad(f"{name} {body[name]!r} is not supported by this server (leave it out or at "
                       f"{neutral[0]!r})", name)
    max_tokens = _number(body, "max_tokens", 16, 1, None, integer=True)
    n = _number(body, "n", 1, 1, 16, integer=True)
    top_k = _number(body, "top_k", 0, -1, None, integer=True)  # -1 or 0: off; above the vocabulary: all
    seed = _number(body, "seed", None, -2**63, 2**64 - 1, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop must be a string or a list of strings", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list):
        raise _bad("stop_token_ids must be a list of token ids", "stop_token_ids")
    stop_ids = _token_list(stop_ids, "stop_token_ids", served.vocab_size) if stop_ids else []
    options = {}
    for name in ("stream", "ignore_eos", "return_token_ids"):
        v = body.get(name, False)
        if not isinstance(v, bool):
            raise _bad(f"{name} {v!r} must be true or false", name)
        options[name] = v
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise _bad("stream_options must be an object", "stream_options")
    options["include_usage"] = bool(so.get("include_usage", False))
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > served.max_len:
        raise _bad(f"prompt of {longest} tokens + max_tokens {max_tokens} = {longest + max_tokens} exceeds this "
                   f"server's context of {served.max_len} tokens", "max_tokens")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True), top_k=max(top_k, 0),
        seed=secrets.randbits(63) if seed is None else seed, stop=tuple(stop), stop_token_ids=tuple(stop_ids),
        ignore_eos=options["ignore_eos"])
    return prompts, n, params, options


def create_app(router: Router, metrics, served: ServedModel) -> Starlette:
    async def completions(http: HttpRequest):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(400, f"the request body is not JSON ({e})")
        try:
            prompts, n, params, opt = parse_completion(body, served)
        except ApiError as e:
            return error_response(e.status, e.message, e.param, e.code)
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
                    req = Request(prompt, p, lambda ev, c=choice: deliver(c, ev))
                    subs.append((req, router.submit(req)))
        except (QueueFull, EngineDead) as e:
            for req, engine in subs:
                engine.abort(req)
            if isinstance(e, EngineDead):
                return error_response(503, f"the engine has stopped: {e}")
            return error_response(429, f"the server is full: {e}; retry later", None, "queue_full")
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": served.id}
        usage = {"prompt_tokens": sum(len(r.prompt) for r, _ in subs), "completion_tokens": 0, "total_tokens": 0}

        def abort_all():
            for req, engine in subs:
                if req.finish_reason is None:
                    engine.abort(req)

        def finish_usage():
            usage["completion_tokens"] = sum(len(r.generated) for r, _ in subs)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return usage

        def choice_json(c, text, ids, reason):
            out = {"index": c, "text": text, "logprobs": None, "finish_reason": reason}
            if opt["return_token_ids"]:
                out["token_ids"] = ids
            return out

        if opt["stream"]:
            async def stream():
                open_ = len(subs)
                try:
                    while open_:
                        c, ev = await events.get()
                        if ev.error:
                            yield _sse({"error": {"message": ev.error, "type": "server_error", "param": None,
                                                  "code": None}})
                            return
                        chunk = {**head, "choices": [choice_json(c, ev.text, ev.token_ids, ev.finish_reason)]}
                        open_ -= ev.finish_reason is not None
                        if not open_:
                            chunk["usage"] = finish_usage()
                        yield _sse(chunk)
                    if opt["include_usage"]:
                        yield _sse({**head, "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                finally:  # a client that disconnects lands here too (the task is cancelled)
                    abort_all()
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        texts, ids, reasons = [""] * len(subs), [[] for _ in subs], [None] * len(subs)
        checked = time.monotonic()
        try:
            while None in reasons:
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
                    return error_response(503, f"the engine stopped while serving the request: {ev.error}")
                texts[c] += ev.text
                ids[c] += ev.token_ids
                reasons[c] = ev.finish_reason
        finally:
            abort_all()
        choices = [choice_json(c, texts[c], ids[c], reasons[c]) for c in range(len(subs))]
        return JSONResponse({**head, "choices": choices, "usage": finish_usage()})

    async def models(_):
        return JSONResponse({"object": "list", "data": [
            {"id": served.id, "object": "model", "created": served.created, "owned_by": "moejax",
             "max_model_len": served.max_len}]})

    async def health(_):
        if router.dead:
            return error_response(503, f"the engine has stopped: {router.dead}")
        return Response(status_code=200)

    async def metrics_(_):
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(_, exc: HTTPException):
        return error_response(exc.status_code, exc.detail or "error")

    async def server_error(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health), Route("/metrics", metrics_)]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
