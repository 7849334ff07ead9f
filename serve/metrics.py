"""/metrics: Prometheus text. The engine's own counts (engine.stats(), read at each scrape) beside what the server
measures per request (TTFT and TPOT histograms, requests by endpoint and status)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds; TTFT spans a queue wait plus a prefill, TPOT one decode step of all running requests
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# engine.stats() key -> (metric name, help); gauges are read as they are, counters are cumulative
GAUGES = {
    "running": ("fastllm_requests_running", "Requests decoding now"),
    "waiting": ("fastllm_requests_waiting", "Requests waiting for a slot"),
    "prefilling": ("fastllm_requests_prefilling", "Requests in a slot whose prompt is still being prefilled"),
    "slots": ("fastllm_slots", "Slots of the KV buffer (requests that can run at once)"),
    "slots_in_use": ("fastllm_slots_in_use", "Slots held by a request"),
}
COUNTERS = {
    "prompt_tokens": ("fastllm_prompt_tokens", "Prompt tokens of admitted requests"),
    "generated_tokens": ("fastllm_generation_tokens", "Tokens generated"),
    "requests_finished": ("fastllm_requests_finished", "Requests finished (stopped, at length or cancelled)"),
    "prefix_cache_hits": ("fastllm_prefix_cache_hits", "Requests whose prompt start was found in the prefix cache"),
    "prefix_cached_tokens": ("fastllm_prefix_cached_tokens", "Prompt tokens taken from the prefix cache"),
    "speculative_steps": ("fastllm_speculative_steps", "Verify steps of speculative decoding (--speculative)"),
    "drafted_tokens": ("fastllm_drafted_tokens", "Tokens drafted by prompt lookup and verified"),
    "accepted_tokens": ("fastllm_accepted_tokens", "Drafted tokens kept (each saved one decode step)"),
}


class EngineCollector:
    """engine.stats() as Prometheus metrics, read at each scrape (nothing when the model is not loaded yet)."""

    def __init__(self, stats: Callable[[], dict | None]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        if stats is None:
            return
        for key, (name, text) in GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, text, value=stats[key])
        for key, (name, text) in COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, text, value=stats[key])


class Metrics:
    def __init__(self, stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats))
        self.ttft = Histogram("fastllm_time_to_first_token_seconds", "Submit to first token, per choice",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("fastllm_time_per_output_token_seconds", "Mean time per token after the first, per "
                              "choice", buckets=TPOT_BUCKETS, registry=self.registry)
        self.requests = Counter("fastllm_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)

    def observe(self, completion) -> None:
        """A finished choice's timings (cancelled ones are left out: they measure the client, not the server)."""
        if completion.finish_reason in ("stop", "length"):
            self.ttft.observe(completion.ttft_s)
            if completion.completion_tokens > 1:
                self.tpot.observe(completion.tpot_s)

    def text(self) -> bytes:
        return generate_latest(self.registry)
