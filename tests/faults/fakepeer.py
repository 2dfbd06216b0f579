"""A hostile peer for the fault suite, run as its own process:

    python -m tests.faults.fakepeer --supernode URL --url FILE_URL --mode corrupt|liar \\
        --data PATH --ready PATH

It registers with the supernode through the real API as a peer of the task, waits for
the CDN to have the file, then claims every piece (`have` reports: the supernode takes
a client's word for pieces it holds from an earlier run). Asked for a piece it then
  corrupt  answers 206 with the right length and Content-Range, one byte flipped;
  liar     answers 404: it advertised pieces it does not have.
GET /_stats -> {"requests": N}. The ready file gets {"port", "cid", "peer_id", "task_id"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from common.ranges import RangeSyntaxError, RangeUnsatisfiable, parse_range
from common.taskid import new_id

REQUESTS: web.AppKey[list[int]] = web.AppKey("requests", list)


def make_app(mode: str, data: bytes) -> web.Application:
    async def piece(request: web.Request) -> web.Response:
        request.app[REQUESTS][0] += 1
        if mode == "liar":
            return web.json_response({"error": "not_found", "message": "piece not held"}, status=404)
        try:
            rng = parse_range(request.headers.get("Range", ""), len(data))
        except (RangeSyntaxError, RangeUnsatisfiable):
            return web.json_response({"error": "bad_request", "message": "range"}, status=400)
        body = bytearray(data[rng.start:rng.end + 1])
        body[len(body) // 2] ^= 0xFF
        return web.Response(status=206, body=bytes(body),
                            headers={"Content-Range": rng.content_range(len(data))})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": request.app[REQUESTS][0]})

    app = web.Application()
    app[REQUESTS] = [0]
    app.router.add_get("/peer/file/{task_id}", piece)
    app.router.add_get("/_stats", stats)
    return app


async def _json(session: aiohttp.ClientSession, method: str, url: str, body: object = None) -> dict:  # type: ignore[type-arg]
    async with session.request(method, url, json=body) as resp:
        out = await resp.json()
        if resp.status != 200:
            raise SystemExit(f"fakepeer: {method} {url}: HTTP {resp.status} {out}")
        return out  # type: ignore[no-any-return]


async def claim_everything(sn: str, url: str, port: int) -> dict[str, object]:
    peer_id = new_id()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        reg = await _json(s, "POST", f"{sn}/api/v1/tasks",
                          {"url": url, "peer": {"peer_id": peer_id, "ip": "127.0.0.1", "port": port}})
        tid, cid = reg["task"]["task_id"], reg["cid"]
        for _ in range(600):  # the CDN must know a piece before anyone may claim it
            dig = await _json(s, "GET", f"{sn}/api/v1/tasks/{tid}/digests")
            if dig["task"]["status"] == "success":
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("fakepeer: the CDN did not finish the file")
        count = dig["task"]["piece_count"]
        for first in range(0, count, 64):
            await _json(s, "POST", f"{sn}/api/v1/tasks/{tid}/report",
                        {"cid": cid, "reports": [{"piece": n, "result": "have"}
                                                 for n in range(first, min(count, first + 64))]})
    return {"port": port, "cid": cid, "peer_id": peer_id, "task_id": tid}


async def main(args: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(args.mode, Path(args.data).read_bytes()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        info = await claim_everything(args.supernode, args.url, port)
        tmp = f"{args.ready}.tmp"
        Path(tmp).write_text(json.dumps(info))
        os.replace(tmp, args.ready)
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m tests.faults.fakepeer")
    p.add_argument("--supernode", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=["corrupt", "liar"], required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--ready", required=True)
    asyncio.run(main(p.parse_args()))
