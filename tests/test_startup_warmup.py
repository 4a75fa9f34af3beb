"""Engine start-up (issue 27): warmup compiles every program the loop can call on threads, each
once, and the engine then serves the same tokens as one that compiles on first use; `background`
warmup compiles the decode step only and the rest on a thread while the engine already serves;
Programs.program compiles a key once however many threads ask for it."""

import threading
import time

import numpy as np

from helpers import setup
from moejax.serving.engine import Engine
from moejax.serving.programs import Programs
from moejax.serving.request import Request, SamplingParams

CONFIG = "configs/tiny.yaml"
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(3, 256, size=n)] for i, n in enumerate((5, 40, 17, 3))]
NEW = [6, 4, 8, 5]


def engine(**kw) -> Engine:
    rs, m, params = setup(CONFIG, "1x1x1x1")
    # chunks of 16 in rows of 1 or 4: 3 programs (decode, two mixed), compiled four ways below
    return Engine(rs, m, params, slots=4, max_len=128, chunk=16, budget=64, **kw)


def serve(eng: Engine) -> list[list[int]]:
    """Every prompt, greedy, at most 3 in flight, stepping the engine from this thread (as its own
    thread would)."""
    out, finished, pending = {}, [], list(range(len(PROMPTS)))

    def on(i):
        def emit(ev):
            out[i].extend(ev.token_ids)
            if ev.finish_reason:
                finished.append(i)
        return emit

    while pending or len(finished) < len(PROMPTS):
        while pending and len(out) - len(finished) < 3:
            i = pending.pop(0)
            out[i] = []
            eng.submit(Request(PROMPTS[i], SamplingParams(max_tokens=NEW[i], temperature=0, ignore_eos=True), on(i)))
        assert eng.step() or pending
    return [out[i] for i in range(len(PROMPTS))]


def counting(monkeypatch) -> list:
    """Record each program Programs lowers (its input shapes)."""
    lowered, real = [], Programs._lower

    def spy(self, fn, inputs, every_position=False):
        lowered.append((tuple(shape for _, shape in inputs), every_position))
        return real(self, fn, inputs, every_position)

    monkeypatch.setattr(Programs, "_lower", spy)
    return lowered


def test_threaded_and_background_warmup_compile_each_program_once_and_serve_the_same_tokens(monkeypatch):
    lazy = serve(engine())  # compiles each shape on first use, in the stepping thread
    compiled = counting(monkeypatch)
    eng = engine()
    keys = eng.program_keys()
    assert keys[0] == ("decode",) and len(keys) == 1 + len(eng.extend_shapes())
    assert eng.warmup(workers=2) > 0
    assert sorted(eng.programs._programs) == sorted(keys) and len(compiled) == len(keys)
    assert serve(eng) == lazy and len(compiled) == len(keys)  # nothing compiled while serving

    compiled.clear()  # separate extend and decode calls: warmup's keys are the ones the loop asks for too
    eng = engine(mixed=False)
    eng.warmup()
    assert all(k[0] == "extend" for k in eng.program_keys()[1:]) and len(compiled) == len(keys)
    assert serve(eng) == lazy and len(compiled) == len(keys)

    compiled.clear()
    eng = engine()
    eng.warmup(background=True)
    assert ("decode",) in eng.programs._programs
    got = serve(eng)  # while the thread compiles: a shape not ready is compiled here or waited for
    eng.warming.join(timeout=600)
    assert got == lazy
    assert sorted(eng.programs._programs) == sorted(keys) and len(compiled) == len(keys)


class FakePrograms(Programs):
    """Programs' compile-once logic without XLA: a compile takes `delay` seconds, may fail once."""

    def __init__(self, delay: float, fail_first: bool = False):  # noqa: super().__init__ builds a model
        self._programs, self._pending, self._lock = {}, {}, threading.Lock()
        self.compile_s, self.delay, self.fail_first, self.calls, self.runs = 0.0, delay, fail_first, [], []

    def _spec(self, key):
        return key, [], False

    def _lower(self, key, inputs, every_position=False):
        fake = self

        class Lowered:
            def compile(self):
                fake.calls.append((key, threading.current_thread().name))
                time.sleep(fake.delay)
                if fake.fail_first and len(fake.calls) == 1:
                    raise RuntimeError("compile failed")
                return f"compiled {key}"

        return Lowered()

    def _first_run(self, key, compiled):
        self.runs.append((key, threading.current_thread().name))


def test_a_key_is_compiled_once_however_many_threads_ask():
    p = FakePrograms(0.2)
    got = []
    threads = [threading.Thread(target=lambda: got.append(p.program(("mixed", 1, 16)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["compiled ('mixed', 1, 16)"] * 4 and len(p.calls) == 1 and len(p.runs) == 1

    p = FakePrograms(0.05)
    keys = [("decode",)] + [("mixed", r, 16) for r in (1, 4, 8)]
    p.compile_all(keys, workers=2)
    assert sorted(k for k, _ in p.calls) == sorted(keys)
    assert all(name.startswith("moejax-compile") for _, name in p.calls)  # compiled on the pool's threads
    main = threading.current_thread().name
    assert sorted(k for k, _ in p.runs) == sorted(keys) and {name for _, name in p.runs} == {main}  # run here
    assert p.compile_s > 0

    p = FakePrograms(0.05)
    p.compile_all(keys, workers=2, first_run=False)
    assert not p.runs


def test_a_failed_compile_is_retried_by_a_waiting_thread():
    p = FakePrograms(0.2, fail_first=True)
    errors, got = [], []

    def ask():
        try:
            got.append(p.program(("decode",)))
        except RuntimeError as e:
            errors.append(str(e))

    first = threading.Thread(target=ask)
    first.start()
    time.sleep(0.05)  # the second asks while the first compiles
    second = threading.Thread(target=ask)
    second.start()
    first.join()
    second.join()
    assert errors == ["compile failed"] and got == ["compiled ('decode',)"] and len(p.calls) == 2
    assert not p._pending


def test_a_failed_compile_in_compile_all_raises_and_releases_every_key():
    p = FakePrograms(0.1, fail_first=True)
    keys = [("decode",)] + [("mixed", r, 16) for r in (1, 4, 8)]
    try:
        p.compile_all(keys, workers=1)
        raise AssertionError("compile_all hid a failed compile")
    except RuntimeError as e:
        assert str(e) == "compile failed"
    assert not p._pending and ("decode",) not in p._programs  # the keys not compiled are free to compile later
    assert p.program(("decode",)) == "compiled ('decode',)"
