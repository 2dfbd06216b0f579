"""Soak: real downloads and a crowd of simulated clients against one supernode, for minutes.

    python -m bench.soak [--duration 300] [--downloads 200] [--hosts 20] [--clients 2000]
                         [--think 10] [--redis-url redis://127.0.0.1:6379/12] [--out bench/results]

One origin process, one supernode process on the real Redis (its df:* keys are deleted
before and after), and two kinds of load for `--duration` seconds:

- `--downloads` concurrent dfget downloads, without pause: `--hosts` hosts (each its own
  home, its own 127.0.0.x address and its own real `dfget server` peer server process,
  started by dfget itself) times `--downloads / --hosts` tasks (small files of 1-6 MiB),
  each pair downloading its task again and again into a new file, with --notbs (a failed
  P2P download is an error, not a quiet fallback) and every result checked byte for
  byte (SHA-256) against the origin file. They run in `--dl-procs` processes through
  `dfget.download.download()`, the function the dfget command runs after parsing its
  flags, so every download takes dfget's real path (registration with 429 handling,
  pulls, piece fetches over their own sockets, digest checks, the peer server control
  socket, the atomic rename). One process per download would measure 200 interpreter
  start-ups (~0.4 CPU-s and ~40 MiB each on a 2-core box), not the supernode.
- `--clients` simulated clients in `--sim-procs` processes on one more task (`--sim-pieces`
  pieces of a sparse file): each registers with a fake peer address, pulls (limit 4,
  wait 0) every `--think` seconds (x0.5-1.5, jittered), reports every assignment as done
  at once, heartbeats every 30 s like a peer server, and when it holds every piece says
  so, leaves (peers/down) and comes back as a new client.

Reported: errors (target 0: failed or wrong downloads, non-2xx answers other than 429,
connection errors, tracebacks in any log), pull latency p50/p99 of the simulated clients,
download time p50/p99, 429s waited out, and the supernode's RSS at the start (after a
warm-up of max(10 s, 10 % of the duration)) and at the end (target: growth <= 20 %),
sampled every 5 s. Reuses bench.scheduler's process and /proc helpers.

Priorities: the origin and the downloads (with the peer servers they start) run at
SCHED_IDLE (`--load-sched idle`, where the kernel has it) and `--load-nice` (19): they
give up their CPU the moment the supernode, Redis or a simulated client wakes, and
their session groups (below) weigh the least a group can. The download hosts' homes
and files live in RAM (/dev/shm) where it has room: their writes are their own
machines' cost. The simulated clients, whose pulls are the measured latency, run at
`--sim-nice` (0), like the supernode and Redis: the soak stands for clients on machines
of their own, and on 2 shared cores at equal priority the supernode would wait out a
slice of each of ~25 load processes before every request. Every process leads a session
of its own, as a daemon would: where the kernel schedules each session as one group
(autogroup), one session holding the supernode and the load would give them one group's
share between them, whatever their nice levels. The report also gives the
supernode's own view of the window: its scheduling time, event-loop lag and store
round trips (p50/p99 from its /metrics histograms, as bucket bounds).

The machine's own stops are measured in the same run: one bench.stalls probe per CPU
(pinned, SCHED_FIFO where allowed, waking every 5 ms) records every time its CPU did
not run it for 10 ms or more. On a virtual machine that is the host running something
else on that vCPU, and a pull in flight there waits it out, whatever this code does. The
report gives the stalls, how many pulls overlapped one, and the p99 of the others.

All clients come from 127.0.0.1 here, so the supernode runs with --register-rate 1000:
its per-address limit models many hosts, not one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stalls
from bench.scheduler import (
    MIB,
    ROOT,
    Procs,
    _http,
    _redis_cpu,
    _wait_port,
    free_port,
    length_for,
    pct,
    proc_cpu,
    proc_status,
    wait_port_file,
)
from bench.version import code_version

HEARTBEAT = 30.0
# On a 2-core box the supernode shares the CPU with ~25 load processes (20 peer servers,
# the downloads, the simulated clients, the origin); at equal priority the OS hands it a
# slice in turn with each of them and every request waits out their slices. Load at the
# lowest priority models what the soak stands for: clients on machines of their own.
# Nice 19, not 10: each load process leads a session, and where the kernel schedules
# sessions as groups it weighs the groups by their nice levels, whatever the scheduling
# class inside. 23 load groups at nice 10 weigh 2.5 times the supernode's at nice 0, at
# nice 19 a third of it: 60 s soaks gave pull p99 31-32 ms at 10 and 17-19 ms at 19, with
# as many downloads done.
LOAD_NICE = 19
THINK_MIN = 0.5
SLOW_S = 0.01  # a pull this long or longer is checked against the machine's stalls


# --- simulated clients (own process) ---------------------------------------------------------
class Sim:
    def __init__(self) -> None:
        self.lat: list[float] = []
        # pulls over SLOW_S: wall start, wall end, latency (checked against bench.stalls)
        self.slow: list[tuple[float, float, float]] = []
        self.pulls = self.assigned = self.finished = self.throttled = self.reregistered = 0
        self.busy = 0
        self.errors: dict[str, int] = {}
        self.last_error = ""

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = detail[:300]


def _is_busy(raw: bytes) -> bool:
    """A 503 that says busy (the supernode shed the request: ask again), in JSON or msgpack."""
    return b'"busy"' in raw or b"\xa4busy" in raw


async def _call(session: Any, stats: Sim, method: str, url: str, body: object, typ: Any,
                secret: str | None = None) -> tuple[int, Any]:
    """(status, decoded reply or None). 429 is waited out here; other failures counted.
    `secret`: the peer's, for calls made as that peer (heartbeat, down)."""
    from common import wire

    headers = {"Content-Type": wire.MSGPACK_TYPE, "Accept": wire.MSGPACK_TYPE}
    if secret:
        headers["X-Dragonfly-Peer-Secret"] = secret
    for _ in range(10):
        try:
            async with session.request(method, url, data=wire.encode(body, msgpack=True), headers=headers) as r:
                raw = await r.read()
                status, retry = r.status, r.headers.get("Retry-After", "1")
        except Exception as exc:  # noqa: BLE001 - every failure of the supernode is counted
            stats.error("connection", f"{method} {url}: {type(exc).__name__}: {exc}")
            return 0, None
        if status == 429:
            stats.throttled += 1
            await asyncio.sleep(float(retry) if retry.isdigit() else 1.0)
            continue
        if status == 503 and _is_busy(raw):
            # the supernode sheds what it cannot do in time; dfget waits that out too
            stats.busy += 1
            await asyncio.sleep((float(retry) if retry.isdigit() else 1.0) * random.uniform(0.5, 1.5))
            continue
        if status == 200:
            return status, wire.decode(raw, typ, msgpack=True) if typ is not None else None
        if status != 404:
            stats.error(f"http_{status}", f"{method} {url}: {raw[:200]!r}")
        return status, None
    return 429, None


