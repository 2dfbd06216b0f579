"""dfdaemon's Prometheus metrics (its own registry, served at /metrics on its port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dfdaemon_requests_total", "Requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.blob_bytes = Counter(
            "dfdaemon_blob_bytes_total",
            "Blob bytes this host obtained, by where they came from (peer, supernode, origin "
            "through dfget's back-to-source, direct passthrough, local cache)", ["source"], registry=r)
        self.sent = Counter("dfdaemon_sent_bytes_total", "Body bytes sent to clients, by route",
                            ["route"], registry=r)
        self.back_to_source = Counter(
            "dfdaemon_back_to_source_total",
            "Blobs not served by the swarm, by reason (the registry answered them directly)",
            ["reason"], registry=r)
        self.digest_mismatch = Counter("dfdaemon_digest_mismatch_total",
                                       "Blobs whose bytes did not hash to their digest (aborted, not cached)",
                                       registry=r)
        self.blobs = Counter("dfdaemon_blobs_total", "Blob requests by outcome", ["result"], registry=r)
        self.active = Gauge("dfdaemon_blob_fetches_active", "Blob fetches running", registry=r)
