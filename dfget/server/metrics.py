"""Prometheus metrics of one peer server (`GET /metrics` on its peer port; a registry per
server so tests can run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from common.wire import BACK_TO_SOURCE_REASONS

# why a piece request was not served (bounded label values)
ERRORS = ("bad_request", "not_found", "range_not_satisfiable", "timeout", "aborted")


class PeerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dfget_peer_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.pieces = Counter("dfget_peer_pieces_served", "Pieces (ranges) sent in full",
                              registry=r)
        self.bytes = Counter("dfget_peer_uploaded_bytes", "Bytes of pieces sent in full",
                             registry=r)
        self.busy = Counter("dfget_peer_busy", "Requests refused with 503: no upload slot",
                            registry=r)
        self.errors = Counter("dfget_peer_upload_errors", "Piece requests not served, by reason",
                              ["reason"], registry=r)
        self.seconds = Histogram("dfget_peer_upload_seconds", "Time to send one piece", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.auth_refused = Counter("dfget_peer_auth_refused", "Piece requests refused for their token",
                                    ["reason"], registry=r)
        self.back_to_source = Counter(
            "dfget_peer_back_to_source", "Downloads of this host that went to the origin, by reason",
            ["reason"], registry=r)
        for reason in BACK_TO_SOURCE_REASONS:
            self.back_to_source.labels(reason)
        self.active = Gauge("dfget_peer_uploads_active", "Uploads in progress", registry=r)
        self.files = Gauge("dfget_peer_files", "Files this server offers", registry=r)
        for reason in ERRORS:
            self.errors.labels(reason)

    def render(self, active: int, files: int) -> tuple[bytes, str]:
        self.active.set(active)
        self.files.set(files)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