async def _sim_client(session: Any, api: str, url: str, idx: int, stop_at: float, think: float, stats: Sim) -> None:
    from common import wire
    from common.taskid import new_id

    rnd = random.Random(idx)
    await asyncio.sleep(rnd.uniform(0, think))
    while time.time() < stop_at:
        peer = wire.PeerAddr(new_id(), f"127.0.{1 + idx // 250}.{1 + idx % 250}", 20000 + idx % 40000)
        status, reg = await _call(session, stats, "POST", f"{api}/api/v1/tasks",
                                  wire.RegisterRequest(url=url, peer=peer), wire.RegisterReply)
        if reg is None:
            await asyncio.sleep(1.0)
            continue
        tid, cid = reg.task.task_id, reg.cid
        reports: list[Any] = []
        next_beat = time.time() + rnd.uniform(0, HEARTBEAT)
        while time.time() < stop_at:
            t0, t0_wall = time.perf_counter(), time.time()
            status, rep = await _call(session, stats, "POST", f"{api}/api/v1/tasks/{tid}/pull",
                                      wire.PullRequest(cid=cid, limit=4, wait=0, reports=reports), wire.PullReply)
            if rep is None:
                if status == 404:  # forgotten (GC): come back as dfget does
                    stats.reregistered += 1
                break
            stats.lat.append(took := time.perf_counter() - t0)
            if took > SLOW_S:
                stats.slow.append((t0_wall, time.time(), took))
            stats.pulls += 1
            stats.assigned += len(rep.assignments)
            reports = [wire.Report(a.piece, "ok", a.source.cid) for a in rep.assignments]
            if rep.state == "failed":
                stats.error("task_failed", str(rep.task.error))
                break
            if rep.state == "finished":
                stats.finished += 1
                await _call(session, stats, "POST", f"{api}/api/v1/tasks/{tid}/report",
                            wire.ReportRequest(cid=cid, event="finished"), None)
                await _call(session, stats, "POST", f"{api}/api/v1/peers/down",
                            wire.PeerDownRequest(peer.peer_id, [tid]), None, reg.peer_secret)
                break
            if time.time() >= next_beat:
                next_beat += HEARTBEAT
                await _call(session, stats, "POST", f"{api}/api/v1/peers/heartbeat",
                            wire.HeartbeatRequest(peer.peer_id), None, reg.peer_secret)
            await asyncio.sleep(think * rnd.uniform(THINK_MIN, 2 - THINK_MIN))


