"""`host:port` as URLs and messages need it: an IPv6 literal goes in brackets
(`[::1]:8002`), or its colons would run into the port's."""

from __future__ import annotations


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def http_base(host: str, port: int) -> str:
    return f"http://{hostport(host, port)}"
