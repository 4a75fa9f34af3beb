"""The chat and tokenizer endpoints' wire protocol (vLLM's shapes, docs/SERVING.md): a
/v1/chat/completions body becomes the prompt ids of its rendered chat template plus a completions
body that `protocol.parse_completion` checks like any other (sampling, n, stop, context, capacity);
/tokenize, /detokenize and /tokenizer_info answer from the served tokenizer. No HTTP here."""

from __future__ import annotations

from moejax.serving.protocol import (ApiError, ServedModel, _bad, _number, _token_list, check_model, decode_body,
                                     encode_text, parse_completion, show)
from moejax.tokenizers.chat import ChatTemplateError, content_format, render

# fields a chat body shares with a completions body (what parse_completion reads besides prompt,
# max_tokens and logprobs)
SHARED = ("model", "n", "seed", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "stream",
          "stream_options", "ignore_eos", "return_token_ids", "presence_penalty", "frequency_penalty", "min_p",
          "logit_bias")
MAX_MESSAGES = 4096


def _content(m: dict, i: int, parts: bool):
    """A message's content: a string, null, or a list of text parts: given to the template as a list
    when it loops over content (`parts`), else joined with newlines (as vLLM does)."""
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c
    if not isinstance(c, list):
        raise _bad(f"messages[{i}].content must be a string, null or a list of text parts, not {show(c)}",
                   "messages")
    texts = []
    for part in c:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            what = f"a {kind!r} part" if isinstance(kind, str) else show(part)
            raise _bad(f"messages[{i}].content: {what} is not supported; this server takes text parts "
                       '({"type": "text", "text": ...})', "messages")
        texts.append(part["text"])
    return [{"type": "text", "text": t} for t in texts] if parts else "\n".join(texts)


def chat_messages(body: dict, parts: bool = False) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages",
                       "missing" if msgs is None else "invalid_value")
    if len(msgs) > MAX_MESSAGES:
        raise _bad(f"messages has {len(msgs)} entries; at most {MAX_MESSAGES} are allowed", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] {show(m)} must be an object with a string role", "messages")
        # name, tool_call_id and the like pass through to the template as transformers passes them
        keep = {k: v for k, v in m.items() if isinstance(v, (str, int, float, bool)) or v is None}
        out.append({**keep, "content": _content(m, i, parts)})
    return out


def chat_prompt(body: dict, served: ServedModel, max_tokens_hint: int = 1) -> list[int]:
    """The ids of the rendered chat: the template's text tokenized without added special tokens
    (unless add_special_tokens is true), as vLLM does."""
    tok = served.tok
    if tok.chat_template is None:
        raise ApiError(400, f"model {served.id!r} has no chat template (its tokenizer_config.json gives none): "
                       "use /v1/completions, or start the server with --chat-template FILE", "messages",
                       "no_chat_template")
    if body.get("chat_template") is not None:
        raise _bad("chat_template in a request is not accepted; the server's --chat-template sets it",
                   "chat_template")
    for name in ("add_generation_prompt", "continue_final_message", "add_special_tokens"):
        if name in body and not isinstance(body[name], bool):
            raise _bad(f"{name} {show(body[name])} must be true or false", name)
    if body.get("continue_final_message"):
        raise _bad("continue_final_message is not supported by this server", "continue_final_message")
    if body.get("tools"):
        raise _bad("tools are not supported by this server", "tools")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise _bad(f"response_format {show(body['response_format'])} is not supported (only text)", "response_format")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    messages = chat_messages(body, content_format(tok.chat_template) == "openai")
    try:
        text = render(tok.chat_template, messages, tok.special, body.get("add_generation_prompt", True), **kwargs)
    except ChatTemplateError as e:
        raise _bad(str(e), "messages") from None
    return encode_text(text, served, max_tokens_hint, "messages", body.get("add_special_tokens", False))


def parse_chat(body, served: ServedModel, capacity: int | None = None):
    """(prompts, n, sampling settings, options) from a /v1/chat/completions body: options gain
    `logprobs` (top_logprobs, or None) as the completions options name it."""
    check_model(body, served)
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = _number({field: limit}, field, None, 1, None, integer=True)
    ids = chat_prompt(body, served, requested or 1)
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise _bad(f"logprobs {show(logprobs)} must be true or false", "logprobs")
    top = _number(body, "top_logprobs", None, 0, 20, integer=True)
    if top is not None and not logprobs:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    # the default is the rest of the context, as vLLM's
    max_tokens = requested if requested is not None else served.max_len - len(ids)
    completion = {k: body[k] for k in SHARED if k in body}
    completion.update(prompt=ids, max_tokens=max(max_tokens, 1))
    if logprobs:
        completion["logprobs"] = top or 0
    prompts, n, params, options = parse_completion(completion, served, capacity)
    options["chat_logprobs"] = logprobs
    return prompts, n, params, options


def decode_chat(raw: bytes, served: ServedModel, capacity: int | None = None):
    """parse_chat of a raw body (protocol.decode_body). Runs off the event loop."""
    return decode_body(raw, parse_chat, served, capacity)


def parse_tokenize(body, served: ServedModel) -> dict:
    """/tokenize: {prompt, add_special_tokens=true} or the chat form {messages, add_generation_prompt,
    add_special_tokens=false}; returns vLLM's {count, max_model_len, tokens, token_strs}."""
    check_model(body, served)
    tok = served.tok
    if "messages" in body:
        ids = chat_prompt(body, served, 0)
    elif isinstance(body.get("prompt"), str):
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise _bad(f"add_special_tokens {show(special)} must be true or false", "add_special_tokens")
        ids = encode_text(body["prompt"], served, 0, "prompt", special)
    else:
        raise ApiError(400, "give prompt (a string) or messages", "prompt", "missing")
    strs = body.get("return_token_strs", False)
    if not isinstance(strs, bool):
        raise _bad(f"return_token_strs {show(strs)} must be true or false", "return_token_strs")
    return {"count": len(ids), "max_model_len": served.max_len, "tokens": ids,
            "token_strs": [tok.token_str(i) for i in ids] if strs else None}


def parse_detokenize(body, served: ServedModel) -> dict:
    check_model(body, served)
    if "tokens" not in body:
        raise ApiError(400, "tokens is required", "tokens", "missing")
    if not isinstance(body["tokens"], list):
        raise _bad("tokens must be a list of token ids", "tokens")
    ids = _token_list(body["tokens"], "tokens", served.vocab_size) if body["tokens"] else []
    return {"prompt": served.tok.decode(ids)}
