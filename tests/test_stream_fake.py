"""`dfget -o -` against the fake supernode (tests/dfget_support.py) with 64 KiB pieces:
dozens of pieces in flight arrive out of order and stdout is still the file; a failure
mid-way writes only verified bytes and exits non-zero."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from test_dfget_p2p import PIECE, Env, blob

from common.errors import EXIT_P2P_FAILED
from common.ranges import parse_range
from dfget_support import PY, start_app


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    yield e
    await e.close()


async def _stream(env: Env, url: str, *extra: str) -> tuple[int, bytes, str]:
    home = env.home()
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "dfget", "-u", url, "-o", "-", "-n", env.nodes(), "--home", str(home), "--ip", "127.0.0.1",
        *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out, err.decode()


async def test_many_small_pieces_out_of_order(env: Env) -> None:
    await env.start()
    data = blob(60 * PIECE + 123)
    url = env.add("many", data)
    code, out, err = await _stream(env, url, "--pull-limit", "16", "--notbs")
    assert code == 0, err
    assert out == data
    oks = [r.piece for _, r in env.sn[0].reports if r.result == "ok"]
    # every piece reported ok (a report may come twice: dfget sends a batch again when
    # the answer to the pull that carried it was lost, and the supernode ignores repeats)
    assert sorted(set(oks)) == list(range(61))
    # pieces were reported in another order than the file's at least once: they did
    # arrive out of order, and stdout still came out right
    assert oks != sorted(oks)


async def test_failure_mid_way_writes_only_verified_bytes(env: Env) -> None:
    await env.start()
    sn = env.sn[0]
    data = blob(12 * PIECE)
    url = env.add("bad", data)

    async def piece(request: web.Request) -> web.Response:  # pieces 0 and 1 good, the rest corrupt
        task = sn._task(request)
        assert task is not None
        rng = parse_range(request.headers["Range"], len(task.data))
        body = task.data[rng.start:rng.end + 1]
        if rng.start >= 2 * PIECE:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        return web.Response(status=206, body=body, headers={"Content-Range": rng.content_range(len(task.data))})

    sn.cdn_piece = piece  # type: ignore[method-assign]
    runner, sn.port = await start_app(sn.app())  # a second app with the corrupting handler
    env.runners.append(runner)
    code, out, err = await _stream(env, url, "--notbs", "--pull-limit", "4")
    assert code == EXIT_P2P_FAILED, err
    assert out == data[:len(out)]  # a verified prefix, nothing after it
    assert len(out) == 2 * PIECE  # the two good pieces were verified: they went out



async def test_back_to_source_streams_the_checked_file(env: Env) -> None:
    await env.start()
    data = blob(9 * PIECE + 5)
    url = env.add("src", data)
    env.sn[0].corrupt_cdn = True  # every piece fails: dfget goes to the origin
    code, out, err = await _stream(env, url, "--pull-limit", "4")
    assert code == 0, err
    assert out == data
    assert "downloading from the origin" in err
    # a --range the same way: cut from the origin's whole file
    code, out, err = await _stream(env, url, "--range", f"bytes={PIECE - 2}-{PIECE + 2}")
    assert code == 0, err
    assert out == data[PIECE - 2:PIECE + 3]
