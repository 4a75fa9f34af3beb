"""transformers' own model of a config's family (its `architectures[0]`) as a benchmark peer: same
config, same weights, same dtype.

Needs the optional extra `pip install -e '.[hf]'` (torch==2.13.0 takes the CPU wheel). Used by
`scripts/bench.py --compare-hf`; nothing else imports torch.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

from moejax.config.model import ModelConfig
from moejax.errors import UserError
from moejax.checkpoint.hf import write_hf


def load_torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise UserError("--compare-hf needs torch and transformers: pip install -e '.[hf]' "
                        "(torch==2.13.0 is the CPU build)") from None
    return torch, transformers


class HfPeer:
    """transformers' model of the family, holding moejax's stacked host parameters, with timed prefill
    and decode."""

    def __init__(self, cfg: ModelConfig, params: dict, dtype: str):
        torch, transformers = load_torch()
        self.torch = torch
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        # through a Hugging Face checkpoint, so that transformers does its own weight conversion
        # (transformers 5 fuses the experts into gate_up_proj / down_proj tensors)
        with tempfile.TemporaryDirectory(prefix="moejax-peer-") as tmp:
            write_hf(tmp, dataclasses.replace(cfg, param_dtype=dtype), params)
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=tdtype)
        self.model = model.eval()

    def prefill(self, tokens_BT: np.ndarray):
        """Prompt forward keeping only the last position's logits (as moejax's prefill)."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(tokens_BT.astype(np.int64)), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.cache

    def decode(self, logits_BV, cache, steps: int):
        """`steps` greedy steps from the prefill's logits, with the KV cache."""
        torch = self.torch
        with torch.inference_mode():
            for _ in range(steps):
                nxt = logits_BV.argmax(-1, keepdim=True)
                out = self.model(nxt, cache=cache, use_cache=True, logits_to_keep=1)
                logits_BV, cache = out.logits[:, -1].float(), out.cache
        return logits_BV
