"""`dfdaemon`: one per host, a registry mirror and HTTP proxy through the swarm."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path

import click

from common import logs
from common.listen import listen_socket
from common.netpolicy import AddressPolicy
from common.tls import TlsConfigError
from dfget.cli import parse_tls, tls_options
from dfget.config import ConfigError, local_ip_towards, parse_duration, parse_nodes, parse_rate

from . import routes
from .app import Daemon, Settings, serve

log = logging.getLogger("dfdaemon")
DEFAULT_PORT = 65001


def _registry(value: str | None) -> str | None:
    if value is None:
        return None
    from urllib.parse import urlsplit
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise click.BadParameter("must be http(s)://HOST[:PORT]")
    return value.rstrip("/")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", help="upstream registry for the mirror, http(s)://HOST[:PORT]")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="port of the mirror and proxy (and /metrics)")
@click.option("--listen", default="0.0.0.0", show_default=True, help="address to listen on")
@click.option("-n", "--node", "nodes", default="127.0.0.1:8002", show_default=True,
              help="supernodes, host[:port][=weight],...")
@click.option("--home", default="~/.dfget", show_default=True,
              help="dfget home shared with dfget (peer server, its store)")
@click.option("--ip", default=None, help="this host's address for peers (default: towards the supernode)")
@click.option("--peer-port", default=0, type=click.IntRange(0, 65535),
              help="peer server port when dfdaemon starts it (0: any)")
@click.option("--rule", "rules", multiple=True,
              help="proxy rule: REGEX (through the swarm) or direct:REGEX; first match wins "
                   f"[default: {routes.DEFAULT_P2P_RULE}]")
@click.option("--proxy-allow", "proxy_allow", multiple=True,
              help="CIDR the HTTP proxy and CONNECT may reach despite the default deny of loopback, "
                   "link-local, unspecified and multicast (e.g. 127.0.0.0/8 for tests)")
@click.option("--alivetime", default="24h", show_default=True,
              help="peer server started by dfdaemon: exit after this long idle")
@click.option("--expiretime", default="24h", show_default=True,
              help="peer server started by dfdaemon: stop serving a layer unread this long (dfget's "
                   "default is 3m; a host should give back its image layers for longer)")
@click.option("--max-fetches", default=64, show_default=True, type=click.IntRange(1, 10_000),
              help="blob downloads through the swarm at once; more requests get 429 with Retry-After")
@click.option("-s", "--locallimit", default="0", show_default=True, help="download rate limit (0: none)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-json", is_flag=True, help="one JSON object per log line")
@tls_options
def main(registry: str | None, port: int, listen: str, nodes: str, home: str, ip: str | None,
         peer_port: int, rules: tuple[str, ...], proxy_allow: tuple[str, ...], alivetime: str, expiretime: str,
         max_fetches: int, locallimit: str, log_level: str, log_json: bool, cacert: str | None,
         cert: str | None, key: str | None, client_ca: str | None) -> None:
    """Registry mirror (/v2/...) and HTTP proxy: blob GETs through the P2P swarm."""
    try:
        node_list = parse_nodes(nodes)
        limit = parse_rate(locallimit, "--locallimit")
        rule_list = routes.parse_rules(list(rules) or [routes.DEFAULT_P2P_RULE])
        policy = AddressPolicy.build(allow=list(proxy_allow))
        alive = parse_duration(alivetime, "--alivetime")
        expire = parse_duration(expiretime, "--expiretime")
        client_tls, server_tls = parse_tls(cacert, cert, key, client_ca)
    except (ConfigError, TlsConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    reg = _registry(registry)
    logs.setup(log_level, as_json=log_json, text_format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(home=Path(home).expanduser().absolute(), nodes=node_list,
                        ip=ip or local_ip_towards(node_list[0]), registry=reg, peer_port=peer_port,
                        locallimit=limit, rules=rule_list, proxy_policy=policy,
                        alivetime=alive, expiretime=expire, max_fetches=max_fetches,
                        tls=client_tls, server_tls=server_tls)
    try:
        sock = listen_socket(listen, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}:{port}: {exc.strerror or exc}") from None
    asyncio.run(_serve(settings, sock))


async def _serve(settings: Settings, sock: socket.socket) -> None:
    daemon = Daemon(settings)
    runner, server = await serve(daemon, sock)
    host, port = sock.getsockname()[:2]
    log.info("dfdaemon listening on %s:%d (registry %s, home %s, peer ip %s)", host, port,
             settings.registry or "-", settings.home, settings.ip)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await runner.cleanup()
