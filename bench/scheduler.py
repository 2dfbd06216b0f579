"""Scheduler capacity: N simulated clients pulling and reporting on one task.

    python -m bench.scheduler [--clients 200] [--pieces 1000] [--duration 20]
                              [--redis-url redis://127.0.0.1:6379/9] [--out bench/results]
                              [--procs 1] [--supernodes 1] [--cluster] [--think 0]
                              [--profile out.svg]

One supernode process (real Redis) and one origin process serving a sparse file that
cuts into exactly `--pieces` pieces (1,000 pieces need 15 MiB pieces, a 15,000 MiB
file: the CDN fetches it once at loopback speed before the measurement starts).
Then `--clients` simulated clients, in `--procs` separate load processes (asyncio +
aiohttp, msgpack), each register with a fake peer address 127.0.0.x:port and loop:

  pull(limit 4, wait 0, reports = the previous assignments as "ok")

No bytes move: a simulated client "downloads" instantly. A pull answered "wait" is
followed by one long-poll pull (wait 5 s) whose time is reported apart: it measures
the event wake-ups, not the scheduler. Pull latency p50/p99 are over every wait=0
pull (and, separately, over those that returned assignments). With `--think T` the
loop is open instead: each client pulls (wait 0) every T s (x0.5-1.5), whatever it got,
so latency is measured at a fixed offered rate. `--supernodes K` runs K supernode
processes on the same store (client i talks to supernode i mod K); `--cluster` starts a
3-master Redis Cluster on loopback for the run. Registrations wait out 429/503 as dfget
does. Next to the rate: Redis round trips, commands and CPU-us per assignment, and the
assignments/s one Redis core would carry at that cost. The supernode's RSS
(VmRSS, VmHWM) is read from /proc before and after the load, CPU time of supernode,
Redis (INFO cpu) and load processes over the window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.version import code_version

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
LONG_POLL = 5.0


# --- shared helpers ---------------------------------------------------------------------
def length_for(pieces: int) -> int:
    """A file length that piece_size_for() cuts into exactly `pieces` pieces."""
    from common.pieces import piece_count, piece_size_for

    for ps_mib in range(4, 16):
        length = pieces * ps_mib * MIB
        if piece_count(length, piece_size_for(length)) == pieces:
            return length
    raise SystemExit(f"no file length gives exactly {pieces} pieces")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- load generator (runs in its own process) ---------------------------------------------
async def register(session: Any, api: str, body: bytes, stats: dict[str, Any]) -> Any:
    """POST a registration, waiting out 429s (Retry-After) as dfget does: 2,000 clients
    from one address are over any per-address limit at first."""
    from common import wire

    headers = {"Content-Type": wire.MSGPACK_TYPE, "Accept": wire.MSGPACK_TYPE}
    for _ in range(200):
        async with session.post(f"{api}/api/v1/tasks", data=body, headers=headers) as r:
            data = await r.read()
            if r.status in (429, 503):
                stats["waited_out"] = stats.get("waited_out", 0) + 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")) * (0.5 + random.random()))
                continue
            if r.status != 200:
                raise SystemExit(f"registration failed: HTTP {r.status} {data[:200]!r}")
            return wire.decode(data, wire.RegisterReply, msgpack=True)
    raise SystemExit("registration refused 200 times")


async def _client(session: Any, api: str, tid: str, cid: str, stop_at: float, stats: dict[str, Any],
                  think: float = 0.0) -> None:
    from common import wire

    headers = {"Content-Type": wire.MSGPACK_TYPE, "Accept": wire.MSGPACK_TYPE}
    url = f"{api}/api/v1/tasks/{tid}/pull"
    reports: list[wire.Report] = []
    wait = 0.0
    while time.time() < stop_at:
        body = wire.encode(wire.PullRequest(cid=cid, limit=4, wait=wait, reports=reports), msgpack=True)
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            if resp.status != 200:
                stats["errors"] += 1
                stats["last_error"] = data[:200].decode(errors="replace")
                return
        dt = time.perf_counter() - t0
        rep = wire.decode(data, wire.PullReply, msgpack=True)
        n = len(rep.assignments)
        now = time.time()
        if now <= stop_at:
            stats["assigned"] += n
            sec = int(now - stats["start_at"])
            stats["timeline"][sec] = stats["timeline"].get(sec, 0) + n
            if wait == 0:
                stats["lat"].append(dt)
                if n:
                    stats["lat_assigned"].append(dt)
            else:
                stats["longpoll_s"].append(dt)
        # a simulated download succeeds at once: report it with the next pull
        reports = [wire.Report(a.piece, "ok", a.source.cid) for a in rep.assignments]
        if rep.state == "finished":
            stats["finished"] += 1
            stats["end"] = max(stats["end"], time.time())
            return
        if rep.state == "failed":
            stats["errors"] += 1
            return
        if think > 0:  # open loop: the next pull comes when it comes, whatever this one got
            await asyncio.sleep(think * random.uniform(0.5, 1.5))
            continue
        # nothing assignable now: one long-poll, timed apart from the wait=0 pulls
        wait = LONG_POLL if rep.state == "wait" and wait == 0 and not reports else 0.0


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from common import wire
    from common.taskid import new_id

    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    stats: dict[str, Any] = {"assigned": 0, "lat": [], "lat_assigned": [], "longpoll_s": [],
                             "finished": 0, "errors": 0, "end": 0.0,
                             "timeline": {}, "start_at": args.start_at}
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        cids = []
        apis = args.api.split(",")

        async def one(i: int) -> None:
            peer = wire.PeerAddr(new_id(), f"127.0.{1 + i // 250}.{1 + i % 250}", 15000 + i)
            req = wire.RegisterRequest(url=args.url, peer=peer)
            api = apis[i % len(apis)]  # clients spread over the supernodes
            rep = await register(session, api, wire.encode(req, msgpack=True), stats)
            cids.append((rep.cid, (peer.peer_id, rep.peer_secret), rep.task.task_id, api))

        ids = list(range(args.first, args.first + args.count))
        for k in range(0, len(ids), 50):  # 50 at a time: a crowd arriving, not one by one
            await asyncio.gather(*(one(i) for i in ids[k:k + 50]))
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        cpu0 = time.process_time()
        stop_at = args.start_at + args.duration
        if args.think > 0:  # spread the first pulls over one think time
            random.shuffle(cids)
        await asyncio.gather(*(_start_after(random.uniform(0, args.think), _client(
            session, api, tid, cid, stop_at, stats, args.think)) for cid, _, tid, api in cids))
        stats["cpu"] = time.process_time() - cpu0
        stats["end"] = stats["end"] if stats["finished"] == len(cids) else min(time.time(), stop_at)
        stats["peers"] = [p for _, p, _, _ in cids]
    return stats


async def _start_after(delay: float, coro: Any) -> None:
    await asyncio.sleep(delay)
    await coro


def start_cluster(procs: Procs, work: Path) -> str:
    """Three Redis Cluster masters on loopback (no replicas); returns the store URL."""
    ports = [free_port() for _ in range(3)]
    for p in ports:
        d = work / f"redis-{p}"
        d.mkdir(parents=True)
        procs.start(["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(d), "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                     "--cluster-port", str(free_port())], stdout=subprocess.DEVNULL)
    for p in ports:
        _wait_port(p)
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, capture_output=True, timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        if all("cluster_state:ok" in subprocess.run(["redis-cli", "-p", str(p), "CLUSTER", "INFO"],
                                                    capture_output=True, text=True).stdout for p in ports):
            return f"redis+cluster://127.0.0.1:{ports[0]}"
        time.sleep(0.2)
    raise SystemExit("the Redis Cluster did not come up")


# --- orchestration ------------------------------------------------------------------------
class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, cwd=ROOT, **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT if "py-spy" in str(p.args[0]) else signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def wait_port_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """The port a server wrote to `path` once it listens; fails if it exits or takes longer."""
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text().strip()):
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode} before listening")
        if time.time() > deadline:
            raise SystemExit(f"{proc.args!r} wrote no port to {path} in {timeout:.0f} s")
        time.sleep(0.05)
    return int(path.read_text())


def wait_task_done(api: str, tid: str, timeout: float) -> dict[str, Any]:
    """Poll the task until the CDN fetch ends (success or failed); fails after `timeout`."""
    deadline = time.time() + timeout
    while (task := _http("GET", f"{api}/api/v1/tasks/{tid}")["task"])["status"] not in ("success", "failed"):
        if time.time() > deadline:
            raise SystemExit(f"the CDN fetch of {tid[:12]} did not finish in {timeout:.0f} s")
        time.sleep(0.5)
    return task  # type: ignore[no-any-return]


def _http(method: str, url: str, body: dict[str, Any] | None = None,
          headers: dict[str, str] | None = None) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _redis_nodes(url: str) -> list[Any]:
    """A client per Redis server behind `url` (each master of a Cluster)."""
    import redis

    if url.startswith("redis+cluster://"):
        host, _, port = url.split("://", 1)[1].split(",")[0].rpartition(":")
        seed = redis.Redis(host=host, port=int(port))
        out = []
        for line in seed.execute_command("CLUSTER", "NODES").decode().splitlines():
            parts = line.split()
            if "master" in parts[2]:
                h, _, p = parts[1].split("@")[0].rpartition(":")
                out.append(redis.Redis(host=h or host, port=int(p)))
        return out
    return [redis.Redis.from_url(url)]


def _redis_cpu(url: str) -> tuple[float, int, int]:
    """Redis CPU seconds, round trips (commands sent by clients: scripts count once) and
    commands executed (those inside scripts too) so far, summed over the servers."""
    cpu, trips, calls = 0.0, 0, 0
    for r in _redis_nodes(url):
        info = r.info("cpu")
        cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        trips += int(r.info("stats")["total_commands_processed"])
        calls += sum(int(v.get("calls", 0)) for v in r.info("commandstats").values())
    return cpu, trips, calls


def run(args: argparse.Namespace) -> dict[str, Any]:
    py = sys.executable
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="bench-sched-"))
    home = Path(args.home) if args.home else work / "home"
    try:
        if args.cluster:
            args.redis_url = start_cluster(procs, work)
        length = length_for(args.pieces)
        files = work / "files"
        files.mkdir()
        with open(files / "blob", "wb") as f:
            f.truncate(length)  # sparse: zeros, no disk
        port_file = work / "origin.port"
        origin = procs.start([py, "-m", "bench.origin", "--dir", str(files), "--port-file", str(port_file),
                              "--port", str(args.origin_port)])
        url = f"http://127.0.0.1:{wait_port_file(port_file, origin)}/files/blob"
        sns, apis = [], []
        for k in range(args.supernodes):
            api_port = free_port()
            sns.append(procs.start([py, "-m", "supernode", "--port", str(api_port), "--download-port", "0",
                                    "--listen", "127.0.0.1", "--advertise-ip", "127.0.0.1",
                                    "--home", str(home) + ("" if k == 0 else f"-{k}"),
                                    "--redis-url", args.redis_url, "--allow-origin", "127.0.0.0/8",
                                    "--allow-peer", "127.0.0.0/8", "--max-bandwidth", "0",
                                    "--log-level", "warning", "--gc-initial-delay", "1h",
                                    # every simulated client registers from 127.0.0.1: the
                                    # per-address limit models many hosts, as in bench.soak
                                    "--register-rate", "1000"]))
            _wait_port(api_port)
            apis.append(f"http://127.0.0.1:{api_port}")
        sn = sns[0]
        api = apis[0]
        t0 = time.time()
        reg = _http("POST", f"{api}/api/v1/tasks", {"url": url})
        tid = reg["task"]["task_id"]
        task = wait_task_done(api, tid, timeout=1800.0)  # 15 GB at loopback speed: minutes
        if task["status"] != "success" or task["piece_count"] != args.pieces:
            raise SystemExit(f"CDN fetch did not succeed: {task}")
        cdn_s = time.time() - t0
        print(f"CDN has {args.pieces} pieces of {task['piece_size'] >> 20} MiB after {cdn_s:.1f}s", file=sys.stderr)

        per = [args.clients // args.procs + (1 if i < args.clients % args.procs else 0) for i in range(args.procs)]
        start_at = time.time() + 5 + args.clients / 100
        gens = []
        first = 0
        for n in per:
            gens.append(procs.start([py, "-m", "bench.scheduler", "--role", "gen", "--api", ",".join(apis), "--url", url,
                                     "--first", str(first), "--count", str(n), "--start-at", str(start_at),
                                     "--think", str(args.think),
                                     "--duration", str(args.duration)], stdout=subprocess.PIPE))
            first += n
        for g in gens:
            assert g.stdout is not None
            if json.loads(g.stdout.readline() or "{}").get("ready") is not True:
                raise SystemExit("a load generator failed to start")
        if time.time() > start_at:
            raise SystemExit("registration took longer than the warm-up; raise it")
        time.sleep(max(0.0, start_at - time.time()))
        rss0, rcpu0 = proc_status(sn.pid), _redis_cpu(args.redis_url)
        cpu0 = sum(proc_cpu(p.pid) for p in sns)
        spy = None
        if args.profile:
            spy = procs.start([str(Path(py).parent / "py-spy"), "record", "-p", str(sn.pid), "-o", args.profile, "-d",
                               str(int(args.duration)), "-r", "200",
                               "-f", "raw" if args.profile.endswith(".txt") else "flamegraph"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        results = []
        for g in gens:
            out, _ = g.communicate()
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        rss1, rcpu1 = proc_status(sn.pid), _redis_cpu(args.redis_url)
        cpu1 = sum(proc_cpu(p.pid) for p in sns)
        if spy is not None:
            spy.wait(30)
        for r in results:
            for p, secret in r["peers"]:
                _http("POST", f"{api}/api/v1/peers/down", {"peer_id": p},
                      {"X-Dragonfly-Peer-Secret": secret} if secret else None)
        if not args.home:
            _http("DELETE", f"{api}/api/v1/tasks/{tid}")
    finally:
        procs.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)

    window = max(r["end"] for r in results) - start_at
    lat = [x for r in results for x in r["lat"]]
    lat_a = [x for r in results for x in r["lat_assigned"]]
    lp = [x for r in results for x in r["longpoll_s"]]
    assigned = sum(r["assigned"] for r in results)
    timeline: dict[int, int] = {}
    for r in results:
        for sec, n in r["timeline"].items():
            timeline[int(sec)] = timeline.get(int(sec), 0) + n
    return {
        "clients": args.clients, "pieces": args.pieces, "piece_size_mib": task["piece_size"] >> 20,
        "duration_s": round(window, 2), "load_procs": args.procs, "cdn_fetch_s": round(cdn_s, 1),
        "assignments": assigned, "assignments_per_s": round(assigned / window),
        "pulls": len(lat), "pulls_per_s": round(len(lat) / window),
        "pull_p50_ms": round(pct(lat, 0.50) * 1000, 2), "pull_p99_ms": round(pct(lat, 0.99) * 1000, 2),
        "pull_assigned_p50_ms": round(pct(lat_a, 0.50) * 1000, 2),
        "pull_assigned_p99_ms": round(pct(lat_a, 0.99) * 1000, 2),
        "longpolls": len(lp), "longpoll_p50_ms": round(pct(lp, 0.5) * 1000, 1),
        "finished_clients": sum(r["finished"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "last_error": next((r.get("last_error") for r in results if r.get("last_error")), None),
        "supernode_rss_start_mib": round(rss0["VmRSS"] / MIB, 1), "supernode_rss_end_mib": round(rss1["VmRSS"] / MIB, 1),
        "supernode_hwm_start_mib": round(rss0["VmHWM"] / MIB, 1), "supernode_hwm_end_mib": round(rss1["VmHWM"] / MIB, 1),
        "cpu_supernode_pct": round(100 * (cpu1 - cpu0) / window),
        "cpu_redis_pct": round(100 * (rcpu1[0] - rcpu0[0]) / window),
        "redis_roundtrips_per_s": round((rcpu1[1] - rcpu0[1]) / window),
        "redis_roundtrips_per_assignment": round((rcpu1[1] - rcpu0[1]) / max(1, assigned), 2),
        "redis_commands_per_assignment": round((rcpu1[2] - rcpu0[2]) / max(1, assigned), 1),
        "redis_cpu_us_per_assignment": round(1e6 * (rcpu1[0] - rcpu0[0]) / max(1, assigned), 1),
        # one Redis core spends that much per assignment: what one shard carries at most
        "redis_shard_ceiling_per_s": round(assigned / max(1e-9, rcpu1[0] - rcpu0[0])),
        "supernodes": args.supernodes, "store": "redis-cluster-3" if args.cluster else "redis",
        "think_s": args.think,
        "registrations_waited_out": sum(r.get("waited_out", 0) for r in results),
        "cpu_loadgen_pct": round(100 * sum(r["cpu"] for r in results) / window),
        "assignments_per_second_timeline": [timeline.get(i, 0) for i in range(int(window + 0.999))],
    }


ROWS = [
    ("assignments/s", "assignments_per_s"), ("assignments", "assignments"), ("pulls/s (wait=0)", "pulls_per_s"),
    ("Redis round trips/s", "redis_roundtrips_per_s"),
    ("Redis round trips / commands / CPU us per assignment",
     ("redis_roundtrips_per_assignment", "redis_commands_per_assignment", "redis_cpu_us_per_assignment")),
    ("assignments/s one Redis shard carries (1 core / CPU per assignment)", "redis_shard_ceiling_per_s"), ("pull p50 ms (all wait=0 pulls)", "pull_p50_ms"), ("pull p99 ms (all wait=0 pulls)", "pull_p99_ms"),
    ("pull p50 ms (with assignments)", "pull_assigned_p50_ms"),
    ("pull p99 ms (with assignments)", "pull_assigned_p99_ms"),
    ("long-polls (timed apart)", "longpolls"), ("clients finished", "finished_clients"), ("errors", "errors"),
    ("supernode VmRSS start/end MiB", ("supernode_rss_start_mib", "supernode_rss_end_mib")),
    ("supernode VmHWM start/end MiB", ("supernode_hwm_start_mib", "supernode_hwm_end_mib")),
    ("CPU % supernode / redis / load", ("cpu_supernode_pct", "cpu_redis_pct", "cpu_loadgen_pct")),
]


def verdict(r: dict[str, Any]) -> str:
    """Issue 10's target for this kind of run. Closed loop (no think time): latency is
    queueing there (clients / pull rate), so only capacity counts; open loop: latency at
    the offered rate."""
    if r["think_s"] > 0:
        met = r["errors"] == 0 and r["pull_p99_ms"] < 100
        return f"Target (open loop): 0 errors and pull p99 < 100 ms: {'met' if met else 'NOT met'}."
    met = r["errors"] == 0 and r["assignments_per_s"] >= 5000
    return f"Target (closed loop): >= 5000 assignments/s with 0 errors: {'met' if met else 'NOT met'}."


def table(runs: list[dict[str, Any]], best: dict[str, Any]) -> str:
    head = "| metric | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |"
    lines = [head, "|---" * (len(runs) + 1) + "|"]
    for label, key in ROWS:
        keys = key if isinstance(key, tuple) else (key,)
        cells = [" / ".join(str(r[k]) for k in keys) for r in runs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    b = best
    lines += ["", f"Best of {len(runs)} (highest assignments/s): {b['assignments_per_s']} assignments/s, "
              f"pull p50 {b['pull_p50_ms']} ms, p99 {b['pull_p99_ms']} ms, supernode RSS "
              f"{b['supernode_rss_start_mib']} -> {b['supernode_rss_end_mib']} MiB "
              f"(HWM {b['supernode_hwm_end_mib']} MiB). {verdict(b)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--pieces", type=int, default=1000)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--procs", type=int, default=1, help="load generator processes")
    p.add_argument("--supernodes", type=int, default=1, help="supernode processes sharing the Redis")
    p.add_argument("--cluster", action="store_true", help="start a 3-master Redis Cluster on loopback and use it")
    p.add_argument("--name", default="scheduler", help="results file stem under --out (NAME.md, NAME.json)")
    p.add_argument("--think", type=float, default=0.0,
                   help="open loop: each client pulls every THINK s (x0.5-1.5), no long-polls (0: closed loop)")
    p.add_argument("--runs", type=int, default=1, help="repeat and report each run and the best")
    p.add_argument("--profile", help="py-spy record the supernode during the (last) run into this SVG")
    p.add_argument("--home", help="keep the supernode's cache here (with --origin-port and the same Redis db, "
                   "later invocations skip the CDN fetch)")
    p.add_argument("--origin-port", type=int, default=0)
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    for hidden in ("--api", "--url", "--first", "--count", "--start-at"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "gen":
        args.first, args.count, args.start_at = int(args.first), int(args.count), float(args.start_at)
        args.think = float(args.think)
        random.seed()
        print(json.dumps(asyncio.run(generate(args))), flush=True)
        return
    runs = []
    profile = args.profile
    own_home = None
    if args.runs > 1 and not args.home:
        # later runs reuse the CDN copy: same home, same origin URL, task kept in Redis
        own_home = tempfile.mkdtemp(prefix="bench-sched-home-")
        args.home, args.origin_port = own_home, args.origin_port or free_port()
    try:
        for i in range(args.runs):
            args.profile = profile if i == args.runs - 1 else None
            runs.append(run(args))
            print(json.dumps(runs[-1]), file=sys.stderr)
    finally:
        if own_home:
            import redis

            r = redis.Redis.from_url(args.redis_url)
            for key in r.scan_iter("df:t:*"):
                r.delete(key)
            r.delete("df:tasks")
            subprocess.run(["rm", "-rf", own_home], check=False)
    best = max(runs, key=lambda r: r["assignments_per_s"])
    text = table(runs, best)
    print(text)
    print(json.dumps({k: v for k, v in best.items() if k != "assignments_per_second_timeline"}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = code_version()
    given = list(sys.argv[1:] if argv is None else argv)
    flags = " ".join(a for i, a in enumerate(given)
                     if not a.startswith(("--out", "--home", "--origin-port", "--name"))
                     and (i == 0 or given[i - 1] not in ("--out", "--home", "--origin-port", "--name")))
    meta = (f"# Scheduler capacity ({args.name})\n\n`python -m bench.scheduler {flags}` on {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, commit {commit}; supernodes, Redis and load generators share "
            "them.\n\n")
    (out / f"{args.name}.md").write_text(meta + text + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
                                                       "runs": runs, "best": best}, indent=2) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
