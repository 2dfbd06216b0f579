"""A peer server that lies, for the proof-of-possession tests (tests/test_pop_e2e.py):
it claims pieces it does not have. `--mode garbage` answers every challenge and piece
request with random bytes; `--mode slow` waits `--delay` seconds before answering a
challenge. `GET /count` says how many piece requests it got (it must get none once the
supernode dropped it). Run: python tests/pop_fake_peer.py --port P --mode garbage"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["garbage", "slow"], required=True)
    ap.add_argument("--delay", type=float, default=5.0)
    args = ap.parse_args()
    counts = {"piece_requests": 0, "challenges": 0}

    async def challenge(request: web.Request) -> web.Response:
        counts["challenges"] += 1
        if args.mode == "slow":
            await asyncio.sleep(args.delay)
        return web.json_response({"answer": os.urandom(32).hex()})

    async def piece(request: web.Request) -> web.Response:
        counts["piece_requests"] += 1
        return web.Response(status=206, body=os.urandom(1024))

    async def count(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(counts), content_type="application/json")

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/peer/pop/{task_id}", challenge)
    app.router.add_get("/peer/file/{task_id}", piece)
    app.router.add_get("/count", count)
    app.router.add_get("/_ping", ping)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
