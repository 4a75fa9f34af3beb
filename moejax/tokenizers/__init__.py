"""Tokenizers: text <-> token ids, behind one interface (base.py). `bytes.py`: token id = UTF-8 byte
(needs no files); `hf.py`: a Hugging Face tokenizer directory (tokenizer.json and its companions);
`chat.py`: chat templates. A checkpoint carries its tokenizer's files in `<ckpt>/tokenizer/`
(import_hf copies them in, export_hf writes them back, reshard and quantize carry them along)."""

from __future__ import annotations

import os
import shutil

from moejax.errors import UserError
from moejax.tokenizers.base import Detokenizer, Tokenizer
from moejax.tokenizers.bytes import ByteTokenizer
from moejax.tokenizers.hf import FILES

__all__ = ["Detokenizer", "Tokenizer", "ByteTokenizer", "load_tokenizer", "tokenizer_dir", "copy_tokenizer_files",
           "CKPT_SUBDIR"]
CKPT_SUBDIR = "tokenizer"


def tokenizer_dir(ckpt: str | None) -> str | None:
    """A checkpoint's tokenizer directory, or None (a byte-level model, or no checkpoint)."""
    if not ckpt:
        return None
    d = os.path.join(ckpt, CKPT_SUBDIR)
    return d if os.path.isfile(os.path.join(d, "tokenizer.json")) else None


def load_tokenizer(directory: str | None, cfg, chat_template: str | None = None) -> Tokenizer:
    """The HF tokenizer in `directory`, else the byte tokenizer for `cfg`'s vocabulary. A tokenizer
    with ids the model does not have is refused; `chat_template` (text) overrides the tokenizer's."""
    if directory is None:
        tok = ByteTokenizer(cfg.vocab_size, cfg.eos_token_id, cfg.bos_token_id)
    else:
        if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
            raise UserError(f"tokenizer directory {directory!r} holds no tokenizer.json")
        from moejax.tokenizers.hf import HFTokenizer

        tok = HFTokenizer(directory)
        if tok.vocab_size > cfg.vocab_size:
            raise UserError(f"tokenizer {directory!r} has {tok.vocab_size} ids, more than the model's vocabulary of "
                            f"{cfg.vocab_size}: give the tokenizer the model was trained with")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def copy_tokenizer_files(src: str | None, dst: str) -> list[str]:
    """Copy the tokenizer files found in `src` into `dst` (created); returns the names copied."""
    if not src or not os.path.isfile(os.path.join(src, "tokenizer.json")):
        return []
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied
