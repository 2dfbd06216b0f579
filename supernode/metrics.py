"""Prometheus metrics of one supernode (a registry per app, so tests can run several)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .state import SupernodeState


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("supernode_requests", "API requests", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("supernode_request_seconds", "API request latency", ["endpoint"], registry=r,
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5, 30))
        self.assignments = Counter("supernode_assignments", "Piece assignments handed out", registry=r)
        self.reports = Counter("supernode_piece_reports", "Piece reports", ["result", "reason"], registry=r)
        self.cdn_bytes = Gauge("supernode_cdn_origin_bytes", "Bytes fetched from origins", registry=r)
        self.seed_bytes = Gauge("supernode_seed_bytes", "Bytes served by the CDN seed", registry=r)
        self.fetches = Gauge("supernode_cdn_fetches_active", "Origin fetches running here", registry=r)
        self.seed_uploads = Gauge("supernode_seed_uploads_active", "CDN uploads in progress", registry=r)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        if not endpoint.endswith("/pull"):  # pulls long-poll; their wait is not latency
            self.latency.labels(endpoint).observe(seconds)

    def render(self, st: SupernodeState) -> tuple[bytes, str]:
        self.cdn_bytes.set(st.cdn.bytes_fetched)
        self.seed_bytes.set(st.seed.bytes_served)
        self.fetches.set(len(st.cdn.running))
        self.seed_uploads.set(st.seed.active)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
