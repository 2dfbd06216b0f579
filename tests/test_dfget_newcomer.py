"""What a newcomer hit in the first ten minutes with dfget: the help names the server
subcommands, the progress bar tells the truth, connection errors do not blame TLS, -o
into a missing directory is refused, and the peer server dfget leaves running is
announced and can be stopped."""

from __future__ import annotations

import io
import re
from pathlib import Path

import aiohttp
import pytest
from conftest import file_bytes, free_port

from common.errors import EXIT_DISK, EXIT_NO_SUPERNODE, EXIT_ORIGIN, EXIT_OK
from dfget.neterr import describe
from dfget.progress import ProgressBar, Stats
from dfget_support import run_dfget, server_pid, stop_server

MIB = 1 << 20


async def test_help_names_the_server_subcommands() -> None:
    r = await run_dfget("--help")
    assert r.code == 0
    assert "dfget server [OPTIONS]" in r.stdout and "dfget server stop" in r.stdout, r.stdout
    r = await run_dfget("server", "--help")
    assert r.code == 0 and "dfget server stop --home DIR" in r.stdout
    r = await run_dfget("server", "stop", "--help")
    assert r.code == 0 and "--home" in r.stdout


# --- progress bar --------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _speed(line: str) -> float:
    m = re.search(r"([\d.]+) (B|KiB|MiB|GiB)/s", line)
    assert m, line
    return float(m.group(1)) * {"B": 1, "KiB": 1 << 10, "MiB": MIB, "GiB": 1 << 30}[m.group(2)]


def test_speed_is_never_shown_above_the_cap() -> None:
    """A throttled download: a burst (the bucket's allowance) after a pause, then exactly
    the cap. The old two-frame rate showed the burst as 23 MiB/s under 20 MiB/s."""
    clock, stats, out = Clock(), Stats("http://o/f", "f", length=400 * MIB), io.StringIO()
    bar = ProgressBar(stats, stream=out, limit=20 * MIB, clock=clock)
    speeds = []
    for i in range(40):
        clock.t += 0.25
        stats.bytes_from_peers += 8 * MIB if i == 3 else 5 * MIB  # 20 MiB/s, one burst
        speeds.append(_speed(bar.line() or ""))
    assert max(speeds) <= 20 * MIB
    assert speeds[-1] > 19 * MIB  # and it does show the real rate once steady
    unlimited = ProgressBar(Stats("u", "o", length=10 * MIB), limit=0, clock=clock)
    unlimited.stats.bytes_from_origin = 10 * MIB
    clock.t += 0.5
    assert _speed(unlimited.line() or "") == pytest.approx(20 * MIB)


def test_no_frame_until_there_is_something_to_show() -> None:
    clock, stats, out = Clock(), Stats("http://o/f", "f"), io.StringIO()
    bar = ProgressBar(stats, stream=out, clock=clock)
    clock.t += 0.25
    bar.draw()
    assert out.getvalue() == "" and not bar.drawn  # not "0 B 0 B/s"
    stats.length = 4 * MIB
    clock.t += 0.25
    bar.draw()
    assert out.getvalue().startswith("\r[") and "0.0% 0 B/4.0 MiB" in out.getvalue()
    chunked = ProgressBar(Stats("u", "o", bytes_from_origin=MIB), stream=io.StringIO(), clock=clock)
    clock.t += 0.25
    assert (chunked.line() or "").startswith("[") and "<=>" in (chunked.line() or "")


