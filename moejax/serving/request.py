"""A request as the engine sees it: prompt ids, sampling settings, the text generated so far with
stop strings applied, and its timestamps. No JAX here."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from typing import Callable

import numpy as np

from moejax.tokenizers.base import Detokenizer
from moejax.tokenizers.bytes import ByteDetokenizer

_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, as the OpenAI completions API names them (validated by
    the API layer). temperature 0 is greedy; top_k 0 keeps every token."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # each generated token's logprob and this many top ones (None: off)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)


MAX_LOGPROBS = 20  # the most top logprobs a request may ask for (OpenAI's cap): the engine's static K


@dataclasses.dataclass
class Logprobs:
    """Rows of log-probabilities (NumPy): row i is token_ids[i]'s float32 logprob under the model's
    distribution at its position (log-softmax of the logits, before temperature, top-k or top-p)
    and that distribution's best tokens, best first (top_ids, top_values: [N, k])."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_values: np.ndarray

    @staticmethod
    def concat(parts: list[Logprobs]) -> Logprobs:
        return Logprobs(*(np.concatenate([getattr(p, f.name) for p in parts])
                          for f in dataclasses.fields(Logprobs)))


@dataclasses.dataclass
class Event:
    """What one engine step produced for one request: new token ids, the text they complete (stop
    strings withheld until they are ruled out) and, on the last event, the finish reason;
    `logprobs`: the rows of token_ids (when asked for); `prompt_logprobs`: on a request's first
    event, the rows of its prompt tokens 1, 2, ... (when asked for)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None
    logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None


class StopMatcher:
    """An Aho-Corasick automaton over stop strings: `step` advances a state by one character in
    amortised O(1), whatever the number and length of the stop strings. A state is the longest end
    of the text that begins some stop string; `depth[state]` is its length (the text to hold back)
    and `out[state]` the length of the longest stop string ending there (0: none)."""

    def __init__(self, stop: tuple[str, ...]):
        goto: list[dict[str, int]] = [{}]
        depth, out = [0], [0]
        for s in stop:
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto.append({})
                    depth.append(depth[node] + 1)
                    out.append(0)
                    goto[node][ch] = nxt
                node = nxt
            out[node] = len(s)
        fail = [0] * len(goto)
        queue = collections.deque(goto[0].values())
        while queue:  # breadth first: a node's failure link is shallower, so already final
            u = queue.popleft()
            for ch, v in goto[u].items():
                queue.append(v)
                f = fail[u]
                while f and ch not in goto[f]:
                    f = fail[f]
                fail[v] = goto[f].get(ch, 0)
                out[v] = out[v] or out[fail[v]]
        self.goto, self.fail, self.depth, self.out = goto, fail, depth, out

    def step(self, state: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)


@functools.lru_cache(maxsize=64)
def stop_matcher(stop: tuple[str, ...]) -> StopMatcher:
    """One automaton per distinct stop list (the n choices of a request share it)."""
    return StopMatcher(stop)


class StopText:
    """Incremental text of generated tokens (a tokenizer's Detokenizer: never half a character)
    with stop strings: `add` returns the text that is now safe to show, holding back the longest
    tail that begins a stop string; `hit` is set when a stop string appears, and the text ends
    before it (OpenAI's convention). Each character costs
    amortised O(1) (StopMatcher), so a request's stop strings cannot slow the engine's step down."""

    def __init__(self, stop: tuple[str, ...], detok: Detokenizer | None = None):
        self.stop = tuple(s for s in stop if s)
        self.matcher = stop_matcher(self.stop) if self.stop else None
        self.state = 0
        self.detok = detok or ByteDetokenizer()
        self.text = ""  # everything decoded so far (up to a stop string)
        self.shown = 0  # characters already returned
        self.hit = False

    def add(self, token_id: int) -> str:
        if self.hit:  # the text ended at a stop string
            return ""
        return self._extend(self.detok.step(token_id), False)

    def flush(self) -> str:
        """The rest of the text, once no more tokens come."""
        if self.hit:
            return ""
        return self._extend(self.detok.flush(), final=True)

    def _extend(self, piece: str, final: bool) -> str:
        base = len(self.text)
        self.text += piece
        m = self.matcher
        if m is not None and piece:
            state, cut = self.state, None
            for i, ch in enumerate(piece):
                state = m.step(state, ch)
                if m.out[state]:  # a stop string ends here: the earliest start in this piece wins
                    at = base + i + 1 - m.out[state]
                    cut = at if cut is None else min(cut, at)
            self.state = state
            if cut is not None:
                self.text, self.hit, final = self.text[:cut], True, True
        hold = 0 if final or m is None else m.depth[self.state]
        end = len(self.text) if final else max(self.shown, len(self.text) - hold)
        out, self.shown = self.text[self.shown:end], end
        return out


class Request:
    """One sequence: created by the API layer, owned by one engine from `submit` to its last event.
    `emit` is called on the engine's thread with each Event."""

    def __init__(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None],
                 detok: Detokenizer | None = None):
        self.id = next(_ids)
        self.prompt, self.params, self.emit = list(prompt), params, emit
        self.generated: list[int] = []
        self.text = StopText(params.stop, detok)
        self.stop_ids = frozenset(params.stop_token_ids)  # a set: membership per token is O(1)
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.blocks: list[int] = []  # its prompt's block names, for prefix caching (serving/prefix.py)
        self.prompt_rows: list[Logprobs] = []  # prompt logprobs of the chunks prefilled so far
        self.slot: int | None = None
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.scheduled: float | None = None  # when a slot was assigned
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.previous_token: float | None = None  # the token before the last (inter-token latency)

    @property
    def decoding(self) -> bool:
        return self.slot is not None and self.prefilled == len(self.prompt) and self.finish_reason is None

    def add_prompt_rows(self, targets, logprobs, top_ids, top_values):
        """Prompt logprobs of the chunk just prefilled: rows of its prompt tokens after the first."""
        if len(targets):
            k = self.params.prompt_logprobs
            self.prompt_rows.append(Logprobs(np.asarray(targets), logprobs, top_ids[:, :k], top_values[:, :k]))

    def take_prompt_logprobs(self) -> Logprobs | None:
        """The prompt's rows, once (for the first event), when the request asked for them."""
        if self.params.prompt_logprobs is None or self.prompt_rows is None:
            return None
        rows, self.prompt_rows = self.prompt_rows, None
        k = self.params.prompt_logprobs
        empty = Logprobs(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros((0, k), np.int32),
                         np.zeros((0, k), np.float32))
        return Logprobs.concat([empty] + rows)

    def score_only(self) -> Event:
        """The end of a request that scores its prompt only (max_tokens 0): no token, finish `length`."""
        self.finish_reason = "length"
        return Event([], "", "length", prompt_logprobs=self.take_prompt_logprobs())

    def accept(self, token: int, eos_id: int | None, row: tuple | None = None) -> Event:
        """Take one sampled token; returns the event to emit (finish_reason set when it ends).
        `row`: the token's (logprob, top ids, top values) from the step, when it computed them."""
        now = time.perf_counter()
        self.first_token = self.first_token or now
        self.previous_token, self.last_token = self.last_token, now
        self.generated.append(token)
        p = self.params
        extra = {}
        if p.logprobs is not None and row is not None:
            lp, ids, values = row
            extra["logprobs"] = Logprobs(np.array([token]), np.array([lp], np.float32), np.asarray(ids)[None, :p.logprobs],
                                         np.asarray(values)[None, :p.logprobs])
        if len(self.generated) == 1:
            extra["prompt_logprobs"] = self.take_prompt_logprobs()
        if token in self.stop_ids or (token == eos_id and not p.ignore_eos):
            self.finish_reason = "stop"
            return Event([token], self.text.flush(), "stop", **extra)
        text = self.text.add(token)
        if self.text.hit:
            self.finish_reason = "stop"
        elif len(self.generated) >= p.max_tokens:
            self.finish_reason = "length"
            text += self.text.flush()
        return Event([token], text, self.finish_reason, **extra)
