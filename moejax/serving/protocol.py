"""The OpenAI completions wire protocol: request validation and parsing, the error envelope
{"error": {"message", "type", "param", "code"}}, echoed input cut short. No HTTP server here
(api.py); nothing here starts JAX.

Every request's work is bounded before it reaches an engine (docs/SERVING.md, "Limits"): its
prompts, `n` and stop strings are checked against the context, the server's capacity and
MAX_STOP / MAX_STOP_CHARS (400); malformed numbers and nesting are 400s naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import reprlib
import secrets
import time

from starlette.responses import JSONResponse

from moejax.serving.request import MAX_LOGPROBS, SamplingParams
from moejax.serving.server import ECHO_CHARS, MAX_STOP, MAX_STOP_CHARS
from moejax.tokenizers import ByteTokenizer, Tokenizer

# fields OpenAI defines that this server does not implement: accepted only at their default
# (a number matches a neutral number of either type: presence_penalty 0 and 0.0 are both neutral)
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "prompt_logprobs": (None,),
               "logit_bias": (None, {}), "presence_penalty": (0, None), "frequency_penalty": (0, None),
               "min_p": (0, None)}
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {429: "rate_limit_error", 503: "service_unavailable"}  # other 4xx: invalid_request_error


def error_body(status: int, message: str, param=None, code=None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = 60
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 6
_repr.maxlevel = 3


def cut(text: str, limit: int = ECHO_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value, limit: int = ECHO_CHARS) -> str:
    """A client's value as an error message repeats it: repr, cut to `limit` characters (a 1 MB
    model name or a deeply nested list comes back as a short excerpt)."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001  (an integer too long to print, say)
        text = f"<{type(value).__name__}>"
    return cut(text, limit)


MAX_CHARS_PER_TOKEN = 32  # a text longer than this many characters per context position is refused unread


@dataclasses.dataclass(frozen=True)
class ServedModel:
    id: str
    max_len: int  # prompt + max_tokens must fit (the KV cache's positions)
    vocab_size: int
    tokenizer: Tokenizer | None = None  # None: bytes (token id = UTF-8 byte)
    root: str | None = None  # the checkpoint directory (/v1/models' root)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def tok(self) -> Tokenizer:
        return self.tokenizer or _byte_tokenizer(self.vocab_size)


@functools.lru_cache(maxsize=4)
def _byte_tokenizer(vocab: int) -> Tokenizer:
    return ByteTokenizer(vocab)


def encode_text(text: str, served: ServedModel, max_tokens: int, param: str = "prompt",
                add_special_tokens: bool = True) -> list[int]:
    """Token ids of a client's text, checked against the context: bytes take one token per UTF-8
    byte (so at least one per character, checked before encoding); any tokenizer's input is bounded
    at MAX_CHARS_PER_TOKEN characters per position before it is encoded."""
    tok = served.tok
    if tok.kind == "bytes":
        if served.vocab_size < 256:
            raise _bad(f"text prompts need the 256 byte tokens; this model's vocabulary is {served.vocab_size}: "
                       "send token ids", param)
        _context(len(text), max_tokens, served.max_len, at_least=True)  # >= 1 byte token per character
    elif len(text) > MAX_CHARS_PER_TOKEN * served.max_len:
        raise _bad(f"{param} of {len(text)} characters cannot fit this server's context of {served.max_len} tokens",
                   param)
    try:
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
    except UnicodeEncodeError as e:
        raise _bad(f"{param} is not valid Unicode text ({e.reason} at character {e.start})", param) from None
    _context(len(ids), max_tokens, served.max_len)
    return _token_list(ids, param, served.vocab_size)


