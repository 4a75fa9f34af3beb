"""The serving engine's parts without HTTP: stop strings, finish reasons, per-row sampling, prefill
buckets, and the engine in-process (static batching too) against the generation loop of infer.py."""

import threading

import jax
import numpy as np
import pytest

from helpers import setup
from moejax.inference.sampling import sample, sample_rows
from moejax.serving.batching import bucket, buckets
from moejax.serving.engine import Engine
from moejax.serving.request import Request, SamplingParams, StopText


def feed(stop, text: str) -> tuple[str, bool]:
    st = StopText(tuple(stop))
    shown = "".join(st.add(b) for b in text.encode())
    return shown + ("" if st.hit else st.flush()), st.hit


def test_stop_strings():
    assert feed(["lo w"], "hello world") == ("hel", True)
    assert feed(["xyz"], "hello world") == ("hello world", False)
    assert feed(["o", "ll"], "hello") == ("he", True)  # the earliest stop string wins
    st = StopText(("abc",))
    assert st.add(ord("x")) == "x" and st.add(ord("a")) == "" and st.add(ord("b")) == ""  # held back
    assert st.add(ord("x")) == "abx" and not st.hit
    st = StopText(())
    e = "é".encode()
    assert st.add(e[0]) == "" and st.add(e[1]) == "é"  # a character split over two byte tokens
    assert st.add(300) == "<300>"


def test_finish_reasons():
    events = []
    r = Request([1, 2], SamplingParams(max_tokens=3, stop_token_ids=(7,)), events.append)
    assert r.accept(65, eos_id=2).finish_reason is None
    ev = r.accept(7, eos_id=2)
    assert ev.finish_reason == "stop" and ev.token_ids == [7] and r.generated == [65, 7]
    r = Request([1], SamplingParams(max_tokens=2, ignore_eos=True), events.append)
    assert r.accept(2, eos_id=2).finish_reason is None  # EOS ignored
    assert r.accept(66, eos_id=2).finish_reason == "length"
    r = Request([1], SamplingParams(max_tokens=5), events.append)
    assert r.accept(2, eos_id=2).finish_reason == "stop"


def rows(n, **kw):
    base = {"seeds": np.arange(n, dtype=np.uint32), "counts": np.zeros(n, np.int32),
            "temps": np.ones(n, np.float32), "top_k": np.zeros(n, np.int32), "top_p": np.ones(n, np.float32)}
    base.update(kw)
    return tuple(base[k] for k in ("seeds", "counts", "temps", "top_k", "top_p"))


def test_sample_rows():
    logits = jax.random.normal(jax.random.key(0), (6, 40)) * 3
    best = np.asarray(np.argmax(logits, -1))
    n = 6
    assert (np.asarray(sample_rows(logits, *rows(n, temps=np.zeros(n, np.float32)))) == best).all()
    tiny = np.full(n, 1e-42, np.float32)  # below GREEDY_BELOW: greedy (logits / 1e-42 overflow to inf)
    assert (np.asarray(sample_rows(logits, *rows(n, temps=tiny))) == best).all()
    assert (np.asarray(sample(logits, jax.random.key(0), temperature=1e-42, top_k=0, top_p=1.0)) == best).all()
    assert (np.asarray(sample_rows(logits, *rows(n, top_k=np.ones(n, np.int32)))) == best).all()
    assert (np.asarray(sample_rows(logits, *rows(n, top_p=np.full(n, 1e-6, np.float32)))) == best).all()
    # a row's draw depends on its own seed and count only, not on its neighbours
    a = np.asarray(sample_rows(logits, *rows(n)))
    perm = np.array([3, 0, 5, 1, 4, 2])
    b = np.asarray(sample_rows(logits[perm], *rows(n, seeds=np.arange(n, dtype=np.uint32)[perm])))
    assert (a[perm] == b).all()
    # top-k 3 draws only the 3 best; top-p keeps the smallest prefix reaching p
    one = jax.numpy.broadcast_to(logits[0], (200, 40))
    k3 = np.asarray(sample_rows(one, *rows(200, top_k=np.full(200, 3, np.int32))))
    assert set(k3) <= set(np.argsort(-np.asarray(logits[0]))[:3].tolist()) and len(set(k3)) > 1
    probs = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.8) + 1)]
    p8 = np.asarray(sample_rows(one, *rows(200, top_p=np.full(200, 0.8, np.float32))))
    assert set(p8) <= set(keep.tolist())
    # greedy rows beside sampled ones, and top-k on some sampled rows only (each stage runs when any row needs it)
    temps = np.tile(np.array([0, 1, 1], np.float32), 200 // 3 + 1)[:200]
    top_k = np.where(np.arange(200) % 3 == 1, 3, 0).astype(np.int32)
    got = np.asarray(sample_rows(one, *rows(200, temps=temps, top_k=top_k)))
    top3 = set(np.argsort(-np.asarray(logits[0]))[:3].tolist())
    assert (got[temps == 0] == best[0]).all() and set(got[top_k == 3]) <= top3 and len(set(got[top_k == 3])) > 1
    assert not set(got[(temps == 1) & (top_k == 0)]) <= top3  # the unfiltered rows draw from all 40 tokens


def test_prefill_buckets():
    assert buckets(16, 256) == [16, 64, 256] and buckets(1, 2) == [1, 2] and buckets(1, 1) == [1]
    assert bucket(17, 16, 256) == 64 and bucket(300, 16, 256) == 256 and bucket(3, 1, 16) == 4


@pytest.mark.slow
def test_static_engine_in_process():
    """Static batching (bench_compare's baseline; continuous batching is tested through the server):
    prompts longer than a chunk, more requests than slots, greedy tokens equal each prompt alone."""
    from moejax.inference.generate import Generator
    from moejax.inference.sampling import Sampling

    rs, m, params = setup("configs/tiny.yaml", "1x1x1x1")
    prompts = [[int(t) for t in np.random.default_rng(i).integers(3, 256, size=n)] for i, n in enumerate((5, 40, 70, 9))]
    eng = Engine(rs, m, params, slots=2, max_len=96, chunk=32, budget=64, static=True)
    out, done = {}, threading.Event()

    def emit(i):
        def on(ev):
            out.setdefault(i, []).extend(ev.token_ids)
            if ev.finish_reason and len(out) == len(prompts) and all(r.finish_reason for r in reqs):
                done.set()
        return on

    reqs = [Request(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), emit(i))
            for i, p in enumerate(prompts)]
    for r in reqs:
        eng.submit(r)
    while not done.is_set():
        assert eng.step()
    gen = Generator(rs, m, params, 1, 72, 96)
    assert [out[i] for i in range(len(prompts))] == \
        [gen.generate([p], 6, Sampling(), None)["generated_ids"][0] for p in prompts]
    assert eng.steps["extend"] >= 3  # the 70-token prompt alone takes 3 chunks of 32
    assert eng.steps["decode"] == 2 * 5  # two batches of two, each decoding 5 steps after its prefill


def test_a_stopped_engine_answers_new_requests_at_once():
    rs, m, params = setup("configs/tiny.yaml", "1x1x1x1")
    eng = Engine(rs, m, params, slots=2, max_len=32, chunk=16)
    eng.start()
    eng.stop()
    eng.thread.join(timeout=30)
    events = []
    eng.submit(Request([1, 2], SamplingParams(), events.append))
    assert [(e.finish_reason, e.error) for e in events] == [("abort", "the server is shutting down")]
