"""The HTTP API: what clients, operators and the dashboard talk to.

Owns the request handlers of the protocol (`handlers`), the request guards (body and
rate limits, `guard`), the peer secrets that authenticate a peer's calls (`peerauth`),
preheat (`preheat`) and the dashboard with its JSON views (`ui`).

May import `supernode.scheduling`, `supernode.cdn`, `supernode.store`, `common`, and the
typed application state (`supernode.state`); nothing imports `api` except the app
factory (`supernode.app`).
"""
