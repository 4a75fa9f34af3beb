"""How a generation request's engine events become its response (vLLM's shapes, docs/SERVING.md):
/v1/completions (`text_completion` choices with `text` and `logprobs` {tokens, token_logprobs,
top_logprobs, text_offset}, echo) and /v1/chat/completions (`chat.completion` with a `message`, or
`chat.completion.chunk` deltas: the role first, one delta per token, and `logprobs.content` entries).
A token's text always comes from the served tokenizer (`token_text`). No HTTP and no JAX here."""

from __future__ import annotations

import secrets
import time

from moejax.serving.request import Event, Logprobs
from moejax.tokenizers import Tokenizer

LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for -inf


def _floor(v) -> float:
    return max(float(v), LOGPROB_FLOOR)


def _ranked(rows: Logprobs, i: int) -> list[tuple[int, float]]:
    """Row i's (id, logprob) list as vLLM orders it: the token itself, then its row's best tokens
    without it (deduplicated by id)."""
    tid = int(rows.token_ids[i])
    out = [(tid, _floor(rows.logprobs[i]))]
    out += [(t, _floor(v)) for t, v in zip(rows.top_ids[i].tolist(), rows.top_values[i].tolist()) if t != tid]
    return out


def logprobs_json(rows: Logprobs | None, tok: Tokenizer, offset: int = 0, first: int | None = None
                  ) -> tuple[dict, int]:
    """OpenAI's completions `logprobs` {tokens, token_logprobs, top_logprobs, text_offset} for `rows`,
    and the text offset after them. `first`: a prompt's first token, which has no row (null logprob
    and top), placed first. Each top dict holds the token itself first, then its row's top tokens,
    keyed by their text (tokens of the same text collapse into one key, the later value winning, as
    vLLM's dict does); values are floored at LOGPROB_FLOOR. text_offset counts the tokens' text from
    `offset` (a stream continues from the previous chunk's)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(token_id, logprob, top):
        nonlocal offset
        text = tok.token_text(token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)

    if first is not None:
        add(first, None, None)
    if rows is not None:
        for i in range(len(rows.token_ids)):
            ranked = _ranked(rows, i)
            add(ranked[0][0], ranked[0][1], {tok.token_text(t): v for t, v in ranked})
    return out, offset


def chat_logprobs_json(rows: Logprobs | None, tok: Tokenizer, top: int) -> dict:
    """Chat's `logprobs` {"content": [{token, logprob, bytes, top_logprobs}]}: `top_logprobs` holds
    the first `top` entries of the token's ranked list (the token itself first, as vLLM's)."""
    def entry(t, v):
        text = tok.token_text(t)
        return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

    content = []
    for i in range(0 if rows is None else len(rows.token_ids)):
        ranked = _ranked(rows, i)
        content.append({**entry(*ranked[0]), "top_logprobs": [entry(t, v) for t, v in ranked[:top]]})
    return {"content": content}


def merge_logprobs(into: dict | None, more: dict | None) -> dict | None:
    """Concatenate two `logprobs` objects' lists (a choice's rows, event by event)."""
    if more is None:
        return into
    if into is None:
        return {k: list(v) for k, v in more.items()}
    for k, v in more.items():
        into[k] += v
    return into


class CompletionFormat:
    """/v1/completions: `text` (the prompt first with echo) and `logprobs` per choice."""

    prefix, obj, chunk_obj = "cmpl", "text_completion", "text_completion"

    def __init__(self, served, opt: dict, prompts: list[list[int]], n: int):
        self.tok, self.opt, self.n, self.prompts = served.tok, opt, n, prompts
        choices = len(prompts) * n
        self.head = {"id": f"{self.prefix}-{secrets.token_hex(12)}", "object": self.obj,
                     "created": int(time.time()), "model": served.id}
        self.started, self.offsets = [False] * choices, [0] * choices
        self.texts, self.ids, self.reasons = [""] * choices, [[] for _ in range(choices)], [None] * choices
        self.lps = [None] * choices

    def piece(self, c: int, ev: Event) -> tuple[str, dict | None]:
        """(text, logprobs) of choice c's event: its first carries the prompt with echo (text, then
        the prompt's rows ahead of the token's); text_offset continues across a choice's events."""
        opt, text, lp = self.opt, ev.text, None
        first, self.started[c] = not self.started[c], True
        if first and opt["echo"]:
            prompt = self.prompts[c // self.n]
            text = (opt["prompt_texts"][c // self.n] or self.tok.decode(prompt, skip_special_tokens=False)) + text
            if opt["logprobs"] is not None:
                lp, self.offsets[c] = logprobs_json(ev.prompt_logprobs, self.tok, self.offsets[c], first=prompt[0])
        if opt["logprobs"] is not None:
            more, self.offsets[c] = logprobs_json(ev.logprobs, self.tok, self.offsets[c])
            lp = merge_logprobs(lp, more)
        return text, lp

    def choice(self, c: int, text: str, ids: list[int], reason, lp) -> dict:
        out = {"index": c, "text": text, "logprobs": lp, "finish_reason": reason}
        if self.opt["return_token_ids"]:
            out["token_ids"] = ids
        return out

    def chunks(self, c: int, ev: Event) -> list[dict]:
        """The stream chunks of one event."""
        text, lp = self.piece(c, ev)
        return [{**self.head, "object": self.chunk_obj,
                 "choices": [self.choice(c, text, ev.token_ids, ev.finish_reason, lp)]}]

    def add(self, c: int, ev: Event) -> None:
        """One event into the whole response."""
        text, lp = self.piece(c, ev)
        self.texts[c] += text
        self.ids[c] += ev.token_ids
        self.reasons[c] = ev.finish_reason
        self.lps[c] = merge_logprobs(self.lps[c], lp)

    def response(self, usage: dict) -> dict:
        return {**self.head, "choices": [self.choice(c, self.texts[c], self.ids[c], self.reasons[c], self.lps[c])
                                         for c in range(len(self.texts))], "usage": usage}


class ChatFormat(CompletionFormat):
    """/v1/chat/completions: an assistant `message` per choice, or deltas (the role first, with the
    first token, as vLLM sends it), and `logprobs.content`."""

    prefix, obj, chunk_obj = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def piece(self, c: int, ev: Event) -> tuple[str, dict | None]:
        lp = None
        if self.opt["logprobs"] is not None:
            lp = chat_logprobs_json(ev.logprobs, self.tok, self.opt["logprobs"])
        return ev.text, lp

    def chunks(self, c: int, ev: Event) -> list[dict]:
        text, lp = self.piece(c, ev)
        out = []
        if not self.started[c]:
            self.started[c] = True
            out.append({"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None})
        delta = {"index": c, "delta": {"content": text}, "logprobs": lp, "finish_reason": ev.finish_reason}
        if self.opt["return_token_ids"]:
            delta["token_ids"] = ev.token_ids
        out.append(delta)
        return [{**self.head, "object": self.chunk_obj, "choices": [x]} for x in out]

    def choice(self, c: int, text: str, ids: list[int], reason, lp) -> dict:
        out = {"index": c, "message": {"role": "assistant", "content": text}, "logprobs": lp,
               "finish_reason": reason}
        if self.opt["return_token_ids"]:
            out["token_ids"] = ids
        return out
