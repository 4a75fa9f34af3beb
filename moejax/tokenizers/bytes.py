"""A byte-level tokenizer: token id = UTF-8 byte value. Needs no files and no downloads."""

from __future__ import annotations

import codecs

from moejax.errors import UserError
from moejax.tokenizers.base import Detokenizer, Tokenizer


def encode(text: str, vocab_size: int) -> list[int]:
    if vocab_size < 256:
        raise UserError(f"text prompts need a vocabulary of at least 256 byte tokens; this config has "
                        f"{vocab_size}: use --prompt-ids")
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    """UTF-8 text of the byte ids; an id outside the byte range shows as `<id>` (a model with a larger
    vocabulary, e.g. random weights, emits them) instead of vanishing."""
    out, run = [], []
    for i in ids:
        if 0 <= i < 256:
            run.append(i)
            continue
        out.append(bytes(run).decode("utf-8", errors="replace"))
        out.append(f"<{i}>")
        run = []
    out.append(bytes(run).decode("utf-8", errors="replace"))
    return "".join(out)


class ByteDetokenizer(Detokenizer):
    """UTF-8's incremental decoder: a character shows once its last byte arrives."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        if 0 <= token_id < 256:
            return self.decoder.decode(bytes([token_id]))
        return self.decoder.decode(b"", final=True) + f"<{token_id}>"

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class ByteTokenizer(Tokenizer):
    kind = "bytes"
    chat_template = None
    source = None

    def __init__(self, model_vocab: int, eos_id: int | None = None, bos_id: int | None = None):
        self.model_vocab = model_vocab
        self.vocab_size = 256
        self.eos_ids = () if eos_id is None else (eos_id,)
        self.bos_id = bos_id
        self.special = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return encode(text, self.model_vocab)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return decode(ids)

    def token_text(self, token_id: int) -> str:
        return decode([token_id])

    def token_str(self, token_id: int) -> str:
        return decode([token_id])

    def detokenizer(self, prompt: list[int], skip_special_tokens: bool = True) -> Detokenizer:
        return ByteDetokenizer()
