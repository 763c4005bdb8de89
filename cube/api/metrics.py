"""The server's Prometheus metrics: one registry per server, served at ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ApiMetrics"]


class ApiMetrics:
    """Request counters and latencies per surface, sandbox lifecycle counters, live gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cube_http_requests_total",
            "HTTP requests answered, by surface, method and status.",
            ["surface", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cube_http_request_duration_seconds",
            "Time to the response's first byte (headers), by surface.",
            ["surface"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cube_http_requests_in_flight",
            "Requests (and WebSocket sessions) being served.",
            ["surface"],
            registry=self.registry,
        )
        self.sandbox_ops = Counter(
            "cube_sandbox_operations_total",
            "Lifecycle operations through the API, by operation and outcome.",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.create_latency = Histogram(
            "cube_sandbox_create_duration_seconds",
            "Time to bind a sandbox for a create request.",
            buckets=(0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.rpcs = Counter(
            "cube_envd_rpcs_total",
            "envd Connect RPCs, by procedure and Connect code.",
            ["procedure", "code"],
            registry=self.registry,
        )
        self.sandboxes = Gauge(
            "cube_sandboxes",
            "Bound sandboxes by state.",
            ["state"],
            registry=self.registry,
        )

    def count_sandboxes(self, counts: dict[str, int]) -> None:
        """Set the live sandbox gauges (called at each scrape)."""
        for state in ("running", "paused"):
            self.sandboxes.labels(state).set(counts.get(state, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
