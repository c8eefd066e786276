"""Prometheus metrics: what an operator watches to size and debug a deployment.

Engine state (queue lengths, token counts, KV pool, prefix cache) is read when scraped;
latencies are observed by the server as outputs reach it. Each app has its own registry, so
several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loopcoder.engine.llm import AsyncLLM

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "loopcoder:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Metrics:
    def __init__(self, llm: AsyncLLM) -> None:
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from request arrival to its first generated token.",
            buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between successive outputs of a request.",
            buckets=ITL_BUCKETS, registry=self.registry,
        )
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from request arrival to its last output.",
            buckets=E2E_BUCKETS, registry=self.registry,
        )
        self.finished = Counter(
            PREFIX + "request_success", "Finished sequences by finish reason (abort: the client went away).",
            ["finished_reason"], registry=self.registry,
        )
        self.registry.register(EngineCollector(llm))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Engine figures read at scrape time (plain reads of the engine thread's state)."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm

    def collect(self) -> Iterator[Metric]:
        engine = self.llm.engine
        running = list(engine.scheduler.running)
        yield _gauge("num_requests_running", "Requests with sequences in the running batch.", len({s.request_id for s in running}))
        yield _gauge("num_requests_waiting", "Sequences queued for the running batch.", self.llm.num_waiting)
        yield _counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", engine.stats["prompt_tokens"])
        yield _counter("generation_tokens", "Tokens generated.", engine.stats["generation_tokens"])
        pool = engine.pool_usage()
        used = pool["global_total"] - pool["global_free"]
        yield _gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", pool["usage"])
        yield _gauge("kv_cache_used_blocks", "KV cache blocks held by running sequences.", used)
        yield _gauge("kv_cache_total_blocks", "KV cache blocks in the pool.", pool["global_total"])
        queries, hits = pool["prefix_queries"], pool["prefix_hits"]
        yield _counter("prefix_cache_queries", "Prefix-cache lookups.", queries)
        yield _counter("prefix_cache_hits", "Prefix-cache lookups that found cached blocks.", hits)
        yield _gauge("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since start.", hits / queries if queries else 0.0)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)