def _bad(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param, "invalid_value")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: dict, name: str, default, lo, hi, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    kind = int if integer else (int, float)
    # an int is finite whatever its size (math.isfinite of a 400-digit one would overflow)
    if isinstance(v, bool) or not isinstance(v, kind) or (isinstance(v, float) and not math.isfinite(v)):
        raise _bad(f"{name} {show(v)} must be {'an integer' if integer else 'a finite number'}", name)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise _bad(f"{name} {show(v)} must be {low}" + (f" and <= {hi}" if hi is not None else ""), name)
    return v


def _neutral(v, neutral: tuple) -> bool:
    for w in neutral:
        if w is None or isinstance(w, (bool, str, dict)):
            if type(v) is type(w) and v == w:
                return True
        elif _is_number(v) and v == w:  # 0, 0.0 and -0.0 alike
            return True
    return False


def _token_list(v, name: str, vocab: int) -> list[int]:
    if not v:
        raise _bad(f"{name} is empty: give at least one token", name)
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int):
            raise _bad(f"{name}: {show(t)} is not a token id (an integer)", name)
        if not 0 <= t < vocab:
            raise _bad(f"{name}: token id {show(t)} is outside the vocabulary [0, {vocab})", name)
    return list(v)


def _context(length: int, max_tokens: int, max_len: int, at_least: bool = False) -> None:
    """400 unless a prompt of `length` tokens (at least that many, for text not yet encoded) and
    max_tokens fit the context; a prompt that alone fills it names `prompt`."""
    if length + max_tokens <= max_len:
        return
    tokens = f"{'at least ' if at_least else ''}{length} tokens"
    if length >= max_len:
        raise _bad(f"prompt of {tokens} does not fit this server's context of {max_len} tokens "
                   f"(with at least 1 to generate)", "prompt")
    raise _bad(f"prompt of {tokens} + max_tokens {show(max_tokens)} = {length + max_tokens} exceeds this "
               f"server's context of {max_len} tokens", "max_tokens")


def _prompts(v: list, served: ServedModel, max_tokens: int) -> list[list[int]]:
    """Each prompt (a string or a list of token ids) as token ids; its length is checked against
    the context before any list is built or text encoded."""
    vocab, out = served.vocab_size, []
    for p in v:
        if isinstance(p, str):
            out.append(encode_text(p, served, max_tokens))
        elif isinstance(p, list):
            _context(len(p), max_tokens, served.max_len)
            out.append(_token_list(p, "prompt", vocab))
        else:
            raise _bad(f"prompt element {show(p)} is neither a string nor a list of token ids", "prompt")
    return out


