"""The listening socket of a daemon's TCP port (supernode API and download ports, peer
server), made here so that `::` means dual stack everywhere.

asyncio sets IPV6_V6ONLY on every IPv6 socket it binds, so `--listen ::` would take
IPv6 only and refuse every IPv4 client; binding it ourselves with IPV6_V6ONLY off gives
one socket that takes both (IPv4 clients appear as ::ffff:a.b.c.d). Any other address
is bound as given. No I/O beyond the bind: the caller hands the socket to aiohttp.
"""

from __future__ import annotations

import socket

DUAL_STACK = "::"
# Connections the kernel may hold for a daemon before it accepts them (capped by
# net.core.somaxconn). aiohttp's default, 128, overflowed in the soak (2,000 simulated
# clients and 200 downloads against one supernode): SYNs were dropped and connections
# completed by SYN cookies were reset, which clients took for a supernode that is down.
BACKLOG = 4096


def listen_socket(host: str, port: int, *, reuse_address: bool = True) -> socket.socket:
    """A bound, non-blocking stream socket (OSError as the bind raised it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET and not _is_ipv4(host):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == DUAL_STACK else 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _is_ipv4(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True
