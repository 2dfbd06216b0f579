"""TLS pieces in isolation: --node schemes, the scheme on the wire and in the store, the
HTTP client's TLS failures, and an https origin trusted through --cacert."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from common import wire
from common.tls import ClientTls, ServerTls, TlsConfigError, check_pair
from dfget.config import ConfigError, Node, parse_nodes
from dfget.httpclient import HttpClient, TlsFailure
from dfget_support import run_dfget
from supernode.store.repo import PeerInfo
from tls_support import TestCA


def test_node_schemes() -> None:
    nodes = parse_nodes("https://a:1,http://[::1]:2=3,b,https://c/")
    assert [(n.host, n.port, n.scheme) for n in nodes] == [("::1", 2, "http"), ("a", 1, "https"),
                                                           ("b", 8002, ""), ("c", 8002, "https")]
    assert nodes[1].base_url == "https://a:1" and nodes[0].base_url == "http://[::1]:2"
    assert Node("b", 8002).base_url == "http://b:8002" and not Node("b", 8002).tls
    with pytest.raises(ConfigError, match="scheme"):
        parse_nodes("ftp://a:1")


def test_scheme_on_the_wire_and_in_the_store() -> None:
    old = wire.decode(b'{"cid": "' + b"a" * 32 + b'", "ip": "10.0.0.1", "port": 1, "kind": "peer"}', wire.Source)
    assert old.tls is False  # a record without the field: plain, as before
    src = wire.Source("a" * 32, "10.0.0.1", 1, "cdn", True)
    assert wire.decode(wire.encode(src), wire.Source).tls is True
    plain = PeerInfo("b" * 32, "10.0.0.1", 5, "peer")
    assert plain.encode().count("|") == 3  # unchanged for plain peers
    tls = PeerInfo("b" * 32, "10.0.0.1", 5, "peer-cdn", True)
    assert PeerInfo.decode(tls.encode()) == tls and PeerInfo.decode(plain.encode()) == plain
    assert PeerInfo.decode("x|y") is None


def test_pairs_and_files(tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="both"):
        check_pair("c.pem", None)
    check_pair(None, None)
    with pytest.raises(TlsConfigError, match="no such file"):
        ClientTls(cacert=str(tmp_path / "nope.pem")).context()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TlsConfigError, match="cannot load"):
        ServerTls(str(tmp_path / "junk.pem"), str(tmp_path / "junk.pem")).context()


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


async def _serve(ctx: ssl.SSLContext | None, files: dict[str, bytes] | None = None) -> tuple[web.AppRunner, int]:
    async def handler(request: web.Request) -> web.Response:
        body = (files or {}).get(request.path)
        return web.Response(body=body) if body is not None else web.Response(text="pong")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def tls_server(ca: TestCA) -> AsyncIterator[int]:
    leaf = ca.issue("server")
    runner, port = await _serve(ServerTls(leaf.cert, leaf.key).context())
    yield port
    await runner.cleanup()


async def test_http_client_over_tls(ca: TestCA, tls_server: int) -> None:
    async with HttpClient() as http:
        resp = await http.request("GET", "127.0.0.1", tls_server, "/_ping", tls=ClientTls(ca.cert).context())
        assert (resp.status, resp.body) == (200, b"pong")
        with pytest.raises(TlsFailure, match=f"TLS certificate of 127.0.0.1:{tls_server} not trusted"):
            await http.request("GET", "127.0.0.1", tls_server, "/_ping",
                               tls=ssl.create_default_context(cafile=TestCA(Path(ca.dir) / "x", "other").cert))


async def test_tls_client_to_a_plain_server(ca: TestCA) -> None:
    runner, port = await _serve(None)
    try:
        async with HttpClient() as http:
            with pytest.raises(TlsFailure, match="does not speak TLS"):
                await http.request("GET", "127.0.0.1", port, "/", tls=ClientTls(ca.cert).context())
    finally:
        await runner.cleanup()


async def test_https_origin_trusted_with_cacert(tmp_path: Path, ca: TestCA) -> None:
    leaf = ca.issue("origin")
    data = bytes(range(256)) * 4096
    runner, port = await _serve(ServerTls(leaf.cert, leaf.key).context(), {"/f": data})
    try:
        url = f"https://127.0.0.1:{port}/f"
        r = await run_dfget("-u", url, "-o", str(tmp_path / "ok"), "--pattern", "source", "--no-serve",
                            "--home", str(tmp_path / "h"), "--cacert", ca.cert)
        assert r.code == 0, r.stderr
        assert (tmp_path / "ok").read_bytes() == data
        r = await run_dfget("-u", url, "-o", str(tmp_path / "no"), "--pattern", "source", "--no-serve",
                            "--home", str(tmp_path / "h"))
        assert r.code == 4, r.stderr  # an origin error, with the reason
        assert "certificate" in r.stderr.lower()
    finally:
        await runner.cleanup()


async def test_a_supernode_announces_whether_its_download_port_speaks_tls() -> None:
    """Another supernode hands out this one's CDN copy with the scheme it announced."""
    from supernode.store.connection import Store, connect
    from supernode.store.repo import Repo

    store = Store(connect(None), embedded=True)
    try:
        repo = Repo(store)
        await repo.announce_supernode("a" * 32, "10.0.0.1", 8002, 8001, tls=True)
        await repo.announce_supernode("b" * 32, "10.0.0.2", 8002, 8001)
        assert await repo.supernode_address("a" * 32) == ("10.0.0.1", 8001, True)
        assert await repo.supernode_address("b" * 32) == ("10.0.0.2", 8001, False)
    finally:
        await store.close()


async def test_cacert_with_a_plain_supernode_is_an_error_with_the_way_out(tmp_path: Path, ca: TestCA) -> None:
    """--cacert makes a bare host:port https; a plain supernode there is not silently
    spoken to in plain (that would be a downgrade), and the message says how to."""
    runner, port = await _serve(None)
    try:
        r = await run_dfget("-u", "http://127.0.0.1:1/f", "-o", str(tmp_path / "f"), "-n", f"127.0.0.1:{port}",
                            "--no-serve", "--home", str(tmp_path / "h"), "--cacert", ca.cert)
        assert r.code == 9, r.stderr
        assert f"127.0.0.1:{port} does not speak TLS" in r.stderr
        assert f"write -n http://127.0.0.1:{port} for plain" in r.stderr
    finally:
        await runner.cleanup()
