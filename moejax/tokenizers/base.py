"""What every tokenizer offers the commands and the server (bytes.py, hf.py): text <-> ids, one
token's text (logprobs' keys), incremental detokenization for streaming, its stop ids and special
tokens, and its chat template (chat.py renders it)."""

from __future__ import annotations

import abc


class Detokenizer(abc.ABC):
    """Text of a growing id sequence, piece by piece: `step(id)` returns the text that is now final
    (never half a UTF-8 character), `flush()` what is left once no more ids come."""

    @abc.abstractmethod
    def step(self, token_id: int) -> str: ...

    def flush(self) -> str:
        return ""


class Tokenizer(abc.ABC):
    kind: str  # "bytes" or "hf"
    vocab_size: int  # ids the tokenizer can produce (the model's vocabulary may be larger)
    eos_ids: tuple[int, ...]  # every id that ends a sequence (generation_config.json's list)
    bos_id: int | None
    special: dict  # bos_token, eos_token, pad_token, unk_token -> text (what chat templates see)
    chat_template: str | None
    source: str | None  # the directory it was read from

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abc.abstractmethod
    def token_text(self, token_id: int) -> str:
        """One token's text as a logprobs entry names it (decode of that id alone)."""

    @abc.abstractmethod
    def token_str(self, token_id: int) -> str:
        """The vocabulary's string for an id (convert_ids_to_tokens; /tokenize's token_strs)."""

    @abc.abstractmethod
    def detokenizer(self, prompt: list[int], skip_special_tokens: bool = True) -> Detokenizer:
        """Incremental text of what follows `prompt`."""

    def info(self) -> dict:
        """/tokenizer_info: the tokenizer's settings as tokenizer_config.json holds them."""
        return {"tokenizer_class": self.kind, **self.special, "chat_template": self.chat_template}