def check_model(body, served: ServedModel) -> None:
    """400 unless the body is a JSON object; 404 unless its `model` (if given) is the served one."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    model = body.get("model", served.id)
    if model not in (served.id, None, ""):  # vLLM: no model, null or "" mean the served one
        raise ApiError(404, f"model {show(model)} does not exist; this server serves {served.id!r}", "model",
                       "model_not_found")


def parse_completion(body, served: ServedModel, capacity: int | None = None
                     ) -> tuple[list[list[int]], int, SamplingParams, dict]:
    """(prompts, n, sampling settings, options) from a /v1/completions body, or ApiError.
    `capacity`: the most sequences (prompts x n) the server can ever hold at once (None: no cap)."""
    check_model(body, served)
    if "prompt" not in body:
        raise ApiError(400, "prompt is required", "prompt", "missing")
    for name, neutral in UNSUPPORTED.items():
        if name in body and not _neutral(body[name], neutral):
            raise _bad(f"{name} {show(body[name])} is not supported by this server (leave it out or at "
                       f"{neutral[0]!r})", name)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _bad(f"echo {show(echo)} must be true or false", "echo")
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    max_tokens = _number(body, "max_tokens", 16, 0 if echo else 1, None, integer=True)
    if max_tokens == 0 and not echo:
        raise _bad("max_tokens 0 must be >= 1 (0 only with echo: true, which scores the prompt)", "max_tokens")
    n = _number(body, "n", 1, 1, 16, integer=True)
    raw = body["prompt"]
    # prompt: a string, a list of token ids, or a list of either (one choice each)
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise _bad("prompt must be a string, a list of token ids, or a non-empty list of those", "prompt")
    if capacity is not None and len(raw) * n > capacity:
        raise ApiError(400, f"{len(raw)} prompt(s) x n {n} = {len(raw) * n} sequences, more than this server can "
                       f"ever hold at once ({capacity}: each replica's --slots + --max-waiting); send fewer "
                       "prompts or a smaller n", "n" if n > 1 else "prompt", "too_many_sequences")
    prompts = _prompts(raw, served, max_tokens)
    top_k = _number(body, "top_k", 0, -1, None, integer=True)  # -1 or 0: off; above the vocabulary: all
    seed = _number(body, "seed", None, -2**63, 2**64 - 1, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise _bad(f"stop has {len(stop)} strings; at most {MAX_STOP} are allowed", "stop")
    for i, s in enumerate(stop):
        if len(s) > MAX_STOP_CHARS:
            raise _bad(f"stop string {i} has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list):
        raise _bad("stop_token_ids must be a list of token ids", "stop_token_ids")
    stop_ids = _token_list(stop_ids, "stop_token_ids", served.vocab_size) if stop_ids else []
    options = {}
    for name in ("stream", "ignore_eos", "return_token_ids"):
        v = body.get(name, False)
        if not isinstance(v, bool):
            raise _bad(f"{name} {show(v)} must be true or false", name)
        options[name] = v
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise _bad("stream_options must be an object", "stream_options")
    options["include_usage"] = bool(so.get("include_usage", False))
    options["echo"], options["logprobs"] = bool(echo), logprobs
    options["prompt_texts"] = [p if isinstance(p, str) else None for p in raw]  # echo: the text as sent
    params = SamplingParams(
        logprobs=logprobs, prompt_logprobs=logprobs if echo else None,
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True), top_k=max(top_k, 0),
        seed=secrets.randbits(63) if seed is None else seed, stop=tuple(stop),
        stop_token_ids=tuple(dict.fromkeys(stop_ids + ([] if options["ignore_eos"] else list(served.tok.eos_ids)))),
        ignore_eos=options["ignore_eos"])
    return prompts, n, params, options


class _LongInt:
    """An integer literal too long for int() (more than sys.get_int_max_str_digits() digits)."""

    def __init__(self, digits: int):
        self.digits = digits


def _long_int(text: str):
    try:
        return int(text)
    except ValueError:
        return _LongInt(len(text.lstrip("-")))


def _find_long_int(body) -> tuple[str | None, int]:
    """(the top-level field holding a _LongInt, its digits), searched without recursion."""
    fields = body.items() if isinstance(body, dict) else [(None, body)]
    for name, value in fields:
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, _LongInt):
                return name, v.digits
            if isinstance(v, list):
                stack.extend(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
    return None, 0


def decode_completion(raw: bytes, served: ServedModel, capacity: int | None = None):
    """parse_completion of a raw body (see decode_body). Runs off the event loop."""
    return decode_body(raw, parse_completion, served, capacity)


def decode_body(raw: bytes, parse, *args):
    """parse(body, *args) of a raw JSON body; every malformed body (not JSON, nested too deeply, a number
    too large for its field or for Python) is an ApiError 400, never a 500."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _bad("the request body nests arrays or objects too deeply", None) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not JSON ({cut(str(e), 200)})", None) from None
    except ValueError:  # an integer of more digits than int() converts
        try:
            name, digits = _find_long_int(json.loads(raw, parse_int=_long_int))
        except (ValueError, RecursionError):
            name, digits = None, 0
        what = f"{name}: an integer of {digits} digits" if name else "an integer with too many digits"
        raise _bad(f"{what} is out of range", name) from None
    try:
        return parse(body, *args)
    except (RecursionError, OverflowError, ValueError) as e:
        raise _bad(f"the request could not be read: {type(e).__name__}: {cut(str(e))}", None) from None
