"""One client, one big file on loopback: curl straight from the origin vs dfget through
the supernode with a cold CDN and with a warm CDN, side by side.

    python -m bench.single --size 1GiB [--size 4GiB] [--runs 3] [--out bench/results]

Per size: one source file (random bytes), one `bench.origin` (no rate cap) and one peer
server (`dfget server`, pre-started so its start-up is not timed). Per run: a fresh
supernode home (so the CDN is cold) and a URL with a per-run query (a new task id), then

  curl   `curl -o` from the origin
  cold   dfget through the supernode; the CDN fetches from the origin meanwhile
  warm   dfget again, same task, new output path; the CDN already holds every piece

All outputs go to one directory on the same disk as the source and the CDN cache. Times
are wall clock of the whole command (process start-up, imports and for dfget its final
fsync included). dfget's peak RSS is GNU time's %M for that process alone; the peer
server's and the supernode's are their VmHWM. Every output is sha256-checked against
the source after it is timed. Ratios use the best of the runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.units import parse_size

from .version import code_version

PY = sys.executable
MIB = 1 << 20
GEN_CHUNK = 16 * MIB


KINDS = ("curl", "cold", "warm", "cold_start", "warm_start")


@dataclass
class Run:
    kind: str  # curl | cold | warm | cold_start | warm_start (see the module docstring)
    run: int
    seconds: float
    rss_kib: int
    ok: bool
    report: dict[str, Any] = field(default_factory=dict)
    cpu_s: float = 0.0  # user + system CPU of the command itself
    peer_cpu_s: float = 0.0  # of the peer server meanwhile (the one pre-started, or the one dfget started)
    supernode_cpu_s: float = 0.0


@dataclass
class SizeResult:
    size: int
    runs: list[Run] = field(default_factory=list)
    peer_server_rss_kib: int = 0
    supernode_rss_kib: list[int] = field(default_factory=list)
    origin_rss_kib: int = 0

    def times(self, kind: str) -> list[float]:
        return [r.seconds for r in self.runs if r.kind == kind and r.ok]

    def best(self, kind: str) -> float:
        t = self.times(kind)
        return min(t) if t else float("nan")

    def rss(self, kind: str) -> int:
        return max((r.rss_kib for r in self.runs if r.kind == kind), default=0)

    def cpu_per_gib(self, kind: str, what: str = "cpu_s") -> float:
        """Of the fastest run of that kind (the least disturbed by the machine's other work)."""
        runs = [r for r in self.runs if r.kind == kind and r.ok]
        if not runs:
            return float("nan")
        best = min(runs, key=lambda r: r.seconds)
        return float(getattr(best, what)) / (self.size / (1 << 30))


# --- processes ------------------------------------------------------------------------------
class Procs:
    """Every background process we start, stopped (whole process group) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, cwd=cwd)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 10) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        with contextlib.suppress(ValueError):
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            v = check()
            if v:
                return v
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def unix_info(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(b"GET /info HTTP/1.0\r\nHost: x\r\n\r\n")
        return s.recv(64).split(b" ")[1:2] == [b"200"]


TIME = "/usr/bin/time"


def run_timed(cmd: list[str], cwd: Path) -> tuple[float, int, int, bytes, float]:
    """Wall seconds, peak RSS (KiB) of that command alone, exit status, stdout, CPU seconds.

    The RSS comes from GNU time run as the command's parent: Linux carries ru_maxrss
    over exec, so a child forked straight from this (big) Python process would report
    our RSS at fork time instead of its own.
    """
    rss_file = cwd / ".rss"
    unlink(rss_file)
    wrapped = [TIME, "-q", "-f", "%M %U %S", "-o", str(rss_file), *cmd] if os.access(TIME, os.X_OK) else cmd
    t0 = time.perf_counter()
    p = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    try:
        out, err = p.communicate()
    except BaseException:
        p.kill()
        p.wait()
        raise
    dt = time.perf_counter() - t0
    if p.returncode != 0 and err.strip():
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    rss, cpu = 0, 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        m, u, s = rss_file.read_text().split()[-3:]
        rss, cpu = int(m), float(u) + float(s)
    unlink(rss_file)
    return dt, rss, p.returncode, out, cpu


# --- files ------------------------------------------------------------------------------------
def make_source(path: Path, size: int) -> str:
    rnd = random.Random(size)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = rnd.randbytes(min(GEN_CHUNK, left))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(GEN_CHUNK):
            h.update(block)
    return h.hexdigest()


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# --- one size ---------------------------------------------------------------------------------
def bench_size(size: int, runs: int, work: Path, procs: Procs, verbose: bool) -> SizeResult:
    res = SizeResult(size)
    src_dir, out_dir, logs = work / "origin", work / "out", work / "logs"
    for d in (src_dir, out_dir, logs):
        d.mkdir(parents=True, exist_ok=True)
    src = src_dir / "file.bin"
    t0 = time.perf_counter()
    want = make_source(src, size)
    print(f"  source: {size / MIB:.0f} MiB written in {time.perf_counter() - t0:.1f} s", flush=True)

    port_file = work / "origin.port"
    unlink(port_file)
    origin = procs.start([PY, "-m", "bench.origin", "--dir", str(src_dir), "--port-file", str(port_file)],
                         logs / "origin.log")
    oport = int(wait_until(lambda: port_file.read_text().strip(), "origin"))

    peer_home = work / "dfget-home"
    shutil.rmtree(peer_home, ignore_errors=True)
    server = procs.start([PY, "-m", "dfget", "server", "--home", str(peer_home), "--ip", "127.0.0.1",
                          "--alivetime", "1h", "--expiretime", "1h"], logs / "peer-server.log")
    from dfget.server.protocol import socket_path
    wait_until(lambda: unix_info(socket_path(peer_home)), "peer server")

    try:
        for r in range(1, runs + 1):
            base = f"http://127.0.0.1:{oport}/files/file.bin"
            # curl first: the source is in the page cache for every contender alike.
            out = out_dir / "curl.bin"
            dt, rss, code, _, cpu = run_timed(["curl", "-sS", "--fail", "-o", str(out), base], out_dir)
            res.runs.append(Run("curl", r, dt, rss, code == 0 and sha256_file(out) == want, cpu_s=cpu))
            unlink(out)
            _print_run(res.runs[-1], size)

            sn_home = work / f"sn-home-{r}"
            api, dl = free_port(), free_port()
            sn = start_supernode(procs, sn_home, api, dl, logs / f"supernode-{r}.log")
            # cold/warm: this host's peer server pre-started; *_start: a fresh home, so the
            # timed command includes starting the peer server. A new task id per pair: the
            # CDN starts cold.
            pairs = (("cold", "warm", peer_home, peer_home),
                     ("cold_start", "warm_start", work / f"home-c{r}", work / f"home-w{r}"))
            for k, (cold_kind, warm_kind, cold_home, warm_home) in enumerate(pairs):
                url = f"{base}?run={size}-{r}-{k}-{os.getpid()}"
                for kind, home in ((cold_kind, cold_home), (warm_kind, warm_home)):
                    out = out_dir / f"{kind}.bin"
                    res.runs.append(timed_dfget(kind, r, url, out, api, home, server, sn, out_dir, want))
                    unlink(out)
                    _print_run(res.runs[-1], size)
            res.supernode_rss_kib.append(vm_hwm_kib(sn.pid))
            procs.stop(sn)
            shutil.rmtree(sn_home, ignore_errors=True)
        res.peer_server_rss_kib = vm_hwm_kib(server.pid)
        res.origin_rss_kib = vm_hwm_kib(origin.pid)
    finally:
        procs.stop(server)
        procs.stop(origin)
        unlink(src)
    return res


def start_supernode(procs: Procs, home: Path, api: int, dl: int, log: Path) -> subprocess.Popen[bytes]:
    sn = procs.start([PY, "-m", "supernode", "--listen", "127.0.0.1", "--port", str(api),
                      "--download-port", str(dl), "--home", str(home), "--advertise-ip",
                      "127.0.0.1", "--allow-origin", "127.0.0.0/8", "--allow-peer", "127.0.0.0/8",
                      "--max-bandwidth", "0", "--log-level", "warning"], log)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{api}/_ping"), "supernode")
    return sn


def timed_dfget(kind: str, r: int, url: str, out: Path, api: int, home: Path,
                server: subprocess.Popen[bytes], sn: subprocess.Popen[bytes], cwd: Path,
                want: str | None) -> Run:
    """One dfget with default flags (plus --notbs, so a P2P failure is not hidden by the
    origin, --json for the report and -B for no progress bar). A peer server it starts
    is stopped afterwards and its CPU counted (start-up included)."""
    fresh = kind.endswith("_start")
    if fresh:
        shutil.rmtree(home, ignore_errors=True)
    peer0, sn0 = (0.0 if fresh else cpu_seconds(server.pid)), cpu_seconds(sn.pid)
    cmd = [PY, "-m", "dfget", "-u", url, "-o", str(out), "--node", f"127.0.0.1:{api}",
           "--home", str(home), "--notbs", "--json", "-B"]
    dt, rss, code, stdout, cpu = run_timed(cmd, cwd)
    sn_cpu = cpu_seconds(sn.pid) - sn0
    report = _last_json(stdout)
    ok = code == 0 and (want is None or sha256_file(out) == want)
    peer_cpu = (cpu_seconds(server.pid) - peer0) if not fresh else stop_fresh_server(home)
    return Run(kind, r, dt, rss, ok, report, cpu, peer_cpu, sn_cpu)


def stop_fresh_server(home: Path) -> float:
    """CPU seconds of the peer server a dfget started in `home` (its whole life), then stop it."""
    from dfget.server.protocol import socket_path

    with contextlib.suppress(RuntimeError):
        wait_until(lambda: unix_info(socket_path(home)), "peer server", timeout=15)
    pid = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                if b"server" in cmd and b"--home" in cmd and cmd[cmd.index(b"--home") + 1] == os.fsencode(home):
                    pid = int(entry.name)
    cpu = cpu_seconds(pid) if pid else 0.0
    subprocess.run([PY, "-m", "dfget", "server", "stop", "--home", str(home)], capture_output=True, timeout=30)
    if pid and cpu_seconds(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(home, ignore_errors=True)
    return cpu


def bench_fixed(runs: int, work: Path, procs: Procs) -> SizeResult:
    """The fixed cost: a 16-byte file, a new task each time (so the supernode fetches it
    from the origin too), dfget with this host's peer server not running (fixed_start:
    the command starts it) and running (fixed_running), against curl."""
    res = SizeResult(16)
    src_dir, out_dir, logs = work / "origin-tiny", work / "out", work / "logs"
    for d in (src_dir, out_dir, logs):
        d.mkdir(parents=True, exist_ok=True)
    data = os.urandom(16)
    (src_dir / "tiny.bin").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    port_file = work / "origin-tiny.port"
    origin = procs.start([PY, "-m", "bench.origin", "--dir", str(src_dir), "--port-file", str(port_file)],
                         logs / "origin-tiny.log")
    oport = int(wait_until(lambda: port_file.read_text().strip(), "origin"))
    home = work / "tiny-home"
    server = procs.start([PY, "-m", "dfget", "server", "--home", str(home), "--ip", "127.0.0.1",
                          "--alivetime", "1h", "--expiretime", "1h"], logs / "peer-server-tiny.log")
    from dfget.server.protocol import socket_path
    wait_until(lambda: unix_info(socket_path(home)), "peer server")
    api, dl = free_port(), free_port()
    sn = start_supernode(procs, work / "sn-tiny", api, dl, logs / "supernode-tiny.log")
    try:
        base = f"http://127.0.0.1:{oport}/files/tiny.bin"
        for r in range(1, runs + 1):
            out = out_dir / "tiny-curl.bin"
            dt, rss, code, _, cpu = run_timed(["curl", "-sS", "--fail", "-o", str(out), base], out_dir)
            res.runs.append(Run("curl", r, dt, rss, code == 0 and sha256_file(out) == want, cpu_s=cpu))
            for kind, h in (("fixed_start", work / f"tiny-fresh-{r}"), ("fixed_running", home)):
                time.sleep(0.5)  # the previous run's peer server settles (it imports for ~0.3 s)
                url = f"{base}?run={r}-{kind}-{os.getpid()}"
                out = out_dir / f"tiny-{kind}.bin"
                res.runs.append(timed_dfget(kind, r, url, out, api, h, server, sn, out_dir, want))
                unlink(out)
            print("  " + "  ".join(f"{x.kind} {x.seconds:.3f} s" for x in res.runs[-3:]), flush=True)
    finally:
        procs.stop(sn)
        procs.stop(server)
        procs.stop(origin)
    return res


def _last_json(stdout: bytes) -> dict[str, Any]:
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            v = json.loads(line)
            if isinstance(v, dict):
                return v
    return {}


def _print_run(r: Run, size: int) -> None:
    rate = size / r.seconds / MIB if r.seconds else 0
    rss = f"  rss {r.rss_kib / 1024:5.1f} MiB" if r.kind != "curl" else ""
    print(f"  run {r.run} {r.kind:5s} {r.seconds:7.2f} s  {rate:7.0f} MiB/s{rss}  "
          f"{'ok' if r.ok else 'FAILED'}", flush=True)


# --- report -----------------------------------------------------------------------------------
def table(results: list[SizeResult], runs: int) -> str:
    lines = [
        "| size | curl (s) | dfget cold (s) | cold/curl | dfget warm (s) | warm/curl | "
        "cold, server start (s) | /curl | warm, server start (s) | /curl | "
        "dfget peak RSS (MiB) | peer server RSS (MiB) | supernode RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        curl = r.best("curl")
        cells = []
        for k in ("cold", "warm", "cold_start", "warm_start"):
            cells += [f"{r.best(k):.2f}", f"{r.best(k) / curl:.2f}x"]
        rss = max(r.rss(k) for k in KINDS[1:])
        lines.append(
            f"| {r.size / (1 << 30):g} GiB | {curl:.2f} | {' | '.join(cells)} | {rss / 1024:.1f} | "
            f"{r.peer_server_rss_kib / 1024:.1f} | {max(r.supernode_rss_kib, default=0) / 1024:.1f} |")
    return "\n".join(lines)


def cpu_table(results: list[SizeResult]) -> str:
    lines = ["| size | kind | dfget CPU-s/GiB | peer server CPU-s/GiB | supernode CPU-s/GiB | curl CPU-s/GiB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for k in KINDS[1:]:
            lines.append(f"| {r.size / (1 << 30):g} GiB | {k} | {r.cpu_per_gib(k):.2f} | "
                         f"{r.cpu_per_gib(k, 'peer_cpu_s'):.2f} | {r.cpu_per_gib(k, 'supernode_cpu_s'):.2f} | "
                         f"{r.cpu_per_gib('curl'):.2f} |")
    return "\n".join(lines)


def fixed_table(fixed: SizeResult | None) -> str:
    if fixed is None:
        return "(not measured: --no-fixed)"
    lines = ["| | best (s) | median (s) |", "|---|---|---|"]
    for k, what in (("curl", "curl"), ("fixed_start", "dfget, peer server not running (started by the command)"),
                    ("fixed_running", "dfget, peer server running")):
        t = fixed.times(k)
        lines.append(f"| {what} | {fixed.best(k):.3f} | {statistics.median(t) if t else float('nan'):.3f} |")
    return "\n".join(lines)


def write_results(results: list[SizeResult], fixed: SizeResult | None, runs: int, out: Path,
                  meta: dict[str, Any], notes: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    kinds = KINDS[1:]
    data = {"meta": meta, "sizes": [asdict(r) | {
        "best_s": {k: r.best(k) for k in KINDS},
        "median_s": {k: statistics.median(r.times(k)) if r.times(k) else None for k in KINDS},
        "ratio": {k: r.best(k) / r.best("curl") for k in kinds},
        "dfget_peak_rss_kib": max(r.rss(k) for k in kinds),
        "cpu_s_per_gib": {k: {"dfget": r.cpu_per_gib(k), "peer_server": r.cpu_per_gib(k, "peer_cpu_s"),
                              "supernode": r.cpu_per_gib(k, "supernode_cpu_s")} for k in kinds}
                         | {"curl": r.cpu_per_gib("curl")},
    } for r in results],
        "fixed_cost": None if fixed is None else asdict(fixed) | {
            "best_s": {k: fixed.best(k) for k in ("curl", "fixed_start", "fixed_running")},
            "median_s": {k: statistics.median(fixed.times(k)) if fixed.times(k) else None
                         for k in ("curl", "fixed_start", "fixed_running")}}}
    (out / f"{meta.get('name', 'single')}.json").write_text(json.dumps(data, indent=2) + "\n")
    all_runs = "\n".join(
        f"| {r.size / (1 << 30):g} GiB | {x.run} | {x.kind} | {x.seconds:.2f} | "
        f"{x.rss_kib / 1024:.1f} | {x.cpu_s:.2f} | {x.peer_cpu_s:.2f} | {x.supernode_cpu_s:.2f} | "
        f"{'ok' if x.ok else 'FAILED'} |"
        for r in results for x in r.runs)
    md = f"""# bench.single: one client, one file, loopback

