"""CLI arguments and the exit codes that do not need a supernode."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from common.errors import EXIT_BAD_ARGS, EXIT_DISK, EXIT_ORIGIN, EXIT_TIMEOUT
from dfget.config import ConfigError, Node, parse_headers, parse_nodes
from dfget_support import origin_app, run_dfget, start_app


def test_nodes_ordered_by_weight_then_as_given() -> None:
    nodes = parse_nodes("a:1=1,b=5,c:3,d:4=5")
    assert [n.host for n in nodes] == ["b", "d", "a", "c"]
    assert nodes[0] == Node("b", 8002, 5)
    with pytest.raises(ConfigError):
        parse_nodes("a:99999")
    with pytest.raises(ConfigError):
        parse_headers(["no-colon"])


@pytest.mark.parametrize("args", [
    [], ["-u", "ftp://x/y", "-o", "o"], ["-u", "http://x/y", "-n", "h:0"],
    ["-u", "http://x/y", "-m", "xyz"], ["-u", "http://x/y", "--header", "bad"],
    ["-u", "http://x/y", "-s", "lots"], ["-u", "http://x/y", "-p", "torrent"],
    ["-u", "http://x/y", "-e", "soon"], ["--bogus"],
])
async def test_bad_arguments_exit_2(args: list[str], tmp_path: Path) -> None:
    r = await run_dfget(*args, "--home", str(tmp_path / "h"))
    assert r.code == EXIT_BAD_ARGS, r
    assert "Traceback" not in r.stderr


async def test_version() -> None:
    r = await run_dfget("version")
    assert r.code == 0 and r.stdout.startswith("dfget ")


@pytest.fixture
async def origin() -> AsyncIterator[tuple[int, web.Application]]:
    files = {"/f": os.urandom(100_000)}
    app = origin_app(files, required_header=("Authorization", "Bearer t"))
    runner, port = await start_app(app)
    yield port, app
    await runner.cleanup()


async def test_source_pattern_uses_headers_and_401_is_origin_error(origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, _ = origin
    url = f"http://127.0.0.1:{port}/f"
    base = ["-u", url, "-p", "source", "--home", str(tmp_path / "h"), "--json"]
    r = await run_dfget(*base, "-o", str(tmp_path / "a"), "--header", "Authorization: Bearer t")
    assert r.code == 0, r.stderr
    assert r.report["back_to_source"] == "pattern source"
    r = await run_dfget(*base, "-o", str(tmp_path / "b"))
    assert r.code == EXIT_ORIGIN
    assert len(r.stderr.strip().splitlines()) == 1 and "401" in r.stderr
    assert not (tmp_path / "b").exists()


async def test_disk_error_exit_7(origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, _ = origin
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    # root ignores mode bits; sysfs refuses file creation (EACCES) even to root
    target = ro / "x" if not os.access(ro, os.W_OK) else Path("/sys/kernel/dfget-test-out")
    r = await run_dfget("-u", f"http://127.0.0.1:{port}/f", "-p", "source", "-o", str(target),
                        "--home", str(tmp_path / "h"), "--header", "Authorization: Bearer t")
    assert r.code == EXIT_DISK, r.stderr


async def test_disk_full_exit_7(origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    port, _ = origin
    link = tmp_path / "out"
    # The temp file sits next to the output; pointing it at /dev/full makes every write fail.
    from common.taskid import task_id
    from dfget.output import part_path

    url = f"http://127.0.0.1:{port}/f"
    part_path(link, task_id(url)).symlink_to("/dev/full")
    r = await run_dfget("-u", url, "-p", "source", "-o", str(link), "--home", str(tmp_path / "h"),
                        "--header", "Authorization: Bearer t")
    assert r.code == EXIT_DISK, r.stderr
    assert "Traceback" not in r.stderr and not link.exists()


async def test_timeout_exit_6(tmp_path: Path) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 10_000
        await resp.prepare(request)
        await resp.write(b"x")
        import asyncio
        await asyncio.sleep(5)
        return resp

    app = web.Application()
    app.router.add_get("/f", slow)
    runner, port = await start_app(app)
    try:
        r = await run_dfget("-u", f"http://127.0.0.1:{port}/f", "-p", "source", "-e", "1s",
                            "-o", str(tmp_path / "o"), "--home", str(tmp_path / "h"))
        assert r.code == EXIT_TIMEOUT, r.stderr
        assert not (tmp_path / "o").exists()
    finally:
        await runner.cleanup()


def test_default_flags_put_no_cap_on_a_download() -> None:
    """v1's 20 MB/s default made one download 33x slower than curl on a fast link: by
    default nothing throttles, and -s / --totallimit still set a cap when given."""
    from dfget.cli import download_cmd
    from dfget.config import DownloadConfig, parse_rate
    from dfget.download import _throttles

    ctx = download_cmd.make_context("dfget", ["-u", "http://x/y"])
    assert parse_rate(ctx.params["locallimit"], "-s") == 0
    assert parse_rate(ctx.params["totallimit"], "--totallimit") == 0
    cfg = DownloadConfig(url="http://x/y", output=Path("o"), home=Path("h"))
    assert _throttles(cfg) == ()
    ctx = download_cmd.make_context("dfget", ["-u", "http://x/y", "-s", "20MB", "--totallimit", "1G"])
    capped = DownloadConfig(url="http://x/y", output=Path("o"), home=Path("h"),
                            locallimit=parse_rate(ctx.params["locallimit"], "-s"),
                            totallimit=parse_rate(ctx.params["totallimit"], "--totallimit"))
    assert [t.bucket.rate for t in _throttles(capped)] == [20 << 20, 1 << 30]
