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

PY = sys.executable
MIB = 1 << 20
GEN_CHUNK = 16 * MIB


@dataclass
class Run:
    kind: str  # curl | cold | warm
    run: int
    seconds: float
    rss_kib: int
    ok: bool
    report: dict[str, Any] = field(default_factory=dict)


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
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback only
        return bool(resp.status == 200)


def unix_info(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(b"GET /info HTTP/1.0\r\nHost: x\r\n\r\n")
        return s.recv(64).split(b" ")[1:2] == [b"200"]


TIME = "/usr/bin/time"


def run_timed(cmd: list[str], cwd: Path) -> tuple[float, int, int, bytes]:
    """Wall seconds, peak RSS (KiB) of that command alone, exit status, stdout.

    The RSS comes from GNU time run as the command's parent: Linux carries ru_maxrss
    over exec, so a child forked straight from this (big) Python process would report
    our RSS at fork time instead of its own.
    """
    rss_file = cwd / ".rss"
    unlink(rss_file)
    wrapped = [TIME, "-q", "-f", "%M", "-o", str(rss_file), *cmd] if os.access(TIME, os.X_OK) else cmd
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
    rss = 0
    with contextlib.suppress(OSError, ValueError):
        rss = int(rss_file.read_text().split()[-1])
    unlink(rss_file)
    return dt, rss, p.returncode, out


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
            dt, rss, code, _ = run_timed(["curl", "-sS", "--fail", "-o", str(out), base], out_dir)
            res.runs.append(Run("curl", r, dt, rss, code == 0 and sha256_file(out) == want))
            unlink(out)
            _print_run(res.runs[-1], size)

            sn_home = work / f"sn-home-{r}"
            api, dl = free_port(), free_port()
            sn = procs.start([PY, "-m", "supernode", "--listen", "127.0.0.1", "--port", str(api),
                              "--download-port", str(dl), "--home", str(sn_home), "--advertise-ip",
                              "127.0.0.1", "--allow-origin", "127.0.0.0/8", "--allow-peer", "127.0.0.0/8",
                              "--max-bandwidth", "0",
                              "--log-level", "warning"], logs / f"supernode-{r}.log")
            wait_until(lambda: http_ok(f"http://127.0.0.1:{api}/_ping"), "supernode")
            url = f"{base}?run={size}-{r}-{os.getpid()}"  # a new task id: the CDN starts cold
            for kind in ("cold", "warm"):
                out = out_dir / f"{kind}.bin"
                cmd = [PY, "-m", "dfget", "-u", url, "-o", str(out), "--node", f"127.0.0.1:{api}",
                       "--home", str(peer_home), "-s", "0", "--notbs", "--json", "-B"]
                dt, rss, code, stdout = run_timed(cmd, out_dir)
                report = _last_json(stdout)
                ok = code == 0 and sha256_file(out) == want
                res.runs.append(Run(kind, r, dt, rss, ok, report))
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
        f"| size | curl (s) | dfget cold (s) | cold/curl | dfget warm (s) | warm/curl | "
        f"dfget peak RSS (MiB) | peer server RSS (MiB) | supernode RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        curl, cold, warm = r.best("curl"), r.best("cold"), r.best("warm")
        lines.append(
            f"| {r.size / (1 << 30):g} GiB | {curl:.2f} | {cold:.2f} | {cold / curl:.2f}x | {warm:.2f} | "
            f"{warm / curl:.2f}x | {max(r.rss('cold'), r.rss('warm')) / 1024:.1f} | "
            f"{r.peer_server_rss_kib / 1024:.1f} | {max(r.supernode_rss_kib, default=0) / 1024:.1f} |")
    return "\n".join(lines)


def write_results(results: list[SizeResult], runs: int, out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "sizes": [asdict(r) | {
        "best_s": {k: r.best(k) for k in ("curl", "cold", "warm")},
        "median_s": {k: statistics.median(r.times(k)) if r.times(k) else None for k in ("curl", "cold", "warm")},
        "ratio": {k: r.best(k) / r.best("curl") for k in ("cold", "warm")},
        "dfget_peak_rss_kib": max(r.rss("cold"), r.rss("warm")),
    } for r in results]}
    (out / "single.json").write_text(json.dumps(data, indent=2) + "\n")
    all_runs = "\n".join(
        f"| {r.size / (1 << 30):g} GiB | {x.run} | {x.kind} | {x.seconds:.2f} | "
        f"{x.rss_kib / 1024:.1f} | {'ok' if x.ok else 'FAILED'} |"
        for r in results for x in r.runs)
    md = f"""# bench.single: one client, one file, loopback

`python -m bench.single {meta['argv']}` on {meta['host']} ({meta['cpus']} CPUs, Python {meta['python']}), {meta['date']}.

Best of {runs} runs (wall clock of the whole command, process start-up included; the peer
server was pre-started once per size and is not timed). curl writes with `-o` and does not
fsync; dfget fsyncs before its atomic rename. Source, CDN cache and outputs on one disk;
the source file and the CDN's copy are in the page cache. Every output sha256-verified.

{table(results, runs)}

Targets: cold <= 1.3x curl, warm <= 1.15x curl, dfget peak RSS < 64 MiB and flat in size.

## All runs

| size | run | kind | seconds | peak RSS (MiB) | check |
|---|---|---|---|---|---|
{all_runs}
"""
    (out / "single.md").write_text(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.single", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", type=parse_size, help="file size, e.g. 1GiB (repeatable)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="bench/results", help="where single.md and single.json go")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new one under /tmp)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    sizes = args.size or [1 << 30]
    if shutil.which("curl") is None:
        p.error("curl is required")
    work = Path(tempfile.mkdtemp(prefix="bench-single-", dir=args.workdir))
    need = max(sizes) * 3 + (1 << 30)
    if shutil.disk_usage(work).free < need:
        p.error(f"need {need / (1 << 30):.1f} GiB free in {work}")

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    procs = Procs()
    results: list[SizeResult] = []
    try:
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
            "date": time.strftime("%Y-%m-%d %H:%M"), "runs": args.runs}
    print()
    print(table(results, args.runs))
    write_results(results, args.runs, Path(args.out), meta)
    print(f"\nwritten {args.out}/single.md and single.json")
    return 0 if all(r.ok for s in results for r in s.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
