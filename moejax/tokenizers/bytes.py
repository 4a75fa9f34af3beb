"""A byte-level tokenizer: token id = UTF-8 byte value. Needs no files and no downloads."""

from __future__ import annotations

from moejax.errors import UserError


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
