"""Bytes each kind of collective moves, read from compiled HLO text (what bench.py counts as calls).

A collective's bytes are its result buffer per device, tuple elements summed: an all-to-all of an
[E, C, D] buffer over 4 devices shows as a tuple of four [E/4, C, D] pieces. Synchronous forms only
(XLA:CPU's); GPU HLO splits some collectives into -start/-done pairs, which this does not read.
"""

from __future__ import annotations

import re

from moejax.planner.comms import KINDS

_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_OP = re.compile(r"=\s+(.+?)\s+(" + "|".join(KINDS) + r")\(")
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEM_BYTES[dtype]
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{kind: sum of result bytes over its call sites} for every collective kind."""
    got = {k: 0 for k in KINDS}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m:
            got[m.group(2)] += shape_bytes(m.group(1))
    return got
