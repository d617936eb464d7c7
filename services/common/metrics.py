"""Prometheus metrics of one service process.

Each process owns a registry (not the global one) so several cores can live in one test or
benchmark process without name clashes. Names are documented in docs/services.md.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


def version_number(version: str | None) -> int:
    """``"v0012"`` -> 12; anything else (a demo path, no version) -> 0."""
    m = re.fullmatch(r"v(\d+)", version or "")
    return int(m.group(1)) if m else 0


class KernelFallbackCollector:
    """``palm_rlhf_kernel_fallbacks_total{op,reason}``: calls that asked for a Triton kernel
    but ran in PyTorch, read from the process-wide counter in :mod:`kernels.fallbacks` at
    each scrape."""

    def collect(self):
        from kernels import fallbacks

        family = CounterMetricFamily(
            "palm_rlhf_kernel_fallbacks",
            "calls that asked for a Triton kernel but ran in PyTorch, by operation and reason",
            labels=["op", "reason"],
        )
        for (op, reason), count in sorted(fallbacks.snapshot().items()):
            family.add_metric([op, reason], count)
        yield family

    def describe(self):
        return []


class ServiceMetrics:
    """The metric families every service exports, plus the model-serving ones."""

    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "palm_rlhf_grpc_requests", "RPCs handled, by method and status code", ["service", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "palm_rlhf_grpc_request_seconds", "RPC latency in seconds, by method", ["service", "method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("palm_rlhf_grpc_in_flight", "RPCs being handled now", ["service"], registry=r)
        self.queue_depth = Gauge(
            "palm_rlhf_queue_depth", "requests waiting for the model (not yet in a batch)", ["service"], registry=r
        )
        self.shed = Counter(
            "palm_rlhf_shed", "requests refused because the queue was full (retry shortly)", ["service"], registry=r
        )
        self.batch_size = Histogram(
            "palm_rlhf_batch_size", "requests sharing one model batch", ["service"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "palm_rlhf_batch_rows", "sequences (prompts x samples) decoded together in one batch", ["service"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.tokens_generated = Counter(
            "palm_rlhf_tokens_generated", "tokens sampled by the policy", ["service"], registry=r
        )
        self.prompt_tokens = Counter("palm_rlhf_prompt_tokens", "prompt tokens processed", ["service"], registry=r)
        self.items_scored = Counter(
            "palm_rlhf_items_scored", "responses scored or sequences evaluated", ["service", "scorer"], registry=r
        )
        self.model_version = Gauge(
            "palm_rlhf_model_version", "numeric checkpoint version being served (v0012 -> 12)", ["service"], registry=r
        )
        self.model_version_info = Gauge(
            "palm_rlhf_model_version_info", "1 for the checkpoint version being served", ["service", "version"],
            registry=r,
        )
        self.version_swaps = Counter(
            "palm_rlhf_version_swaps", "model version changes since start", ["service"], registry=r
        )
        self.ready = Gauge("palm_rlhf_ready", "1 when the service is SERVING", ["service"], registry=r)
        self.trainer_steps = Counter("palm_rlhf_trainer_steps", "update rounds run", ["service"], registry=r)
        self.watchers = Gauge("palm_rlhf_version_watchers", "open WatchVersions streams", ["service"], registry=r)
        r.register(KernelFallbackCollector())
        self._version: str | None = None

    def set_version(self, version: str) -> None:
        """Record the version now being served (keeps exactly one ``_info`` series at 1)."""
        if self._version is not None and self._version != version:
            self.model_version_info.remove(self.service, self._version)
            self.version_swaps.labels(self.service).inc()
        self._version = version
        self.model_version_info.labels(self.service, version).set(1)
        self.model_version.labels(self.service).set(version_number(version))

    def serve_http(self, host: str, port: int) -> int | None:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port (None if off)."""
        if port < 0:
            return None
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
