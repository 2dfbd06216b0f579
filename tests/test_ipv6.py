"""IPv6, real processes: a swarm whose supernode, peer servers and dfgets all speak
over ::1 (`dfget -n [::1]:PORT`, the peer address chosen towards the supernode), and a
supernode on `--listen ::` taking IPv4 and IPv6 clients on one port (dual stack)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, ProcessRunner, _child_env, file_bytes, http_get, in_ci
from dfget_support import run_dfget, stop_server

from common.hostport import hostport, http_base
from common.listen import listen_socket

MIB = 1 << 20


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _ipv6() -> None:
    if not _has_ipv6_loopback():
        msg = "this host has no IPv6 loopback (::1): enable IPv6 (sysctl net.ipv6.conf.lo.disable_ipv6=0)"
        if in_ci():
            pytest.fail(f"CI=true: {msg}", pytrace=False)
        pytest.skip(msg)


def _ports(host: str, n: int) -> list[int]:
    socks = [listen_socket(host, 0) for _ in range(n)]
    try:
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_hostport_brackets_ipv6_only() -> None:
    assert hostport("::1", 8002) == "[::1]:8002" and hostport("[::1]", 1) == "[::1]:1"
    assert hostport("10.0.0.5", 8002) == "10.0.0.5:8002" and hostport("sn.example", 80) == "sn.example:80"
    assert http_base("fe80::1", 15001) == "http://[fe80::1]:15001"


@pytest.mark.parametrize(("host", "v4", "v6"), [("::", True, True), ("::1", False, True),
                                                 ("127.0.0.1", True, False)])
async def test_listen_socket_is_dual_stack_only_for_the_wildcard(host: str, v4: bool, v6: bool) -> None:
    # Whether a connect succeeds says nothing on its own: another process may listen on the
    # same port number in the other family. Our server answers with a token only it knows.
    token = os.urandom(16)

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(token)
        await w.drain()
        w.close()

    sock = listen_socket(host, 0)
    port = sock.getsockname()[1]
    server = await asyncio.start_server(answer, sock=sock)
    try:
        for addr, want in (("127.0.0.1", v4), ("::1", v6)):
            try:
                r, w = await asyncio.open_connection(addr, port)
                try:
                    got = await asyncio.wait_for(r.read(len(token)), 5) == token
                finally:
                    w.close()
            except (TimeoutError, OSError):
                got = False
            assert got == want, (host, addr)
    finally:
        server.close()
        await server.wait_closed()


def _supernode(tmp: Path, listen: str, advertise: str) -> tuple[ProcessRunner, int]:
    port, dport = _ports("::1" if listen != "127.0.0.1" else listen, 2)
    home = tmp / "sn"
    cmd = [sys.executable, "-m", "supernode", "--listen", listen, "--port", str(port), "--download-port",
           str(dport), "--home", str(home), "--advertise-ip", advertise, "--allow-origin", "127.0.0.0/8",
           "--allow-peer", "::1/128", "--allow-peer", "127.0.0.0/8"]
    runner = ProcessRunner(cmd, tmp / "sn.log", ready_url=f"http://[::1]:{port}/_ping", env=_child_env(),
                           cwd=REPO_ROOT)
    return runner, port


async def test_a_swarm_on_ipv6_loopback(origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    size = 9 * MIB + 5
    origin.put_random("v6.bin", size, seed=91)
    runner, port = _supernode(tmp_path, "::1", "::1")
    homes = [tmp_path / f"h{i}" for i in range(3)]
    with runner:
        try:
            def args(i: int) -> list[str]:  # no --ip: dfget picks ::1, its route to the supernode
                return ["-u", origin.url("v6.bin"), "-o", str(tmp_path / f"out{i}"), "-n", f"[::1]:{port}",
                        "--home", str(homes[i]), "--json", "-s", "0", "--notbs", "--verbose"]

            first = await run_dfget(*args(0))
            assert first.code == 0, first.stderr
            assert first.report["supernode"] == f"http://[::1]:{port}"
            assert "(pid " in first.stderr and ", [::1]:" in first.stderr  # its peer server: on ::1
            rest = await asyncio.gather(run_dfget(*args(1)), run_dfget(*args(2)))
            for i, r in enumerate([first, *rest]):
                assert r.code == 0, r.stderr
                assert "without serving" not in r.stderr, r.stderr
                assert (tmp_path / f"out{i}").read_bytes() == file_bytes(size, 91)
            # every peer server is on ::1, so bytes from peers crossed IPv6
            assert sum(int(r.report["bytes_from_peers"]) for r in rest) > 0, [r.report for r in rest]
            assert origin.stats()["by_file"]["v6.bin"]["bytes"] == size  # the origin served it once
        finally:
            for h in homes:
                await stop_server(h)


async def test_listen_wildcard_takes_ipv4_and_ipv6_clients(origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    origin.put_random("ds.bin", 200 * 1024, seed=92)
    runner, port = _supernode(tmp_path, "::", "::1")
    with runner:
        assert http_get(f"http://127.0.0.1:{port}/_ping")[0] == 200
        assert http_get(f"http://[::1]:{port}/_ping")[0] == 200
        for i, node in enumerate((f"127.0.0.1:{port}", f"[::1]:{port}")):
            home = tmp_path / f"h{i}"
            try:
                r = await run_dfget("-u", origin.url("ds.bin"), "-o", str(tmp_path / f"o{i}"), "-n", node,
                                    "--home", str(home), "--json", "--notbs")
                assert r.code == 0, r.stderr
                assert (tmp_path / f"o{i}").read_bytes() == file_bytes(200 * 1024, 92)
            finally:
                await stop_server(home)
