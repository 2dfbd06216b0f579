"""dfdaemon: a per-host registry mirror (Docker Registry HTTP API v2) and HTTP proxy that
fetches container image blobs through the swarm."""