async def test_the_bar_of_a_real_download_stays_under_the_cap(origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    size = 5 * MIB
    origin.put_random("bar.bin", size, seed=71)
    out = tmp_path / "bar.bin"
    r = await run_dfget("-u", origin.url("bar.bin"), "-o", str(out), "-p", "source", "-s", "2MB", "-b",
                        "--home", str(tmp_path / "h"))
    assert r.code == 0, r.stderr
    assert out.read_bytes() == file_bytes(size, 71)
    frames = [f.strip() for f in r.stderr.split("\r") if f.strip()]
    assert len(frames) >= 5, r.stderr
    assert all(f.startswith("[") for f in frames), frames  # every frame has a bar
    assert max(_speed(f) for f in frames) <= 2 * MIB, frames


# --- connection errors ---------------------------------------------------------------------
async def test_connection_errors_do_not_mention_tls(tmp_path: Path) -> None:
    dead = free_port()
    r = await run_dfget("-u", f"http://127.0.0.1:{dead}/x", "-o", str(tmp_path / "x"), "-n",
                        f"127.0.0.1:{dead}", "--notbs", "--no-serve", "--home", str(tmp_path / "h"))
    assert r.code == EXIT_NO_SUPERNODE
    assert "ssl" not in r.stderr.lower() and f"cannot connect to 127.0.0.1:{dead}: connection refused" in r.stderr
    r = await run_dfget("-u", f"http://127.0.0.1:{dead}/x", "-o", str(tmp_path / "x"), "-p", "source",
                        "--home", str(tmp_path / "h"))
    assert r.code == EXIT_ORIGIN
    assert "ssl" not in r.stderr.lower() and "connection refused" in r.stderr, r.stderr


async def test_describe_keeps_what_matters() -> None:
    dead = free_port()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await s.get(f"http://127.0.0.1:{dead}/")
    assert "ssl:default" in str(info.value)  # aiohttp's text, what users saw
    assert describe(info.value) == f"cannot connect to 127.0.0.1:{dead}: connection refused"
    assert describe(aiohttp.ClientPayloadError("Response payload is not completed")) == \
        "ClientPayloadError: Response payload is not completed"


# --- -o into a missing directory -----------------------------------------------------------
async def test_output_into_a_missing_directory_is_refused(origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    origin.put_random("d.bin", 70_000, seed=72)
    out = tmp_path / "missing" / "dir" / "out.bin"
    args = ["-u", origin.url("d.bin"), "-o", str(out), "-p", "source", "--home", str(tmp_path / "h")]
    r = await run_dfget(*args)
    assert r.code == EXIT_DISK, r.stderr
    assert r.stderr.strip() == (f"dfget: error: output directory {out.parent} does not exist "
                                "(pass --create-dirs to create it)")
    assert not (tmp_path / "missing").exists()
    assert origin.stats()["requests"] == 0  # refused before anything was fetched
    (tmp_path / "afile").write_text("x")
    r = await run_dfget(*args[:2], "-o", str(tmp_path / "afile" / "out.bin"), *args[4:])
    assert r.code == EXIT_DISK and "is not a directory" in r.stderr
    r = await run_dfget(*args, "--create-dirs")
    assert r.code == EXIT_OK, r.stderr
    assert out.read_bytes() == file_bytes(70_000, 72)


# --- the peer server dfget leaves running --------------------------------------------------
async def test_a_started_peer_server_is_announced_and_stops_on_request(origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    origin.put_random("p.bin", 50_000, seed=73)
    home = tmp_path / "home"
    args = ["-u", origin.url("p.bin"), "-n", f"127.0.0.1:{free_port()}", "--home", str(home),
            "--ip", "127.0.0.1"]
    try:
        r = await run_dfget(*args, "-o", str(tmp_path / "p1"))
        assert r.code == 0, r.stderr
        started = [ln for ln in r.stderr.splitlines() if "started a peer server" in ln]
        pid = server_pid(home)
        assert pid is not None and len(started) == 1, r.stderr
        assert started[0].startswith(f"dfget: started a peer server for {home} (pid {pid}, 127.0.0.1:")
        assert started[0].endswith(f"dfget server stop --home {home}")
        r = await run_dfget(*args, "-o", str(tmp_path / "p2"))  # reuses it: nothing to announce
        assert r.code == 0 and "started a peer server" not in r.stderr, r.stderr
        r = await run_dfget("server", "stop", "--home", str(home))
        assert r.code == 0 and r.stderr.strip() == f"dfget: stopped the peer server of {home} (pid {pid})"
        assert server_pid(home) is None  # exited, not merely unlocked
        r = await run_dfget("server", "stop", "--home", str(home))
        assert r.code == 0 and r.stderr.strip() == f"dfget: no peer server runs for {home}"
    finally:
        await stop_server(home)
