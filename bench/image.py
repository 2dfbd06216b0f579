"""Container image pulls through dfdaemon against skopeo straight from the registry.

    python -m bench.image [--hosts 1,4,8] [--layers 3] [--layer-mib 16] [--registry-rate 32]

For each N: a fresh image of random layers is pushed to Debian's docker-registry (the CNCF
distribution registry), behind a relay that counts every blob byte and caps the
registry's upload at --registry-rate MiB/s in total (a registry's bandwidth is what a
swarm saves; on loopback an uncapped registry is as fast as the peers). Then N skopeo
pull it at once:
- *direct*: straight from the (capped) registry;
- *dfdaemon*: each through its own dfdaemon (own --home, peer server and 127.0.0.x), one
  supernode (embedded store).
Reported per N: pull time p50/max (whole skopeo command, daemons already running),
registry blob bytes over the image's size, and for dfdaemon the share of layer bytes the
hosts got from peers. Writes bench/results/image.md and image.json with date and commit.
Needs docker-registry and skopeo (apt-get install docker-registry skopeo).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from bench import oci
from bench.oci import sha256, write_layout
from bench.swarm import code_version
from dfget.throttle import Throttle

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
PY = sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def make_layout(layout: Path, tag: str, layers: list[bytes]) -> int:
    """An OCI layout of uncompressed random layers; returns the blob bytes (layers+config)."""
    return sum(map(len, layers)) + len(write_layout(layout, tag, layers))


class Relay:
    """Reverse proxy in front of the registry: counts blob GET bytes, caps them in total."""

    def __init__(self, upstream: str, rate: float) -> None:
        self.upstream = upstream
        self.throttle = Throttle(rate)
        self.blob_bytes = 0
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "connection")]
        body = await request.read()
        blob = request.method == "GET" and "/blobs/sha256:" in request.path
        async with self.session.request(request.method, self.upstream + str(request.rel_url), headers=headers,
                                        data=body or None, allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers=CIMultiDict(
                (k, v) for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection")))
            await resp.prepare(request)
            if request.method != "HEAD":
                async for chunk in up.content.iter_chunked(64 << 10):
                    if blob:
                        await self.throttle.consume(len(chunk))
                        self.blob_bytes += len(chunk)
                    await resp.write(chunk)
            await resp.write_eof()
            return resp


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()


async def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout}s")


class Skopeo(oci.Skopeo):
    async def run(self, *args: str, timeout: float = 600) -> tuple[int, str, float]:
        return await self.run_timed(*args, timeout=timeout)

    async def pull(self, hostport: str, ref: str, dest: Path) -> tuple[int, str, float]:
        return await self.run("copy", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers",
                              f"docker://{hostport}/{ref}", f"oci:{dest}:{ref.rsplit(':', 1)[1]}")


def metrics_of(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


@dataclass
class Row:
    hosts: int
    image_mib: float
    direct_p50_s: float
    direct_max_s: float
    direct_registry_x: float
    dfdaemon_p50_s: float
    dfdaemon_max_s: float
    dfdaemon_registry_x: float
    from_peers_pct: float
    ok: bool
    measured: str
    commit: str


async def scenario(n: int, args: argparse.Namespace, work: Path, registry_port: int, skopeo: Skopeo) -> Row:
    from dfget.server.launcher import stop_server

    layers = [os.urandom(args.layer_mib * MIB) for _ in range(args.layers)]
    name, tag = f"bench/n{n}", "v1"
    size = make_layout(work / f"layout-n{n}", tag, layers)
    rc, out, _ = await skopeo.run("copy", "--preserve-digests", "--dest-tls-verify=false",
                                  f"oci:{work / f'layout-n{n}'}:{tag}", f"docker://127.0.0.1:{registry_port}/{name}:{tag}")
    if rc:
        raise RuntimeError(f"push failed: {out}")
    want = {sha256(b) for b in layers}
    relay = Relay(f"http://127.0.0.1:{registry_port}", args.registry_rate * MIB)
    await relay.start()
    procs = Procs()
    homes: list[Path] = []
    ok = True
    try:
        # direct: N skopeo straight from the capped registry
        res = await asyncio.gather(*(skopeo.pull(f"127.0.0.1:{relay.port}", f"{name}:{tag}",
                                                 work / f"direct-n{n}-{k}") for k in range(n)))
        ok &= all(r[0] == 0 for r in res)
        direct_times = [r[2] for r in res]
        direct_bytes, relay.blob_bytes = relay.blob_bytes, 0
        for k in range(n):
            shutil.rmtree(work / f"direct-n{n}-{k}", ignore_errors=True)
        # dfdaemon: one supernode, N daemons on their own addresses and homes
        sn_port = free_port()
        procs.start([PY, "-m", "supernode", "--listen", "127.0.0.1", "--port", str(sn_port), "--download-port", "0",
                     "--home", str(work / f"sn-n{n}"), "--advertise-ip", "127.0.0.1",
                     "--allow-origin", "127.0.0.0/8", "--allow-peer", "127.0.0.0/8"], work / f"sn-n{n}.log")
        await wait_http(f"http://127.0.0.1:{sn_port}/_ping")
        daemons = []
        for k in range(n):
            ip = f"127.0.0.{30 + k}"
            port = free_port(ip)
            home = work / f"n{n}-host{k}"
            homes.append(home)
            procs.start([PY, "-m", "dfdaemon", "--registry", f"http://127.0.0.1:{relay.port}", "--listen", ip,
                         "--port", str(port), "--ip", ip, "--home", str(home), "-n", f"127.0.0.1:{sn_port}"],
                        home / "dfdaemon.log")
            daemons.append(f"{ip}:{port}")
        for d in daemons:
            await wait_http(f"http://{d}/_ping")
        res = await asyncio.gather(*(skopeo.pull(d, f"{name}:{tag}", work / f"p2p-n{n}-{k}")
                                     for k, d in enumerate(daemons)))
        for k, r in enumerate(res):
            got = {p.name for p in (work / f"p2p-n{n}-{k}" / "blobs" / "sha256").glob("*")} if r[0] == 0 else set()
            if r[0] != 0 or not want <= got:
                ok = False
                print(f"N={n} host {k}: pull failed: {r[1][-500:]}", file=sys.stderr)
        p2p_times = [r[2] for r in res]
        peer = seed = 0.0
        async with aiohttp.ClientSession() as s:
            for d in daemons:
                async with s.get(f"http://{d}/metrics") as r:
                    m = metrics_of(await r.text())
                peer += m.get('dfdaemon_blob_bytes_total{source="peer"}', 0.0)
                seed += m.get('dfdaemon_blob_bytes_total{source="supernode"}', 0.0)
                seed += m.get('dfdaemon_blob_bytes_total{source="origin"}', 0.0)
        return Row(
            hosts=n, image_mib=round(size / MIB, 2),
            direct_p50_s=round(statistics.median(direct_times), 2), direct_max_s=round(max(direct_times), 2),
            direct_registry_x=round(direct_bytes / size, 2),
            dfdaemon_p50_s=round(statistics.median(p2p_times), 2), dfdaemon_max_s=round(max(p2p_times), 2),
            dfdaemon_registry_x=round(relay.blob_bytes / size, 2),
            from_peers_pct=round(100 * peer / (peer + seed), 1) if peer + seed else 0.0,
            ok=ok, measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=code_version())
    finally:
        procs.stop_all()
        for home in homes:
            with contextlib.suppress(Exception):
                await stop_server(home)
        await relay.stop()


COLUMNS = [("N", "hosts"), ("image MiB", "image_mib"), ("direct p50 / max s", ("direct_p50_s", "direct_max_s")),
           ("direct registry / image", "direct_registry_x"),
           ("dfdaemon p50 / max s", ("dfdaemon_p50_s", "dfdaemon_max_s")),
           ("dfdaemon registry / image", "dfdaemon_registry_x"), ("from peers", "from_peers_pct"), ("ok", "ok")]


def table(rows: list[Row]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    lines = []
    for r in rows:
        d = asdict(r)
        cells = []
        for _, key in COLUMNS:
            if isinstance(key, tuple):
                cells.append(" / ".join(str(d[k]) for k in key))
            elif key == "from_peers_pct":
                cells.append(f"{d[key]} %")
            else:
                cells.append(str(d[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> list[Row]:
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install docker-registry skopeo)")
    work = Path(tempfile.mkdtemp(prefix="dfpy-image-"))
    procs = Procs()
    try:
        reg_port = free_port()
        cfg = work / "registry.yml"
        cfg.write_text("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                       f"    rootdirectory: {work / 'registry'}\nhttp:\n  addr: 127.0.0.1:{reg_port}\n")
        procs.start(["docker-registry", "serve", str(cfg)], work / "registry.log")
        await wait_http(f"http://127.0.0.1:{reg_port}/v2/")
        skopeo = Skopeo(work / "skopeo")
        rows = []
        for n in args.hosts:
            row = await scenario(n, args, work, reg_port, skopeo)
            print(table([row]).splitlines()[-1], flush=True)
            rows.append(row)
        return rows
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--layer-mib", type=int, default=16)
    p.add_argument("--registry-rate", type=float, default=32.0, help="registry blob upload cap, MiB/s in total")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    rows = asyncio.run(run(args))
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"layers": args.layers, "layer_mib": args.layer_mib,
                            "registry_rate_mib_s": args.registry_rate, "rows": [asdict(r) for r in rows]}
    (args.out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
    (args.out / "image.md").write_text(
        f"# Container image pulls: dfdaemon vs skopeo straight from the registry\n\n"
        f"`python -m bench.image --hosts {','.join(map(str, args.hosts))} --layers {args.layers} "
        f"--layer-mib {args.layer_mib} --registry-rate {args.registry_rate:g}`; measured "
        f"{rows[0].measured if rows else '-'}, code {rows[0].commit if rows else '-'}. Registry: Debian's "
        f"docker-registry behind a relay counting blob bytes and capping them at {args.registry_rate:g} MiB/s "
        f"in total; N skopeo at once (times are whole skopeo commands; dfdaemons already running); "
        f"one supernode on its embedded store; 2 shared cores, loopback.\n\n" + text)


if __name__ == "__main__":
    main()
