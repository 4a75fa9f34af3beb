"""Text data for training and evaluation: a file's bytes (the byte tokenizer: token id = byte) or its
text encoded by a tokenizer (`read_tokens`).

The first 90% of the file trains, the last 10% validates (nanoGPT's shakespeare_char split). The
training batch of step s is a function of (seed, s) alone, so a resumed run draws exactly the
batches an unbroken one would: the data generator's state is the step number.
"""

from __future__ import annotations

import os

import numpy as np

from moejax.errors import UserError

TRAIN_FRACTION = 0.9
# the corpus that ships with the project (public domain)
SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data",
                           "tinyshakespeare.txt")
SPLITS = ("train", "val", "all")


def read_bytes(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
    except FileNotFoundError:
        raise UserError(f"data file {path!r}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"data file {path!r} is a directory; expected a text file") from None
    except OSError as e:
        raise UserError(f"data file {path!r}: cannot read ({e.strerror})") from None
    if data.size == 0:
        raise UserError(f"data file {path!r} is empty")
    return data


def read_tokens(path: str, tok) -> np.ndarray:
    """The file's token ids: its bytes for the byte tokenizer, else its UTF-8 text encoded whole with
    `tok` (no special tokens added), as int32."""
    raw = read_bytes(path)
    if tok.kind == "bytes":
        return raw
    try:
        text = raw.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path!r} is not UTF-8 text (byte {e.start}): a tokenizer reads text") from None
    return np.asarray(tok.encode(text, add_special_tokens=False), np.int32)


def split(data: np.ndarray, which: str) -> np.ndarray:
    if which not in SPLITS:
        raise UserError(f"split {which!r}; valid: {', '.join(SPLITS)}")
    cut = int(len(data) * TRAIN_FRACTION)
    return {"train": data[:cut], "val": data[cut:], "all": data}[which]


def check_windows(data: np.ndarray, seq_len: int, what: str) -> None:
    if len(data) < seq_len:
        raise UserError(f"{what} holds {len(data)} bytes, fewer than one window of --seq-len {seq_len}")


def random_windows(data: np.ndarray, batch: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """[batch, seq_len] int32 windows at uniform random offsets, drawn from (seed, step)."""
    starts = np.random.default_rng([seed, step]).integers(0, len(data) - seq_len + 1, size=batch)
    return data[starts[:, None] + np.arange(seq_len)].astype(np.int32)


def spaced_windows(data: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    """`count` windows at evenly spaced offsets from the start to the end (a fixed evaluation set)."""
    starts = np.linspace(0, len(data) - seq_len, count).astype(np.int64)
    return data[starts[:, None] + np.arange(seq_len)].astype(np.int32)


def consecutive_windows(data: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows from offset 0; a partial last window is dropped."""
    n = len(data) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return data[: n * seq_len].reshape(n, seq_len).astype(np.int32)
