"""transformers' own continuous batching as a serving peer: same Mixtral weights, same dtype.

Drives a `MixtralForCausalLM` the way `transformers serve --continuous-batching` does (cli/serving/
utils.py, `CBGenerateManager`), minus HTTP and text decoding:

    manager = model.init_continuous_batching(generation_config=..., continuous_batching_config=...)
    manager.start()                                   # the generation loop, in a background thread
    manager.register_result_handler(rid, callback)    # on the running asyncio loop
    manager.add_request(ids, request_id=rid, max_new_tokens=n, streaming=True, eos_token_id=-1)
    ...                                               # callback gets a GenerationOutput per new token
    manager.stop(block=True); manager.destroy()

Greedy (`do_sample=False`), EOS off (`eos_token_id=-1`: a request's EOS set ignores negative ids),
so every request emits exactly its `max_new_tokens`. Time to first token and the gaps between
tokens are taken on the client's event loop when each streamed output arrives, from just before
`add_request`, with moejax/bench/loadgen.py's definitions (vLLM's: TTFT to the first token,
latency to the last one).

Needs torch and transformers (`pip install -e '.[hf]'`); imports no jax. Used by
scripts/bench_serve_hf.py.
"""

from __future__ import annotations

import asyncio
import math
import time

import torch
import transformers
from transformers import ContinuousBatchingConfig, GenerationConfig

from moejax.serving import loadgen

RequestResult = loadgen.RequestResult


def load_model(hf_dir: str, attn: str = "sdpa") -> transformers.PreTrainedModel:
    """The checkpoint at `hf_dir` in float32, eval mode, with `attn` ("sdpa" or "paged|eager")."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def default_num_blocks(concurrency: int, max_seq: int, page_size: int) -> int:
    """Cache blocks for `concurrency` requests of up to `max_seq` tokens each, plus one spare per request.

    Set explicitly: left unset, transformers sizes the cache from free host memory (60% of it on
    CPU, and it needs psutil to know), and its attention mask buffer grows with the cache."""
    return concurrency * (math.ceil(max_seq / page_size) + 1)


class CBPeer:
    """A continuous batching manager over `model`, fed by `run` at a fixed concurrency."""

    def __init__(self, model, *, num_blocks: int, page_size: int = 256, max_batch_tokens: int | None = None,
                 block_sharing: bool = False):
        self.model = model
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=16)
        self.cb_config = ContinuousBatchingConfig(
            page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
            allow_block_sharing=block_sharing,
            auto_switch_to_flash=False,  # sdpa (or paged|eager) on CPU; no flash kernels there
        )
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=self.cb_config)
        with torch.inference_mode():  # the loop thread takes the caller's inference mode
            self.manager.start()
        self._next_id = 0

    def settings(self) -> dict:
        """The resolved transformers settings (cache geometry, batch budget, paths), for the report."""
        proc = self.manager.batch_processor
        for _ in range(200):  # the loop thread creates the batch processor (and the cache) on start
            if proc is not None:
                break
            time.sleep(0.05)
            proc = self.manager.batch_processor
        cfg = self.manager.continuous_batching_config
        out = {
            "api": "model.init_continuous_batching + add_request(streaming=True) + register_result_handler",
            "transformers": transformers.__version__, "torch": torch.__version__,
            "attn_implementation": self.model.config._attn_implementation,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "page_size": cfg.page_size, "max_requests_per_batch": cfg.max_requests_per_batch,
            "block_sharing": cfg.allow_block_sharing, "scheduler": cfg.scheduler_type,
            "use_cuda_graph": list(cfg.use_cuda_graph), "use_async_batching": cfg.use_async_batching,
            "compile": cfg.varlen_compile_config is not None or cfg.decode_compile_config is not None,
            "decode_fast_path": cfg.max_blocks_per_request > 0,
        }
        if proc is not None:
            out.update(num_blocks=proc.cache.num_blocks, cache_tokens=proc.cache.num_blocks * cfg.page_size,
                       max_batch_tokens=proc.cache.max_batch_tokens)
        return out

    async def one(self, prompt: list[int], max_tokens: int, t_zero: float) -> RequestResult:
        """Stream one request; token arrival times are read on this event loop."""
        rid = f"peer_{self._next_id}"
        self._next_id += 1
        outputs: asyncio.Queue = asyncio.Queue()
        self.manager.register_result_handler(rid, outputs.put_nowait)  # before add_request: no lost outputs
        t0 = time.perf_counter()
        times: list[float] = []
        self.manager.add_request(list(prompt), request_id=rid, max_new_tokens=max_tokens, streaming=True,
                                 eos_token_id=-1)
        error, n = "", 0
        while True:
            out = await outputs.get()
            now = time.perf_counter()
            new = len(out.generated_tokens) - n
            times.extend([now] * new)  # one per step in sync mode; several would arrive together
            n += new
            if out.error is not None:
                error = out.error
                break
            if out.is_finished():
                break
        ok = not error and n == max_tokens
        if not error and not ok:
            error = f"{n} of {max_tokens} tokens"
        # loadgen's definitions: latency to the last token, ttft None when no token came
        return RequestResult(
            prompt_tokens=len(prompt), output_tokens=n, ttft_s=times[0] - t0 if times else None,
            itl_s=[b - a for a, b in zip(times, times[1:])],
            latency_s=(times[-1] if times else time.perf_counter()) - t0, ok=ok, error=error, start_s=t0 - t_zero)

    async def run(self, workload: list, concurrency: int) -> tuple[list[RequestResult], float]:
        """Closed loop: `concurrency` clients, each sending its next request when the last one ends.

        Returns the results in workload order and the wall time from the first send to the last end."""
        results: list = [None] * len(workload)
        pending = iter(range(len(workload)))
        t_zero = time.perf_counter()

        async def client():
            for i in pending:  # a shared iterator: each index goes to exactly one client
                prompt, max_tokens = workload[i]
                results[i] = await self.one(prompt, max_tokens, t_zero)

        await asyncio.gather(*(client() for _ in range(min(concurrency, len(workload)))))
        return results, time.perf_counter() - t_zero

    def generate(self, requests: list) -> list[list[int]]:
        """Each (prompt, max_tokens) request's tokens, all sent at once so that they batch (parity check)."""
        async def one(prompt, max_tokens):
            rid = f"check_{self._next_id}"
            self._next_id += 1
            done = asyncio.get_running_loop().create_future()
            self.manager.register_result_handler(
                rid, lambda o: (o.is_finished() and not done.done()) and done.set_result(o))
            self.manager.add_request(list(prompt), request_id=rid, max_new_tokens=max_tokens, eos_token_id=-1)
            out = await done
            if out.error is not None:
                raise RuntimeError(f"request {rid}: {out.error}")
            return list(out.generated_tokens)

        async def all_of():
            return await asyncio.gather(*(one(p, n) for p, n in requests))
        return asyncio.run(all_of())

    def close(self):
        """Stop the loop thread (after it drains) and release the manager."""
        self.manager.stop(block=True, timeout=30)
        self.manager.destroy()


def plain_generate(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy `model.generate` for one prompt, EOS off, with sdpa and the ordinary KV cache: the
    reference for the CB path (`paged|eager` only works with the paged cache, so it is swapped out
    for the call). Run it while no manager is running: they share the model."""
    attn = model.config._attn_implementation
    if attn != "sdpa":
        model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            ids = torch.tensor([list(prompt)], dtype=torch.long)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0)
    finally:
        if attn != "sdpa":
            model.set_attn_implementation(attn)
    return out[0, ids.shape[1]:].tolist()
