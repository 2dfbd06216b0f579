"""The throughput cost of TLS per GiB (issue 14): the same downloads over plain HTTP and
over TLS, on loopback.

    python -m bench.tls [--size 512MiB] [--runs 3]

For each mode, one origin (plain: it is outside the swarm), one supernode (embedded
store; with --cert/--key in the TLS mode) and dfget hosts (with --cacert/--cert/--key in
the TLS mode, so their peer servers serve over TLS too):

- warm-up: a dfget without a peer server makes the CDN fetch and cache the file;
- CDN leg: host A downloads it, every piece from the supernode's download port;
- peer leg: host B downloads it while A's peer server holds every piece (the CDN sends
  a piece only while no peer holds it, --cdn-copies 1).

Measured per leg: wall time, CPU seconds of the serving process (supernode, or A's peer
server) and of the downloading dfget (whole process, start-up included), per GiB moved.
The best of `--runs` is kept (the machine may be shared). Writes bench/results/tls.md
and tls.json with the date and the code's commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import ssl
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.units import parse_size

from .pki import TestCA
from .single import PY, Procs, cpu_seconds, free_port, make_source, run_timed, sha256_file, wait_until
from .version import code_version

GIB = 1 << 30
MIB = 1 << 20
OUT = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Leg:
    mode: str  # plain | tls
    leg: str  # cdn | peer
    run: int
    ok: bool
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float
    bytes_from_peers: int
    bytes_from_supernode: int


@dataclass
class Env:
    work: Path
    procs: Procs
    size: int
    url: str
    want: str
    tls_args: list[str]
    ctx: ssl.SSLContext | None


def _ping(url: str, ctx: ssl.SSLContext | None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
        return bool(resp.status == 200)


def _peer_server_pid(home: Path) -> int | None:
    """Pid of the peer server of `home` once it answers (a dfget may finish before the
    server it started is up)."""
    from dfget.server.launcher import ControlClient, PeerServerError

    async def info() -> int | None:
        client = ControlClient(home)
        try:
            return (await client.info()).pid
        except PeerServerError:
            return None
        finally:
            await client.close()

    return asyncio.run(info())


def _stop_peer_server(home: Path) -> None:
    from dfget.server.launcher import stop_server

    asyncio.run(stop_server(home))


def _dfget(env: Env, node: str, home: Path, out: Path, *extra: str) -> tuple[float, bool, dict[str, Any], float]:
    cmd = [PY, "-m", "dfget", "-u", env.url, "-o", str(out), "--node", node, "--home", str(home),
           "--ip", "127.0.0.1", "--notbs", "--json", "-B", "--alivetime", "120s", *env.tls_args, *extra]
    dt, _rss, code, stdout, cpu = run_timed(cmd, env.work)
    report = json.loads(stdout.decode().strip().splitlines()[-1]) if stdout.strip() else {}
    ok = code == 0 and sha256_file(out) == env.want
    return dt, ok, report, cpu


def bench_mode(mode: str, env: Env, runs: int) -> list[Leg]:
    api, dl = free_port(), free_port()
    home = env.work / mode
    home.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "supernode", "--listen", "127.0.0.1", "--port", str(api), "--download-port", str(dl),
           "--home", str(home / "supernode"), "--advertise-ip", "127.0.0.1", "--allow-origin", "127.0.0.0/8",
           "--allow-peer", "127.0.0.0/8", "--max-bandwidth", "0", "--log-level", "warning"]
    if mode == "tls":
        cmd += ["--cert", str(env.work / "pki" / "supernode.pem"), "--key", str(env.work / "pki" / "supernode.key")]
    sn = env.procs.start(cmd, home / "supernode.log", cwd=ROOT)
    scheme = "https" if mode == "tls" else "http"
    wait_until(lambda: _ping(f"{scheme}://127.0.0.1:{api}/_ping", env.ctx if mode == "tls" else None), "supernode")
    node = f"127.0.0.1:{api}"
    dt, ok, _, _ = _dfget(env, node, home / "warm", home / "warm.out", "--no-serve", "--pattern", "cdn")
    if not ok:
        raise RuntimeError(f"{mode}: warm-up download failed (see {home})")
    legs: list[Leg] = []
    for r in range(1, runs + 1):
        a, b = home / f"a{r}", home / f"b{r}"
        sn0 = cpu_seconds(sn.pid)
        dt, ok, rep, cpu = _dfget(env, node, a, home / "a.out")
        legs.append(Leg(mode, "cdn", r, ok, dt, cpu_seconds(sn.pid) - sn0, cpu,
                        int(rep.get("bytes_from_peers", 0)), int(rep.get("bytes_from_supernode", 0))))
        peer = wait_until(lambda a=a: _peer_server_pid(a), "peer server of host A")
        p0 = cpu_seconds(peer)
        dt, ok, rep, cpu = _dfget(env, node, b, home / "b.out")
        legs.append(Leg(mode, "peer", r, ok, dt, cpu_seconds(peer) - p0, cpu,
                        int(rep.get("bytes_from_peers", 0)), int(rep.get("bytes_from_supernode", 0))))
        for h in (a, b):  # A's output is what its peer server served B: removed only now
            _stop_peer_server(h)
        for f in (home / "a.out", home / "b.out", home / "warm.out"):
            f.unlink(missing_ok=True)
        for leg in legs[-2:]:
            _print(leg, env.size)
    env.procs.stop(sn)
    return legs


def _print(leg: Leg, size: int) -> None:
    gib = size / GIB
    print(f"{leg.mode:>5} {leg.leg:>4} run {leg.run}: {'ok' if leg.ok else 'FAILED'} {leg.wall_s:6.2f} s "
          f"({size / leg.wall_s / 1e6:7.1f} MB/s), server {leg.server_cpu_s / gib:5.2f} CPU s/GiB, "
          f"client {leg.client_cpu_s / gib:5.2f} CPU s/GiB, peers {leg.bytes_from_peers / MIB:.0f} MiB, "
          f"supernode {leg.bytes_from_supernode / MIB:.0f} MiB", flush=True)


def best(legs: list[Leg], mode: str, leg: str) -> dict[str, float]:
    """Per leg the lowest of each figure over the runs (a shared machine only adds)."""
    rows = [x for x in legs if x.mode == mode and x.leg == leg and x.ok]
    if not rows:
        return {}
    return {"wall_s": min(x.wall_s for x in rows), "server_cpu_s": min(x.server_cpu_s for x in rows),
            "client_cpu_s": min(x.client_cpu_s for x in rows)}


def write_results(legs: list[Leg], size: int, runs: int, out: Path) -> None:
    gib = size / GIB
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": code_version(), "size": size,
            "runs": runs, "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
            "legs": [asdict(x) for x in legs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tls.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = ["# The cost of TLS per GiB (`python -m bench.tls`)", "",
             f"{meta['date']}, code {meta['commit']}; {size / MIB:.0f} MiB file on loopback, best of {runs} "
             f"runs per figure; Python {meta['python']}, {meta['openssl']}. **The machine was shared** with "
             "other work (2 cores): figures are the lowest seen, and differences of a few percent are noise.", "",
             "CDN leg: a dfget downloads every piece from the supernode's download port (server = the "
             "supernode process). Peer leg: a dfget downloads from another host's peer server (server = "
             "that peer server). CPU seconds per GiB moved; client = the downloading dfget, whole process "
             "(start-up, hashing and writing included).", "",
             "| leg | mode | wall s | MB/s | server CPU s/GiB | client CPU s/GiB |", "|---|---|---|---|---|---|"]
    for leg in ("cdn", "peer"):
        for mode in ("plain", "tls"):
            b = best(legs, mode, leg)
            if not b:
                lines.append(f"| {leg} | {mode} | failed | | | |")
                continue
            lines.append(f"| {leg} | {mode} | {b['wall_s']:.2f} | {size / b['wall_s'] / 1e6:.0f} | "
                         f"{b['server_cpu_s'] / gib:.2f} | {b['client_cpu_s'] / gib:.2f} |")
    lines += ["", "TLS cost per GiB (TLS minus plain):", ""]
    for leg in ("cdn", "peer"):
        p, t = best(legs, "plain", leg), best(legs, "tls", leg)
        if p and t:
            lines.append(f"- {leg} leg: server +{(t['server_cpu_s'] - p['server_cpu_s']) / gib:.2f} CPU s/GiB, "
                         f"client +{(t['client_cpu_s'] - p['client_cpu_s']) / gib:.2f} CPU s/GiB, wall "
                         f"{(t['wall_s'] - p['wall_s']) / gib:+.2f} s/GiB "
                         f"({(t['wall_s'] / p['wall_s'] - 1) * 100:+.0f} %)")
    (out / "tls.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=512 * MIB)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.size <= 0 or args.runs <= 0:
        ap.error("--size and --runs must be positive")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-tls-"))
    procs = Procs()
    try:
        ca = TestCA(work / "pki")
        ca.issue("supernode")
        host = ca.issue("host")
        files = work / "files"
        files.mkdir(parents=True, exist_ok=True)
        want = make_source(files / "blob", args.size)
        port_file = work / "origin.port"
        procs.start([PY, "-m", "bench.origin", "--dir", str(files), "--host", "127.0.0.1", "--port", "0",
                     "--port-file", str(port_file)], work / "origin.log", cwd=ROOT)
        port = wait_until(lambda: int(port_file.read_text()), "origin")
        ctx = ssl.create_default_context(cafile=ca.cert)
        legs: list[Leg] = []
        for mode, tls_args in (("plain", []), ("tls", ["--cacert", ca.cert, "--cert", host.cert, "--key", host.key])):
            env = Env(work, procs, args.size, f"http://127.0.0.1:{port}/files/blob", want, tls_args, ctx)
            legs += bench_mode(mode, env, args.runs)
        write_results(legs, args.size, args.runs, args.out)
        print((args.out / "tls.md").read_text())
        return 0 if all(x.ok for x in legs) else 1
    finally:
        procs.stop_all()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
