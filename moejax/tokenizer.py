"""A byte-level tokenizer: token id = UTF-8 byte value. Needs no files and no downloads."""

from __future__ import annotations

from moejax.errors import UserError


def encode(text: str, vocab_size: int) -> list[int]:
    if vocab_size < 256:
        raise UserError(f"text prompts need a vocabulary of at least 256 byte tokens; this config has "
                        f"{vocab_size}: use --prompt-ids")
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
