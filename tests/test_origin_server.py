"""bench/origin.py does what each mode says: the other tests trust it to misbehave exactly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from bench.origin import OriginServer, parse_modes, safe_path, select_range
from conftest import OriginProc, file_bytes, http_get

SIZE = 1000
DATA = file_bytes(SIZE, seed=1)


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[OriginServer]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(DATA)
    (root / "empty").write_bytes(b"")
    async with OriginServer(root) as o:
        yield o


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


async def get(http: aiohttp.ClientSession, url: str, **headers: str
              ) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.get(url, headers=headers, allow_redirects=False) as r:
        return r.status, r.headers.copy(), await r.read()


async def read_until_error(http: aiohttp.ClientSession, url: str) -> tuple[bytes, Exception | None]:
    got = bytearray()
    try:
        async with http.get(url) as r:
            async for chunk in r.content.iter_any():
                got += chunk
    except aiohttp.ClientPayloadError as exc:
        return bytes(got), exc
    return bytes(got), None


# --- plain serving -------------------------------------------------------------------------
async def test_plain_get_has_validators_and_is_counted(srv: OriginServer, http) -> None:
    st = os.stat(srv.root / "f")
    status, h, body = await get(http, srv.url("f"))
    assert (status, body) == (200, DATA)
    assert h["Content-Length"] == str(SIZE)
    assert h["ETag"] == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    assert h["Last-Modified"] == formatdate(int(st.st_mtime), usegmt=True)
    assert h["Accept-Ranges"] == "bytes"
    assert "Content-Encoding" not in h
    j = srv.stats.to_json()
    assert j["bytes_sent"] == SIZE and j["requests"] == 1
    assert j["by_file"]["f"]["bytes"] == SIZE and j["by_file"]["f"]["requests"] == 1


async def test_head_sends_no_body_but_counts_the_request(srv: OriginServer, http) -> None:
    async with http.head(srv.url("f")) as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(SIZE)
        assert await r.read() == b""
    assert srv.stats.requests == 1 and srv.stats.bytes_sent == 0


async def test_zero_length_file(srv: OriginServer, http) -> None:
    status, h, body = await get(http, srv.url("empty"))
    assert (status, h["Content-Length"], body) == (200, "0", b"")


async def test_missing_file_is_404(srv: OriginServer, http) -> None:
    assert (await get(http, srv.url("nope")))[0] == 404


async def test_large_file_goes_through_sendfile_intact(srv: OriginServer, http) -> None:
    big = file_bytes(20 << 20, seed=7)
    (srv.root / "big").write_bytes(big)
    status, _, body = await get(http, srv.url("big"))
    assert status == 200 and body == big
    assert srv.stats.bytes_sent == len(big)


# --- traversal -------------------------------------------------------------------------------
@pytest.mark.parametrize("raw_path", [
    "/files/../secret",
    "/files/%2e%2e/secret",
    "/files/..%2fsecret",
    "/files/sub/../../secret",
    "/files//etc/passwd",
    "/files/%2fetc%2fpasswd",
    "/files/f%00",
    "/files/link",
    "/files/sub",
])
async def test_traversal_is_404(tmp_path: Path, http, raw_path: str) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"SECRET")
    (root / "f").write_bytes(b"x")
    (root / "link").symlink_to(tmp_path / "secret")
    async with OriginServer(root) as o:
        url = URL(o.base + raw_path, encoded=True)
        async with http.get(url, allow_redirects=False) as r:
            body = await r.read()
        assert r.status == 404, (raw_path, r.status)
        assert b"SECRET" not in body
        assert o.stats.bytes_sent == 0


@pytest.mark.parametrize("name,ok", [
    ("f", True), ("sub/g", True), ("../secret", False), ("sub/../f", False),
    ("/etc/passwd", False), ("f\x00", False), ("", False), (".", False), ("sub", False),
    ("link", False), ("sub\\..\\f", False), ("sub//g", False),
])
def test_safe_path(tmp_path: Path, name: str, ok: bool) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "f").write_bytes(b"x")
    (root / "sub" / "g").write_bytes(b"y")
    (tmp_path / "secret").write_bytes(b"s")
    (root / "link").symlink_to(tmp_path / "secret")
    assert (safe_path(root.resolve(), name) is not None) is ok


# --- ranges and conditionals ---------------------------------------------------------------
@pytest.mark.parametrize("header,status,start,end", [
    ("bytes=0-9", 206, 0, 9),
    ("bytes=10-", 206, 10, SIZE - 1),
    ("bytes=-10", 206, SIZE - 10, SIZE - 1),
    ("bytes=-5000", 206, 0, SIZE - 1),
    ("bytes=990-5000", 206, 990, SIZE - 1),
    ("bytes=999-999", 206, 999, 999),
    ("bytes=1000-", 416, None, None),
    ("bytes=-0", 416, None, None),
    ("bytes=0-1,5-6", 200, 0, SIZE - 1),  # multi-range ignored: whole body
    ("bytes=5-2", 200, 0, SIZE - 1),
    ("items=0-9", 200, 0, SIZE - 1),
    ("garbage", 200, 0, SIZE - 1),
])
async def test_range(srv: OriginServer, http, header: str, status: int, start, end) -> None:
    st, h, body = await get(http, srv.url("f"), Range=header)
    assert st == status
    if status == 206:
        assert body == DATA[start:end + 1]
        assert h["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
        assert h["Content-Length"] == str(end - start + 1)
    elif status == 416:
        assert h["Content-Range"] == f"bytes */{SIZE}"
    else:
        assert body == DATA and "Content-Range" not in h
    assert srv.stats.bytes_sent == len(body)


async def test_range_on_empty_file_is_416(srv: OriginServer, http) -> None:
    assert (await get(http, srv.url("empty"), Range="bytes=0-"))[0] == 416


async def test_if_range(srv: OriginServer, http) -> None:
    _, h, _ = await get(http, srv.url("f"))
    etag, lm = h["ETag"], h["Last-Modified"]
    old = formatdate(0, usegmt=True)
    cases = [(etag, 206), ('"other"', 200), (lm, 206), (old, 200), ("W/" + etag, 200),
             ("not a date", 200)]
    for validator, want in cases:
        st, _, body = await get(http, srv.url("f"), Range="bytes=0-9", **{"If-Range": validator})
        assert st == want, validator
        assert body == (DATA[:10] if want == 206 else DATA)


async def test_conditional_get(srv: OriginServer, http) -> None:
    _, h, _ = await get(http, srv.url("f"))
    etag, lm = h["ETag"], h["Last-Modified"]
    future, past = formatdate(time.time() + 3600, usegmt=True), formatdate(0, usegmt=True)
    cases = [
        ({"If-None-Match": etag}, 304), ({"If-None-Match": f'"x", {etag}'}, 304),
        ({"If-None-Match": "W/" + etag}, 304), ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"x"'}, 200),
        ({"If-Modified-Since": lm}, 304), ({"If-Modified-Since": future}, 304),
        ({"If-Modified-Since": past}, 200),
        ({"If-None-Match": '"x"', "If-Modified-Since": future}, 200),  # INM wins
    ]
    for headers, want in cases:
        st, h2, body = await get(http, srv.url("f"), **headers)
        assert st == want, headers
        assert body == (b"" if want == 304 else DATA)
        if want == 304:
            assert h2["ETag"] == etag


# --- misbehaviour modes ----------------------------------------------------------------------
async def test_chunked_has_no_content_length(srv: OriginServer, http) -> None:
    st, h, body = await get(http, srv.url("f", mode="chunked"))
    assert (st, body) == (200, DATA)
    assert "Content-Length" not in h and h["Transfer-Encoding"] == "chunked"


async def test_eof_is_close_delimited(srv: OriginServer, http) -> None:
    st, h, body = await get(http, srv.url("f", mode="eof"))
    assert (st, body) == (200, DATA)
    assert "Content-Length" not in h and "Transfer-Encoding" not in h
    assert h["Connection"].lower() == "close"
    assert srv.stats.bytes_sent == SIZE


@pytest.mark.parametrize("mode,sent", [
    ("short", SIZE // 2), ("fail_after=100", 100), ("fail_after=0", 0),
    ("chunked,fail_after=300", 300), ("chunked,short", SIZE // 2),
])
async def test_truncating_modes_break_the_body(srv: OriginServer, http, mode, sent) -> None:
    got, exc = await read_until_error(http, srv.url("f", mode=mode))
    assert exc is not None, "the client must see a broken body"
    assert got == DATA[:sent]
    assert srv.stats.bytes_sent == sent


async def test_eof_short_looks_complete_to_a_client(srv: OriginServer, http) -> None:
    # close-delimited: nothing can tell the client the body was cut; only a known length can
    got, exc = await read_until_error(http, srv.url("f", mode="eof,short"))
    assert exc is None and got == DATA[: SIZE // 2]


async def test_long_sends_extra_bytes_after_content_length(srv: OriginServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET /files/f?mode=long=50 HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 10)  # until the server closes
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head
    assert len(body) == SIZE + 50 and body[:SIZE] == DATA
    assert srv.stats.bytes_sent == SIZE + 50


async def test_long_reads_as_declared_length_with_aiohttp(srv: OriginServer, http) -> None:
    st, _, body = await get(http, srv.url("f", mode="long"))
    assert (st, body) == (200, DATA)


async def test_stall_after_sends_then_hangs(srv: OriginServer, http) -> None:
    async with http.get(srv.url("f", mode="stall_after=100")) as r:
        assert await r.content.readexactly(100) == DATA[:100]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r.content.read(1), 0.3)
    assert srv.stats.bytes_sent == 100


@pytest.mark.parametrize("code", [404, 401, 403, 407, 429, 500, 503])
async def test_status_mode(srv: OriginServer, http, code: int) -> None:
    assert (await get(http, srv.url("f", mode=f"status={code}")))[0] == code
    assert srv.stats.bytes_sent == 0


async def test_times_limits_failures_to_the_first_requests(srv: OriginServer, http) -> None:
    statuses = [(await get(http, srv.url("f", mode="status=503", times=2)))[0] for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    got, exc = await read_until_error(http, srv.url("f", mode="short", times=1))
    assert exc is not None
    got, exc = await read_until_error(http, srv.url("f", mode="short", times=1))
    assert exc is None and got == DATA


async def test_slow_trickles(srv: OriginServer, http) -> None:
    t0 = time.monotonic()
    st, _, body = await get(http, srv.url("f", mode="slow=4000"))
    assert (st, body) == (200, DATA)
    assert time.monotonic() - t0 >= 0.2  # 1000 B at 4000 B/s: 9 pauses of 25 ms


async def test_delay_holds_the_headers(srv: OriginServer, http) -> None:
    t0 = time.monotonic()
    assert (await get(http, srv.url("f", mode="delay=0.3")))[0] == 200
    assert time.monotonic() - t0 >= 0.3


async def test_changing_content_and_etag(srv: OriginServer, http) -> None:
    results = [await get(http, srv.url("f", mode="changing")) for _ in range(3)]
    etags = [h["ETag"] for _, h, _ in results]
    bodies = [b for _, _, b in results]
    assert bodies[0] == DATA
    assert len(set(etags)) == 3
    assert len(set(bodies)) == 3 and all(len(b) == SIZE for b in bodies)
    assert all(b1 != b2 for b1, b2 in zip(bodies[0], bodies[1]))  # every byte differs
    lms = [h["Last-Modified"] for _, h, _ in results]
    assert lms[0] != lms[1]
    # a resume with the first validator must not be answered with a splice
    st, _, body = await get(http, srv.url("f", mode="changing"), Range="bytes=500-",
                            **{"If-Range": etags[0]})
    assert st == 200 and len(body) == SIZE and body != DATA


async def test_changing_after_k(srv: OriginServer, http) -> None:
    etags = [(await get(http, srv.url("f", mode="changing=2")))[1]["ETag"] for _ in range(3)]
    assert etags[0] == etags[1] != etags[2]


async def test_changing_range_is_consistent_within_a_version(srv: OriginServer, http) -> None:
    _, h, full = await get(http, srv.url("f", mode="changing=0"))
    assert full != DATA
    st, _, part = await get(http, srv.url("f", mode="changing=0"), Range="bytes=10-19")
    assert st == 206 and len(part) == 10


async def test_norange_ignores_range(srv: OriginServer, http) -> None:
    st, h, body = await get(http, srv.url("f", mode="norange"), Range="bytes=0-9")
    assert (st, body) == (200, DATA) and "Content-Range" not in h


@pytest.mark.parametrize("rng,shown", [("bytes=0-9", "bytes 1-10/1000"),
                                       ("bytes=10-19", "bytes 9-18/1000")])
async def test_badrange_lies_in_content_range(srv: OriginServer, http, rng, shown) -> None:
    st, h, body = await get(http, srv.url("f", mode="badrange"), Range=rng)
    start, end = (int(x) for x in rng[6:].split("-"))
    assert st == 206 and body == DATA[start:end + 1] and h["Content-Range"] == shown


async def test_novalidators(srv: OriginServer, http) -> None:
    _, h, _ = await get(http, srv.url("f", mode="novalidators"))
    assert "ETag" not in h and "Last-Modified" not in h


async def test_etag_override(srv: OriginServer, http) -> None:
    _, h, _ = await get(http, srv.url("f", etag="abc"))
    assert h["ETag"] == '"abc"'
    assert (await get(http, srv.url("f", etag="abc"), **{"If-None-Match": '"abc"'}))[0] == 304
    st, _, body = await get(http, srv.url("f", etag="abc"), Range="bytes=0-0",
                            **{"If-Range": '"abc"'})
    assert (st, body) == (206, DATA[:1])


async def test_encoding_is_declared_but_bytes_untouched(srv: OriginServer, http) -> None:
    _, h, body = await get(http, srv.url("f", encoding="gzip"))
    assert h["Content-Encoding"] == "gzip" and body == DATA


async def test_require_header(srv: OriginServer, http) -> None:
    url = srv.url("f", require_header="Authorization:Bearer t0k")
    assert (await get(http, url))[0] == 401
    assert (await get(http, url, Authorization="Bearer wrong"))[0] == 401
    st, _, body = await get(http, url, Authorization="Bearer t0k")
    assert (st, body) == (200, DATA)
    assert srv.stats.by_file["f"].last_headers["Authorization"] == "Bearer t0k"


async def test_redirects(srv: OriginServer, http) -> None:
    st, h, _ = await get(http, srv.url("f", redirect="http://169.254.169.254/x"))
    assert st == 302 and h["Location"] == "http://169.254.169.254/x"
    st, h, _ = await get(http, srv.url("f", redirects=3))
    assert st == 302 and "redirects=2" in h["Location"]
    async with http.get(srv.url("f", redirects=3)) as r:
        assert r.status == 200 and await r.read() == DATA
        assert len(r.history) == 3


@pytest.mark.parametrize("mode", ["bogus", "status=99", "status=abc", "fail_after=-1",
                                  "slow=0", "chunked=1"])
async def test_bad_mode_is_400(srv: OriginServer, http, mode: str) -> None:
    assert (await get(http, srv.url("f", mode=mode)))[0] == 400


def test_parse_modes() -> None:
    m = parse_modes(["chunked,fail_after=5", "changing"])
    assert m.chunked and m.fail_after == 5 and m.changing == 1 and m.failing()
    assert not parse_modes([]).failing()
    assert parse_modes(["long"]).long == 1024


@pytest.mark.parametrize("header,size,want", [
    (None, 10, None), ("bytes=0-0", 10, (0, 1)), ("bytes=-3", 10, (7, 3)),
    ("bytes=9-", 10, (9, 1)), ("bytes=10-", 10, "416"), ("bytes=0-", 0, "416"),
    ("bytes=-1", 0, "416"), ("bytes=-", 10, None), ("bytes=a-b", 10, None),
    ("bytes=0-1,2-3", 10, None),
])
def test_select_range(header, size, want) -> None:
    assert select_range(header, size) == want


# --- global rate and stats ---------------------------------------------------------------------
async def test_rate_is_shared_by_all_connections(tmp_path: Path, http) -> None:
    (tmp_path / "a").write_bytes(file_bytes(150_000, 2))
    (tmp_path / "b").write_bytes(file_bytes(150_000, 3))
    async with OriginServer(tmp_path, rate=200_000) as o:
        t0 = time.monotonic()
        res = await asyncio.gather(get(http, o.url("a")), get(http, o.url("b")))
        elapsed = time.monotonic() - t0
        assert [len(b) for _, _, b in res] == [150_000, 150_000]
        # 300 kB minus a 64 KiB burst at 200 kB/s: >= 1.17 s; per-connection would be ~0.4 s
        assert elapsed >= 1.0
        assert o.stats.bytes_sent == 300_000


async def test_stats_endpoints(srv: OriginServer, http) -> None:
    await get(http, srv.url("f"))
    await get(http, srv.url("f"), Range="bytes=0-9")
    await get(http, srv.url("empty"))
    async with http.get(srv.base + "/_stats") as r:
        j = await r.json()
    assert j["bytes_sent"] == SIZE + 10 and j["requests"] == 3
    assert j["by_file"]["f"]["bytes"] == SIZE + 10 and j["by_file"]["f"]["requests"] == 2
    assert j["by_file"]["empty"] == {**j["by_file"]["empty"], "bytes": 0, "requests": 1}
    async with http.post(srv.base + "/_stats/reset") as r:
        assert r.status == 200
    async with http.get(srv.base + "/_stats") as r:
        assert await r.json() == {"bytes_sent": 0, "requests": 0, "by_file": {}}


# --- the subprocess, as the other tests use it -----------------------------------------------------
def test_origin_fixture_end_to_end(origin: OriginProc) -> None:
    origin.put("sub/x.bin", DATA)
    status, body = http_get(origin.url("sub/x.bin"))
    assert (status, body) == (200, DATA)
    assert http_get(origin.url("sub/x.bin", mode="status=404"))[0] == 404
    s = origin.stats()
    assert s["bytes_sent"] == SIZE and s["requests"] == 2
    assert s["by_file"]["sub/x.bin"]["requests"] == 2
    origin.reset()
    assert origin.stats()["requests"] == 0


def test_origin_process_stops_cleanly_on_sigterm(origin: OriginProc) -> None:
    origin.runner.signal(signal.SIGTERM)
    assert origin.runner.proc is not None
    assert origin.runner.proc.wait(10) == 0


def test_origin_cli_rate(origin_factory) -> None:
    o = origin_factory(rate=100_000)
    o.put("r", file_bytes(150_000, 4))
    t0 = time.monotonic()
    status, body = http_get(o.url("r"), timeout=20)
    assert status == 200 and len(body) == 150_000
    assert time.monotonic() - t0 >= 0.7  # (150000 - 65536) / 100000