async def run_sim(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    stats = Sim()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(_sim_client(session, args.api, args.url, i, args.stop_at, args.think, stats)
                               for i in range(args.first, args.first + args.count)))
    return {"lat": stats.lat, "slow": stats.slow, "pulls": stats.pulls, "assigned": stats.assigned, "finished": stats.finished,
            "throttled": stats.throttled, "busy": stats.busy, "reregistered": stats.reregistered,
            "errors": stats.errors,
            "last_error": stats.last_error, "cpu": time.process_time()}


# --- real downloads (own process) ------------------------------------------------------------
async def _download_loop(api_port: int, host: int, home: Path, task: dict[str, Any], out_dir: Path,
                         stop_at: float, res: dict[str, Any]) -> None:
    from common.errors import DfError
    from dfget.config import DownloadConfig, Node
    from dfget.download import download
    from dfget.progress import Stats

    n = 0
    while time.time() < stop_at:
        n += 1
        out = out_dir / f"h{host}-{task['name']}-{n}"
        cfg = DownloadConfig(url=task["url"], output=out, home=home, nodes=(Node("127.0.0.1", api_port),),
                             ip=f"127.0.0.{10 + host}", notbs=False, locallimit=0, stall_timeout=60.0)
        stats = Stats(url=cfg.url, output=str(out))
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(120):
                await download(cfg, stats)
        except DfError as exc:
            res["errors"][exc.code] = res["errors"].get(exc.code, 0) + 1
            res["last_error"] = f"{task['name']} on host {host}: {exc.code}: {exc.message}"[:300]
            continue
        except Exception as exc:  # noqa: BLE001 - an unexpected failure is an error of the soak
            key = type(exc).__name__
            res["errors"][key] = res["errors"].get(key, 0) + 1
            res["last_error"] = f"{task['name']} on host {host}: {key}: {exc}"[:300]
            continue
        res["durations"].append(time.monotonic() - t0)
        if stats.back_to_source:  # what the soak must never see: P2P gave up on the swarm
            res["back_to_source"] = res.get("back_to_source", 0) + 1
            res["last_error"] = f"{task['name']} on host {host}: back to source: {stats.back_to_source}"[:300]
            print(f"BACK-TO-SOURCE task {stats.task_id} host {host} after {time.monotonic() - t0:.1f}s",
                  file=sys.stderr, flush=True)
        got = await asyncio.to_thread(_sha256, out)
        if got != task["sha256"]:
            res["errors"]["wrong_bytes"] = res["errors"].get("wrong_bytes", 0) + 1
        else:
            res["ok"] += 1
            res["bytes"] += task["size"]
            res["from_peers"] += stats.bytes_from_peers
        with contextlib.suppress(OSError):
            out.unlink()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def run_downloads(args: argparse.Namespace) -> dict[str, Any]:
    from dfget.server.launcher import ControlClient, PeerServerError

    tasks = json.loads(Path(args.tasks_file).read_text())
    hosts = [int(h) for h in args.hosts_list.split(",") if h]
    work = Path(args.work)
    res: dict[str, Any] = {"ok": 0, "bytes": 0, "from_peers": 0, "durations": [], "errors": {}, "last_error": ""}
    loops = []
    for h in hosts:
        home = work / f"host{h}"
        out_dir = work / f"out{h}"
        out_dir.mkdir(parents=True, exist_ok=True)
        for t in tasks[: args.per_host]:
            loops.append(_download_loop(args.api_port, h, home, t, out_dir, args.stop_at, res))
    try:
        await asyncio.gather(*loops)
    finally:
        for h in hosts:  # the peer servers dfget started for these homes
            client = ControlClient(work / f"host{h}")
            with contextlib.suppress(PeerServerError):
                await client.shutdown()
            await client.close()
    res["cpu"] = time.process_time()
    res["concurrent"] = len(loops)
    return res


# --- orchestration -----------------------------------------------------------------------------
def _make_tasks(files: Path, count: int, origin_port: int) -> list[dict[str, Any]]:
    rnd = random.Random(7)
    tasks = []
    for i in range(count):
        size = rnd.randint(1 * MIB, 6 * MIB)
        data = rnd.randbytes(size)
        (files / f"t{i}").write_bytes(data)
        tasks.append({"name": f"t{i}", "url": f"http://127.0.0.1:{origin_port}/files/t{i}", "size": size,
                      "sha256": hashlib.sha256(data).hexdigest()})
    return tasks


