"""Prometheus metrics of the server, named like vLLM's (`vllm:` becomes `moejax:`), labelled by
model_name and engine (the dp replica). Updated from the engine threads; prometheus_client is
thread-safe."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, model_name: str, engines: int, slots: int):
        self.registry = r = CollectorRegistry()
        self.model_name, self.slots = model_name, slots
        self._children: dict[tuple, object] = {}
        labels = ("model_name", "engine")
        self.running = Gauge("moejax:num_requests_running", "Requests in decode slots", labels, registry=r)
        self.waiting = Gauge("moejax:num_requests_waiting", "Requests waiting for a slot", labels, registry=r)
        self.slots_used = Gauge("moejax:kv_slots_used", "KV-cache slots holding a request", labels, registry=r)
        self.slots_total = Gauge("moejax:kv_slots_total", "KV-cache slots", labels, registry=r)
        self.usage = Gauge("moejax:kv_cache_usage_perc", "Fraction of KV-cache slots in use", labels, registry=r)
        self.prompt_tokens = Counter("moejax:prompt_tokens", "Prefilled prompt tokens", labels, registry=r)
        self.generation_tokens = Counter("moejax:generation_tokens", "Generated tokens", labels, registry=r)
        self.success = Counter("moejax:request_success", "Finished requests", labels + ("finished_reason",),
                               registry=r)
        self.ttft = Histogram("moejax:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moejax:inter_token_latency_seconds", "Time between consecutive tokens", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("moejax:e2e_request_latency_seconds", "Arrival to last token", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("moejax:request_queue_time_seconds", "Arrival to a slot", labels,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.step_tokens = Counter("moejax:step_tokens", "Token positions the engine's forward calls computed: "
                                   "prompt tokens (prefill), generated tokens (decode) and the compiled shapes' "
                                   "padding", labels + ("kind",), registry=r)
        self.forward_calls = Counter("moejax:forward_calls", "Engine forward calls: decode, extend (prompt chunks "
                                     "alone) or mixed (decode rows and prompt chunks in one forward)",
                                     labels + ("kind",), registry=r)
        self.prefix_queries = Counter("moejax:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels, registry=r)
        self.prefix_hits = Counter("moejax:prefix_cache_hits", "Prompt tokens whose keys and values came from the "
                                   "prefix cache (not computed)", labels, registry=r)
        self.prefix_pool = Counter("moejax:prefix_cache_pool_blocks", "Blocks of the prefix cache's pool saved "
                                   "(from a row given to another request), loaded (into a row) or dropped (least "
                                   "recently used, for room)", labels + ("event",), registry=r)
        for e in range(engines):
            self._at(self.slots_total, e).set(slots)
            self.engine_state(e, 0, 0, 0.0)

    def _at(self, metric, engine: int, **labels):
        """metric's child for this model, engine and labels, looked up once: `labels()` builds and
        checks its label tuple on every call, and these run for every step and token."""
        key = (metric, engine, *labels.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(model_name=self.model_name, engine=str(engine), **labels)
        return child

    def engine_state(self, engine: int, running: int, waiting: int, usage: float):
        self._at(self.running, engine).set(running)
        self._at(self.waiting, engine).set(waiting)
        self._at(self.slots_used, engine).set(running)
        self._at(self.usage, engine).set(usage)

    def forward(self, engine: int, kind: str, prefill: int, decode: int, computed: int):
        """One forward call of `kind` that computed `computed` token positions, of which `prefill`
        prompt tokens and `decode` generated ones; the rest were padding."""
        self._at(self.forward_calls, engine, kind=kind).inc()
        for k, n in (("prefill", prefill), ("decode", decode), ("padding", computed - prefill - decode)):
            self._at(self.step_tokens, engine, kind=k).inc(n)

    def prefix(self, engine: int, queried: int, hit: int, saved: int = 0, loaded: int = 0, dropped: int = 0):
        """A request placed: its prompt tokens looked up, those reused, and the pool's block events."""
        self._at(self.prefix_queries, engine).inc(queried)
        self._at(self.prefix_hits, engine).inc(hit)
        for event, n in (("saved", saved), ("loaded", loaded), ("dropped", dropped)):
            self._at(self.prefix_pool, engine, event=event).inc(n)

    def queued(self, engine: int, seconds: float):
        self._at(self.queue, engine).observe(seconds)

    def token(self, engine: int, req):
        """After req accepted a token: its first (TTFT, prompt counted) or a later one (ITL)."""
        self._at(self.generation_tokens, engine).inc()
        if len(req.generated) == 1:
            self._at(self.prompt_tokens, engine).inc(len(req.prompt))
            self._at(self.ttft, engine).observe(req.first_token - req.arrival)
        else:
            self._at(self.itl, engine).observe(req.last_token - req.previous_token)

    def finished(self, engine: int, req):
        self._at(self.success, engine, finished_reason=req.finish_reason).inc()
        self._at(self.e2e, engine).observe(time.perf_counter() - req.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
