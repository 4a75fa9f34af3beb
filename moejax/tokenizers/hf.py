"""A Hugging Face tokenizer directory, read with the `tokenizers` library as transformers reads it:
`tokenizer.json` (the pipeline: normalizer, pre-tokenizer, model, post-processor adding BOS, decoder),
`tokenizer_config.json` (special-token names, the chat template, clean_up_tokenization_spaces),
`chat_template.jinja` (the template, when kept apart) and `generation_config.json` (every
`eos_token_id` stops a sequence)."""

from __future__ import annotations

import json
import os

from moejax.errors import UserError
from moejax.tokenizers.base import Detokenizer, Tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
         "special_tokens_map.json")
SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")
PRIME = 6  # prompt ids a stream starts from (their text is not emitted; vLLM primes with a few)


def _json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({str(e)[:120]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, not {type(value).__name__}")
    return value


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _ids(v) -> list[int]:
    items = v if isinstance(v, list) else [v]
    return [i for i in items if isinstance(i, int) and not isinstance(i, bool)]


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (applied when tokenizer_config.json asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class HFDetokenizer(Detokenizer):
    """`tokenizers`' DecodeStream, primed with the end of the prompt (so a generated word's leading
    space shows as it would after the prompt); on an invalid prefix it restarts from the ids so far.
    `flush` returns what decode(all ids) has beyond the text already given."""

    def __init__(self, tok: "HFTokenizer", prompt: list[int], skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self.tok, self.skip = tok, skip_special_tokens
        prime = list(prompt[-PRIME:])
        while prime and "\ufffd" in tok.decode(prime, skip_special_tokens):
            prime = prime[1:]  # start at a whole character
        self.prime, self.ids, self.emitted = prime, [], ""
        self.new_stream = DecodeStream  # imported once, not on every token
        self.stream = DecodeStream(ids=prime, skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        try:
            piece = self.stream.step(self.tok.backend, token_id)
        except Exception:  # noqa: BLE001  ("Invalid prefix encountered": restart from what we have)
            self.stream = self.new_stream(ids=self.prime + self.ids, skip_special_tokens=self.skip)
            piece = None
        piece = piece or ""
        self.emitted += piece
        return piece

    def flush(self) -> str:
        before = self.tok.decode(self.prime, self.skip)
        full = self.tok.decode(self.prime + self.ids, self.skip)
        done = before + self.emitted
        rest = full[len(done):] if full.startswith(done) else ""
        self.emitted += rest
        return rest


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as Backend

        path = os.path.join(directory, "tokenizer.json")
        try:
            self.backend = Backend.from_file(path)
        except Exception as e:  # noqa: BLE001  (the library raises a bare Exception for a bad file)
            raise UserError(f"{path}: not a tokenizer the `tokenizers` library reads ({str(e)[:160]})") from None
        self.source = os.path.abspath(directory)
        self.config = _json(os.path.join(directory, "tokenizer_config.json"))
        special_map = _json(os.path.join(directory, "special_tokens_map.json"))
        gen = _json(os.path.join(directory, "generation_config.json"))
        self.special = {k: t for k in SPECIAL if (t := _token_text(self.config.get(k, special_map.get(k))))}
        template = os.path.join(directory, "chat_template.jinja")
        if os.path.exists(template):
            with open(template, encoding="utf-8") as f:
                self.chat_template = f.read()
        else:
            t = self.config.get("chat_template")
            self.chat_template = t if isinstance(t, str) else None  # a list of named templates: not read
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        by_name = {k: self.backend.token_to_id(t) for k, t in self.special.items()}
        eos = _ids(gen.get("eos_token_id")) or ([by_name["eos_token"]] if by_name.get("eos_token") is not None else [])
        self.eos_ids = tuple(dict.fromkeys(eos))
        bos = _ids(gen.get("bos_token_id"))
        self.bos_id = bos[0] if bos else by_name.get("bos_token")
        self.clean_up = self.config.get("clean_up_tokenization_spaces") is True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up else text

    def token_text(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        s = self.backend.id_to_token(token_id)
        return s if s is not None else ""

    def detokenizer(self, prompt: list[int], skip_special_tokens: bool = True) -> Detokenizer:
        return HFDetokenizer(self, prompt, skip_special_tokens)

    def info(self) -> dict:
        drop = ("vocab_file", "merges_file", "tokenizer_file")
        out = {k: (_token_text(v) if k in SPECIAL else v) for k, v in self.config.items() if k not in drop}
        out.update(self.special)
        out.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out