def _clean_redis(url: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        for key in r.scan_iter("df:*", count=1000):
            r.delete(key)
    finally:
        r.close()


def _tracebacks(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with contextlib.suppress(OSError):
            n += p.read_text(errors="replace").count("Traceback")
    return n


def run(args: argparse.Namespace) -> dict[str, Any]:
    py = sys.executable
    procs = Procs()
    probes: list[Any] = []
    errlogs: list[Any] = []
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    logs = work / "logs"
    logs.mkdir()
    hosts_dir = _hosts_dir(work, args.hosts * max(1, args.downloads // args.hosts))
    _clean_redis(args.redis_url)
    finished = False
    try:
        files = work / "files"
        files.mkdir()
        port_file = work / "origin.port"
        with open(logs / "origin.log", "wb") as log:
            origin = procs.start([py, "-m", "bench.origin", "--dir", str(files), "--port-file", str(port_file)],
                                 stdout=log, stderr=subprocess.STDOUT,
                                 **_own_session(args.load_nice, args.load_sched == "idle"))
        origin_port = wait_port_file(port_file, origin)
        with open(files / "blob", "wb") as f:
            f.truncate(length_for(args.sim_pieces))  # sparse
        per_host = max(1, args.downloads // args.hosts)
        tasks = _make_tasks(files, per_host, origin_port)
        (work / "tasks.json").write_text(json.dumps(tasks))
        api_port = free_port()
        sn_log = logs / "supernode.log"
        with open(sn_log, "wb") as log:
            sn = procs.start([py, "-m", "supernode", "--port", str(api_port), "--download-port", "0",
                              "--listen", "127.0.0.1", "--advertise-ip", "127.0.0.1", "--home", str(work / "sn"),
                              "--redis-url", args.redis_url, "--allow-origin", "127.0.0.0/8", "--allow-peer", "127.0.0.0/8",
                              "--max-bandwidth", "0", "--log-level", "warning", "--register-rate", "1000",
                              *args.supernode_arg], stdout=log, stderr=subprocess.STDOUT, **_own_session(0))
        _wait_port(api_port)
        api = f"http://127.0.0.1:{api_port}"
        blob = f"http://127.0.0.1:{origin_port}/files/blob"
        _prefetch(api, blob)

        start = time.time() + 3
        stop_at = start + args.duration
        common = ["--start-at", str(start), "--stop-at", str(stop_at)]
        sims, dls, errlogs = [], [], []
        probes = stalls.start_probes(py, start, stop_at, work)
        for i in range(args.sim_procs):
            first = i * args.clients // args.sim_procs
            count = (i + 1) * args.clients // args.sim_procs - first
            sims.append(procs.start([py, "-m", "bench.soak", "--role", "sim", "--api", api, "--url", blob,
                                     "--first", str(first), "--count", str(count), "--think", str(args.think),
                                     *common], stdout=_log(errlogs, logs / f"sim{i}.out"),
                                    stderr=_log(errlogs, logs / f"sim{i}.log"), **_own_session(args.sim_nice)))
        for i in range(args.dl_procs):
            hosts = [h for h in range(args.hosts) if h % args.dl_procs == i]
            dls.append(procs.start([py, "-m", "bench.soak", "--role", "dl", "--api-port", str(api_port),
                                    "--work", str(hosts_dir), "--tasks-file", str(work / "tasks.json"),
                                    "--hosts-list", ",".join(map(str, hosts)), "--per-host", str(per_host), *common],
                                   stdout=_log(errlogs, logs / f"dl{i}.out"), stderr=_log(errlogs, logs / f"dl{i}.log"),
                                   **_own_session(args.download_nice, args.load_sched == "idle")))
        args.load_sched_ran = args.load_sched
        if args.load_sched == "idle" and not all(_sched_idle(p.pid) for p in dls):
            args.load_sched_ran = "normal"  # the kernel refused SCHED_IDLE: report what ran
        warmup = start + max(10.0, args.duration / 10)
        timeline: list[tuple[float, float]] = []
        rss0 = cpu0 = rcpu0 = None
        hist0: dict[str, dict[float, float]] = {}
        while any(p.poll() is None for p in sims + dls) and sn.poll() is None:
            now = time.time()
            if now >= start:
                rss = proc_status(sn.pid)["VmRSS"] / MIB
                timeline.append((round(now - start, 1), round(rss, 1)))
                if rss0 is None and now >= warmup:
                    rss0, cpu0, rcpu0, t_cpu0 = proc_status(sn.pid), proc_cpu(sn.pid), _redis_cpu(args.redis_url), now
                    hist0 = _scrape(api)
            time.sleep(5.0 if now >= start else 0.2)
        sn_alive = sn.poll() is None
        if not sn_alive:
            raise SystemExit(f"the supernode died; see {sn_log} (run with --keep)")
        rss1, cpu1, rcpu1, t_cpu1 = proc_status(sn.pid), proc_cpu(sn.pid), _redis_cpu(args.redis_url), time.time()
        hist1 = _scrape(api)
        if rss0 is None:  # a run shorter than the warm-up
            rss0, cpu0, rcpu0, t_cpu0, hist0 = rss1, cpu1, rcpu1, t_cpu1, {}
        origin_stats = _http("GET", f"http://127.0.0.1:{origin_port}/_stats")
        sizes = {t["name"]: t["size"] for t in tasks}
        sizes["blob"] = length_for(args.sim_pieces)
        origin_x = {name: round(f["bytes"] / sizes[name], 3) for name, f in origin_stats["by_file"].items()
                    if name in sizes}
        for f in errlogs:
            f.flush()
        host_stalls = stalls.collect(probes)
        sim_res = [_result(p, logs / f"sim{i}.out") for i, p in enumerate(sims)]
        dl_res = [_result(p, logs / f"dl{i}.out") for i, p in enumerate(dls)]
        finished = True
    finally:
        for probe, _ in probes:  # started apart from procs (they stop on their own at stop_at)
            if probe.poll() is None:
                probe.kill()
                probe.wait()
        procs.stop()
        for f in errlogs:
            f.close()
        _clean_redis(args.redis_url)
        if not finished and not args.keep:
            _drop_hosts_dir(hosts_dir, logs)
    log_paths = [sn_log, *logs.glob("dl*.log"), *logs.glob("sim*.log"), *hosts_dir.glob("host*/logs/server.log")]
    tracebacks = _tracebacks(log_paths)
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work), str(hosts_dir)], check=False)
    out = _summary(args, sim_res, dl_res, rss0, rss1, timeline, tracebacks, sn_alive,
                   (cpu1 - cpu0, rcpu1[0] - rcpu0[0], t_cpu1 - t_cpu0), work)
    # every task's file from the origin exactly once (x F): the CDN's one fetch
    out["origin_x_per_task"] = origin_x
    out["hosts_in_ram"] = _in_ram(hosts_dir)
    if args.keep:
        out["hosts_dir"] = str(hosts_dir)
    # the supernode's own view of the same window: scheduling time and event-loop lag
    for name, key in (("supernode_schedule_seconds", "schedule"), ("supernode_loop_lag_seconds", "loop_lag"),
                      ("supernode_store_script_seconds", "store_script")):
        for q in (0.5, 0.99):
            out[f"{key}_p{int(q * 100)}_ms"] = _hist_pct(hist0.get(name, {}), hist1.get(name, {}), q)
    out["origin_exactly_once"] = bool(origin_x) and all(x == 1.0 for x in origin_x.values())
    # the machine's own stops (bench/stalls.py): a floor under every latency measured here
    out["host_stalls"] = stalls.summary(host_stalls)
    stopped = [st for r in host_stalls for st in r["stalls"]]
    slow = [tuple(x) for r in sim_res for x in r.get("slow", [])]
    hit = stalls.overlaps([(t0, t1) for t0, t1, _ in slow], stopped)
    out["pulls_overlapping_stalls"] = sum(hit)
    # the others: every pull under SLOW_S (none of those is checked) and the slow ones that met no stall
    lat_outside = [x for r in sim_res for x in r.get("lat", []) if x <= SLOW_S]
    lat_outside += [took for (_, _, took), h in zip(slow, hit, strict=True) if not h]
    out["pull_p99_outside_stalls_ms"] = round(pct(lat_outside, 0.99) * 1000, 1)
    return out


def _own_session(n: int, idle: bool = False) -> dict[str, Any]:
    """For Popen: the child leads a session of its own, as a daemon or a process on a host
    of its own would, at nice +n. Where the kernel schedules each session as one group
    (autogroup), a session of ours would otherwise hold the supernode and the load together
    and split one group's share of the CPU among them; the group's nice is set to n too.
    `idle`: the child (and every process it starts) runs at SCHED_IDLE where the kernel has
    it: any other process that wakes up takes its CPU at once."""
    from dfget.server.lifecycle import set_group_nice

    def niced() -> None:
        os.nice(n)
        set_group_nice(n)  # False where the kernel has no autogroup: nice alone holds there
        if idle and hasattr(os, "SCHED_IDLE"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return {"start_new_session": True, "preexec_fn": niced if n or idle else None}


RAM_DIR = Path("/dev/shm")


def _in_ram(path: Path) -> bool:
    return path.parent == RAM_DIR


def _hosts_dir(work: Path, downloads: int) -> Path:
    """Where the download hosts keep their homes and write their files: a directory in RAM
    (/dev/shm) where it and the machine's free memory have room for every download's
    file twice over (the host's copy and the one in flight) with 1 GiB (and 4 GiB of
    memory) to spare, else `work`/hosts. On this machine's virtual disk the downloads'
    ~150 MB/s of writes kept the kernel's writeback threads busy (at nice 0, outside the
    load's session groups): 841 of the supernode's Redis scripts took over 25 ms in a
    40 s run, and 31 with the hosts in RAM. Those writes are the clients' machines' cost,
    not the supernode's (its own cache stays on disk, in `work`)."""
    need = downloads * 2 * 6 * MIB + (1 << 30)
    ram = RAM_DIR
    with contextlib.suppress(OSError, ValueError, StopIteration):
        st = os.statvfs(ram)
        avail_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
        if (st.f_bavail * st.f_frsize >= need and avail_kib * 1024 >= need + (4 << 30)
                and os.access(ram, os.W_OK)):
            return Path(tempfile.mkdtemp(prefix="bench-soak-hosts-", dir=ram))
    d = work / "hosts"
    d.mkdir()
    return d


def _sched_idle(pid: int) -> bool:
    try:
        return os.sched_getscheduler(pid) == os.SCHED_IDLE
    except (OSError, AttributeError):
        return False


def _drop_hosts_dir(hosts_dir: Path, logs: Path) -> None:
    """After a failed run: the hosts' peer-server logs go to `logs` (kept on disk with the
    rest of the work directory) and a hosts directory in RAM is removed, as it would
    otherwise hold memory until the next boot."""
    if not _in_ram(hosts_dir):
        return
    for log in hosts_dir.glob("host*/logs/server.log"):
        with contextlib.suppress(OSError):
            (logs / f"{log.parent.parent.name}-server.log").write_bytes(log.read_bytes())
    subprocess.run(["rm", "-rf", str(hosts_dir)], check=False)
    print(f"soak failed: logs kept in {logs}", file=sys.stderr)


def _log(opened: list[Any], path: Path) -> Any:
    f = open(path, "wb")  # noqa: SIM115 - closed by run() when the process is done
    opened.append(f)
    return f


def _result(p: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    """A load process's report: the last line of its stdout, which went to a file (a pipe
    nobody reads while the run goes on fills at 64 KiB and blocks the writer for ever:
    a 5-minute run's report is larger than that)."""
    code = p.wait()
    lines = out.read_text().strip().splitlines() if out.exists() else []
    if code != 0 or not lines:
        return {"errors": {"load_process_failed": 1}, "last_error": f"{p.args!r} exited with {p.returncode}"}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def _prefetch(api: str, url: str) -> None:
    """The simulated clients' task is fetched by the CDN before the clock starts."""
    from bench.scheduler import _http, wait_task_done

    tid = _http("POST", f"{api}/api/v1/tasks", {"url": url})["task"]["task_id"]
    task = wait_task_done(api, tid, timeout=120.0)
    if task["status"] != "success":
        raise SystemExit(f"CDN fetch of the simulated task failed: {task}")


def _scrape(api: str) -> dict[str, dict[float, float]]:
    """The supernode's unlabelled histograms from /metrics: name -> {upper bound: cumulative count}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{api}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {f.name: {float(s.labels["le"]): s.value for s in f.samples
                     if s.name.endswith("_bucket") and s.labels.keys() == {"le"}}
            for f in text_string_to_metric_families(text) if f.type == "histogram"}


def _hist_pct(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The bucket bound (ms) under which a fraction q of the observations between two scrapes fall."""
    diff = sorted((le, n - before.get(le, 0.0)) for le, n in after.items())
    if not diff or diff[-1][1] <= 0:
        return None
    for le, n in diff:
        if n >= q * diff[-1][1]:
            return le * 1000 if le != float("inf") else None
    return None


def _summary(args: argparse.Namespace, sims: list[dict[str, Any]], dls: list[dict[str, Any]],
             rss0: dict[str, int], rss1: dict[str, int], timeline: list[tuple[float, float]],
             tracebacks: int, sn_alive: bool, cpu: tuple[float, float, float], work: Path) -> dict[str, Any]:
    lat = [x for r in sims for x in r.get("lat", [])]
    durations = [x for r in dls for x in r.get("durations", [])]
    errors: dict[str, int] = {}
    for r in sims + dls:
        for k, v in r.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
    if tracebacks:
        errors["tracebacks_in_logs"] = tracebacks
    if not sn_alive:
        errors["supernode_died"] = 1
    start_mib, end_mib = rss0["VmRSS"] / MIB, rss1["VmRSS"] / MIB
    return {
        "duration_s": args.duration, "clients": args.clients, "think_s": args.think,
        "downloads_concurrent": sum(r.get("concurrent", 0) for r in dls), "hosts": args.hosts,
        "download_nice": args.download_nice, "load_nice": args.load_nice, "sim_nice": args.sim_nice,
        "load_sched": args.load_sched_ran,
        "errors": sum(errors.values()), "errors_by_kind": errors,
        "last_errors": [r["last_error"] for r in sims + dls if r.get("last_error")][:5],
        "back_to_source": sum(r.get("back_to_source", 0) for r in dls),
        "downloads_ok": sum(r.get("ok", 0) for r in dls), "download_mib": round(sum(r.get("bytes", 0) for r in dls) / MIB),
        "from_peers_pct": round(100 * sum(r.get("from_peers", 0) for r in dls) / max(1, sum(r.get("bytes", 0) for r in dls))),
        "download_p50_s": round(pct(durations, 0.5), 2), "download_p99_s": round(pct(durations, 0.99), 2),
        "pulls": len(lat), "pulls_per_s": round(len(lat) / max(args.duration, 1)),
        "pull_p50_ms": round(pct(lat, 0.5) * 1000, 1), "pull_p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "assignments": sum(r.get("assigned", 0) for r in sims),
        "sim_finished": sum(r.get("finished", 0) for r in sims),
        "throttled_429": sum(r.get("throttled", 0) for r in sims),
        "busy_503": sum(r.get("busy", 0) for r in sims),
        "reregistered": sum(r.get("reregistered", 0) for r in sims),
        "supernode_rss_start_mib": round(start_mib, 1), "supernode_rss_end_mib": round(end_mib, 1),
        "supernode_rss_growth_pct": round(100 * (end_mib - start_mib) / start_mib, 1),
        "supernode_hwm_end_mib": round(rss1["VmHWM"] / MIB, 1),
        "cpu_supernode_pct": round(100 * cpu[0] / max(cpu[2], 1e-9)), "cpu_redis_pct": round(100 * cpu[1] / max(cpu[2], 1e-9)),
        "rss_timeline": timeline, "work_dir": str(work) if args.keep else None,
    }


ROWS = [
    ("errors (target 0)", "errors"), ("errors by kind", "errors_by_kind"),
    ("downloads back to the origin (target 0)", "back_to_source"),
    ("origin bytes per task, x F (target 1.0 each)", "origin_exactly_once"),
    ("dfget downloads ok / concurrent / nice", ("downloads_ok", "downloads_concurrent", "download_nice")),
    ("nice of the origin / of the simulated clients (supernode and Redis: 0)", ("load_nice", "sim_nice")),
    ("scheduling class of the origin and the downloads", "load_sched"),
    ("download hosts' homes and files in RAM (/dev/shm)", "hosts_in_ram"),
    ("downloaded MiB / from peers %", ("download_mib", "from_peers_pct")),
    ("download time p50 / p99 s", ("download_p50_s", "download_p99_s")),
    ("simulated clients / think s", ("clients", "think_s")), ("pulls / pulls per s", ("pulls", "pulls_per_s")),
    ("pull latency p50 / p99 ms", ("pull_p50_ms", "pull_p99_ms")),
    ("this machine's CPU stalls (bench.stalls): count / longest ms / % of CPU time",
     ("host_stalls.count", "host_stalls.longest_ms", "host_stalls.stalled_pct")),
    ("pulls in flight during a CPU stall (either CPU) / pull p99 of the others ms",
     ("pulls_overlapping_stalls", "pull_p99_outside_stalls_ms")),
    ("supernode's scheduling of a pull p50 / p99 ms (bucket bound)", ("schedule_p50_ms", "schedule_p99_ms")),
    ("supernode's event-loop lag p50 / p99 ms (bucket bound)", ("loop_lag_p50_ms", "loop_lag_p99_ms")),
    ("supernode's store script round trip p50 / p99 ms (bucket bound)", ("store_script_p50_ms", "store_script_p99_ms")),
    ("assignments / clients finished", ("assignments", "sim_finished")),
    ("429 / 503 busy waited out / re-registrations", ("throttled_429", "busy_503", "reregistered")),
    ("supernode RSS start -> end MiB", ("supernode_rss_start_mib", "supernode_rss_end_mib")),
    ("supernode RSS growth % (target <= 20)", "supernode_rss_growth_pct"),
    ("supernode VmHWM MiB", "supernode_hwm_end_mib"),
    ("CPU % supernode / Redis", ("cpu_supernode_pct", "cpu_redis_pct")),
]


def table(r: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for label, key in ROWS:
        keys = key if isinstance(key, tuple) else (key,)
        lines.append(f"| {label} | " + " / ".join(str(_get(r, k)) for k in keys) + " |")
    met = (r["errors"] == 0 and r["back_to_source"] == 0 and r["origin_exactly_once"]
           and r["supernode_rss_growth_pct"] <= 20 and r["pull_p99_ms"] < 50)
    lines += ["", "Targets (0 errors, 0 back to source, origin 1.00 x F per task, RSS growth <= 20 %, "
              f"pull p99 < 50 ms): {'met' if met else 'NOT met'}."]
    st = r.get("host_stalls") or {}
    if st.get("count"):
        lines += ["", f"The CPUs of this machine stopped {st['count']} times ({st['per_minute']} a minute per CPU, "
                  f"median {st['median_ms']} ms, {st['stalled_pct']} % of the CPU time) while a probe at "
                  f"{'/'.join(st['policy'])} wanted to run: on a virtual machine, time its host did not give it. A pull "
                  f"in flight on a stopped CPU waits out the rest of the stop; {r['pulls_overlapping_stalls']} pulls "
                  "were in flight while one of the CPUs was stopped."]
    if r["last_errors"]:
        lines += ["", "Last errors: " + "; ".join(r["last_errors"])]
    return "\n".join(lines)


def _get(r: dict[str, Any], key: str) -> Any:
    """r[key], where "a.b" is r["a"]["b"]."""
    for part in key.split("."):
        r = r.get(part) if isinstance(r, dict) else None  # type: ignore[assignment]
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 5 minutes)")
    p.add_argument("--downloads", type=int, default=200, help="concurrent dfget downloads")
    p.add_argument("--hosts", type=int, default=20, help="dfget hosts (peer servers); downloads/hosts tasks")
    p.add_argument("--clients", type=int, default=2000, help="simulated clients")
    p.add_argument("--think", type=float, default=10.0, help="mean seconds between a simulated client's pulls")
    p.add_argument("--sim-pieces", type=int, default=50, help="pieces of the simulated clients' task")
    p.add_argument("--sim-procs", type=int, default=2)
    p.add_argument("--dl-procs", type=int, default=2)
    p.add_argument("--load-nice", type=int, default=LOAD_NICE,
                   help="nice level of the load: the origin and the downloads (with the peer servers they "
                        f"start); default {LOAD_NICE}, so that the supernode under test gets the CPU it would have "
                        "on a host of its own (0: everything competes equally)")
    p.add_argument("--load-sched", choices=("idle", "normal"), default="idle",
                   help="the load's scheduling class: idle (default; SCHED_IDLE where the kernel has it, at its "
                        "nice level too): the origin and the downloads give up their CPU the moment the supernode, "
                        "Redis or a simulated client wakes, as on hosts of their own; normal: their nice level only")
    p.add_argument("--sim-nice", type=int, default=0,
                   help="nice level of the simulated clients (default 0: they measure the pull latency, and "
                        "their own wait for a CPU would count in it)")
    p.add_argument("--download-nice", type=int, default=None,
                   help="the downloads' (and their peer servers') nice level, if not --load-nice's")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12"))
    p.add_argument("--supernode-arg", action="append", default=[], help="extra supernode option (repeatable)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default="soak", help="result files' name: <out>/<name>.md and .json")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, homes)")
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    for hidden in ("--api", "--url", "--first", "--count", "--start-at", "--stop-at", "--api-port", "--work",
                   "--tasks-file", "--per-host"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--hosts-list", dest="hosts_list", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role in ("sim", "dl"):
        args.stop_at = float(args.stop_at)
        time.sleep(max(0.0, float(args.start_at) - time.time()))
        if os.environ.get("SOAK_LOG"):  # e.g. SOAK_LOG=INFO: the load processes' own logs
            import logging

            logging.basicConfig(level=os.environ["SOAK_LOG"], format="%(asctime)s %(name)s %(message)s")
        if args.role == "sim":
            args.first, args.count = int(args.first), int(args.count)
            out = asyncio.run(run_sim(args))
        else:
            args.api_port, args.per_host = int(args.api_port), int(args.per_host)
            out = asyncio.run(run_downloads(args))
        print(json.dumps(out), flush=True)
        return
    if args.download_nice is None:
        args.download_nice = args.load_nice
    if args.downloads < 1 or args.hosts < 1 or args.downloads % args.hosts:
        raise SystemExit("--downloads must be a positive multiple of --hosts")
    result = run(args)
    text = table(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = code_version()
    nice = f" --load-nice {args.load_nice}" if args.load_nice != LOAD_NICE else ""
    nice += f" --download-nice {args.download_nice}" if args.download_nice != args.load_nice else ""
    nice += f" --sim-nice {args.sim_nice}" if args.sim_nice else ""
    nice += f" --load-sched {args.load_sched}" if args.load_sched != "idle" else ""
    head = (f"# Soak\n\n`python -m bench.soak --duration {args.duration:g} --downloads {args.downloads} "
            f"--hosts {args.hosts} --clients {args.clients} --think {args.think:g}{nice}` on {os.cpu_count()} cores "
            f"({time.strftime('%Y-%m-%d %H:%M')}, code {commit}); origin, supernode, Redis, {args.hosts} peer "
            "servers and the load processes share them.\n\n")
    result["date"], result["commit"] = time.strftime("%Y-%m-%d %H:%M"), commit
    (out / f"{args.name}.md").write_text(head + text + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