`python -m bench.single {meta['argv']}` on {meta['host']} ({meta['cpus']} CPUs, Python {meta['python']}),
{meta['date']}, code {meta['commit']}. Every contender ran in the same run, back to back
(see the notes below for what else the machine did meanwhile).

Best of {runs} runs, wall clock of the whole command (process start-up, imports and
dfget's final fsync included), dfget with default flags (no rate cap; plus `--notbs
--json -B`). *cold*/*warm*: the CDN does not/does hold the file, this host's peer server
pre-started. *server start*: the same with a fresh `--home`, so the command also starts
the peer server. curl writes with `-o` and does not fsync. Source, CDN cache and outputs
on one disk; the source file is in the page cache. Every output sha256-verified.

{table(results, runs)}

Targets (issue 11): cold <= 1.25x curl, warm <= 1.10x curl, dfget peak RSS <= 64 MiB and
flat in size.

## CPU seconds per GiB (fastest run of each kind)

User + system CPU of the dfget command, of the peer server during it (for *server start*:
its whole life, start-up included) and of the supernode during it (the CDN fetch on cold
runs, the seed's uploads on all).

{cpu_table(results)}

## Fixed cost: a 16-byte file (best and median of {runs})

{fixed_table(fixed)}

Goal (issue 11): <= 0.30 s with the peer server not running, <= 0.15 s with it running.
{notes}
## All runs

| size | run | kind | seconds | peak RSS (MiB) | CPU s | peer server CPU s | supernode CPU s | check |
|---|---|---|---|---|---|---|---|---|
{all_runs}
"""
    (out / f"{meta.get('name', 'single')}.md").write_text(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.single", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", type=parse_size, help="file size, e.g. 1GiB (repeatable)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="bench/results", help="where single.md and single.json go")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new one under /tmp)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--no-fixed", action="store_true", help="skip the 16-byte fixed-cost runs")
    p.add_argument("--fixed-only", action="store_true", help="only the 16-byte fixed-cost runs")
    p.add_argument("--name", default="single", help="result files' name: <out>/<name>.md and .json")
    p.add_argument("--notes", default="", help="a file whose text goes into single.md's notes")
    args = p.parse_args(argv)
    # Every command runs with Python's bytecode cache, as an installed package does (pip
    # writes the .pyc files): a PYTHONDONTWRITEBYTECODE in our environment would make each
    # dfget compile its modules from source again (about 50 ms of the fixed cost).
    bytecode_off = os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None
    sizes = [] if args.fixed_only else (args.size or [1 << 30])
    if shutil.which("curl") is None:
        p.error("curl is required")
    work = Path(tempfile.mkdtemp(prefix="bench-single-", dir=args.workdir))
    need = max(sizes, default=0) * 3 + (1 << 30)
    if shutil.disk_usage(work).free < need:
        p.error(f"need {need / (1 << 30):.1f} GiB free in {work}")

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    procs = Procs()
    results: list[SizeResult] = []
    fixed: SizeResult | None = None
    try:
        if not args.no_fixed:
            print(f"fixed cost: 16 bytes, {args.runs} runs", flush=True)
            fixed = bench_fixed(args.runs, work, procs)
        for size in sizes:
            print(f"size {size / MIB:.0f} MiB, {args.runs} runs (scratch {work})", flush=True)
            results.append(bench_size(size, args.runs, work, procs, args.verbose))
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    meta = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "runs": args.runs, "commit": code_version(), "name": args.name}
    print()
    print(table(results, args.runs))
    print()
    print(cpu_table(results))
    print()
    print(fixed_table(fixed))
    notes = Path(args.notes).read_text() if args.notes else ""
    if bytecode_off:
        notes += ("\nPYTHONDONTWRITEBYTECODE was set where this ran; the commands ran without it "
                  "(bytecode cache on, as for an installed package).\n")
    write_results(results, fixed, args.runs, Path(args.out), meta, notes)
    print(f"\nwritten {args.out}/{args.name}.md and {args.name}.json")
    return 0 if all(r.ok for s in results + ([fixed] if fixed else []) for r in s.runs) else 1



if __name__ == "__main__":
    sys.exit(main())
