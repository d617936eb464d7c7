"""Prometheus metrics of the gateway, on a registry of its own (one per app, so that several
apps in one process, as in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gateway_request_latency_seconds",
            "HTTP request latency (to the last byte) by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.best_of = Histogram(
            "gateway_best_of",
            "Candidates generated per chat completion",
            buckets=(1, 2, 4, 8, 16),
            registry=r,
        )
        self.choices = Histogram(
            "gateway_n", "Choices returned per chat completion", buckets=(1, 2, 4, 8, 16), registry=r
        )
        self.feedback = Counter("gateway_feedback", "Feedback stored, by kind", ["kind"], registry=r)
        self.backend_errors = Counter(
            "gateway_backend_errors",
            "Failed backend calls by backend and kind",
            ["backend", "kind"],
            registry=r,
        )
        self.backend_latency = Histogram(
            "gateway_backend_latency_seconds",
            "Backend call latency by backend and call",
            ["backend", "call"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited", "Requests refused by the rate limiter", registry=r
        )
        self.tokens = Counter("gateway_completion_tokens", "Tokens generated (all candidates)", registry=r)
        self.inflight = Gauge("gateway_inflight_chat_completions", "Chat completions in flight", registry=r)
        self.shed = Counter(
            "gateway_shed", "Requests refused because the system is at capacity, by reason", ["reason"], registry=r
        )
        self.client_gone = Counter(
            "gateway_client_gone",
            "Chat completions whose client disconnected before the answer (work cancelled, nothing stored)",
            registry=r,
        )
