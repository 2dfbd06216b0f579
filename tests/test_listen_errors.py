"""A port that cannot be had is a clear one-line error and exit status 1, not a
traceback, for the supernode (API and download port) and the peer server."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO_ROOT


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)


@pytest.mark.parametrize("flag", ["--port", "--download-port"])
def test_supernode_port_taken(tmp_path: Path, taken: int, flag: str) -> None:
    other = "--download-port" if flag == "--port" else "--port"
    r = run("supernode", "--listen", "127.0.0.1", flag, str(taken), other, "0",
            "--home", str(tmp_path / "sn"))
    assert r.returncode == 1, r.stderr
    assert f"Error: cannot listen on 127.0.0.1:{taken} ({flag}): Address already in use" in r.stderr
    assert "Traceback" not in r.stderr and "Unclosed" not in r.stderr, r.stderr


def test_peer_server_port_taken(tmp_path: Path, taken: int) -> None:
    r = run("dfget", "server", "--ip", "127.0.0.1", "--port", str(taken), "--home", str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert f"Error: cannot listen on 127.0.0.1:{taken} (--ip, --port): Address already in use" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "peer.sock").exists()


def test_peer_server_ip_not_of_this_host(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: documentation only, never an address of this host
    r = run("dfget", "server", "--ip", "192.0.2.7", "--port", "0", "--home", str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert "cannot listen on 192.0.2.7:0 (--ip, --port): Cannot assign requested address" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
