"""How long this machine stops running a thread that wants to run: a probe per CPU.

    python -m bench.stalls [--seconds 30] [--cpu 0] [--out stalls.json]

A probe is pinned to one CPU, runs at the highest priority it may have (SCHED_FIFO as
root, else nice -20, else as it is; the result names it) and wakes every 5 ms; every
wake-up later than `--gap-ms` (10) after the previous one is a stall. The gap between
two wake-ups holds any stop whole, so every stop of 10 ms or more makes one; so may a
stop of 5-10 ms (the gap is up to the stop plus one period). A stall is recorded as the
time from the missed wake-up to the late one, which the stop certainly covered. The
probe wakes no more often than that because it costs what it measures: at SCHED_FIFO
every wake-up preempts whatever runs on its CPU. Waking every 0.5 ms, the two probes
took 14 % of this 2-core machine and woke 4,000 times a second between them, each time
taking the CPU from whatever ran there, the supernode included; a 60 s soak's pull p99
was 82 ms with them and 45 ms without. At SCHED_FIFO nothing inside this machine could
have held it back that long, so a stall is time the CPU itself did not run: on a
virtual machine, time the host did not give that vCPU (its other work, or a CPU quota
on the VM), which the guest counts as steal. At a lower
priority a stall may also be this machine's own load.

Any latency a benchmark measures on this machine has these stalls as a floor: a request
in flight on a CPU that stops for 100 ms takes at least 100 ms. bench.soak runs one probe
per CPU during its load and reports which of its pulls overlapped a stall. Alone, without
`--cpu`, one probe per CPU runs and a summary is printed.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WAKE_S = 0.005  # well below GAP_MS, so that an ordinary sleep is never a stall
GAP_MS = 10.0


def _raise_priority() -> str:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "SCHED_FIFO"
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -20)
        return "nice -20"
    return f"nice {os.nice(0)}"


def probe(cpu: int, start_at: float, stop_at: float, gap_ms: float = GAP_MS, ready: str | None = None) -> dict[str, Any]:
    """Stalls on `cpu` between the wall times start_at and stop_at: [start, end] pairs.
    `ready`: a file touched when the probe starts watching."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {cpu})
    policy = _raise_priority()
    time.sleep(max(0.0, start_at - time.time()))
    if ready:
        Path(ready).touch()
    gap = gap_ms / 1000
    stalls: list[tuple[float, float]] = []
    # timed on the monotonic clock (a clock step is no stall), reported as wall times
    wall = time.time() - time.monotonic()
    last, stop = time.monotonic(), stop_at - wall
    while last < stop:
        time.sleep(WAKE_S)
        now = time.monotonic()
        if now - last > gap:  # from the wake-up it missed to the one that came
            stalls.append((round(last + WAKE_S + wall, 4), round(now + wall, 4)))
        last = now
    return {"cpu": cpu, "policy": policy, "gap_ms": gap_ms, "seconds": round(stop_at - start_at, 1),
            "stalls": stalls}


def start_probes(py: str, start_at: float, stop_at: float, out_dir: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """One probe process per CPU this process may use; each writes <out_dir>/stalls-<cpu>.json."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    started = []
    for cpu in cpus:
        out = out_dir / f"stalls-{cpu}.json"
        started.append((subprocess.Popen([py, "-m", "bench.stalls", "--cpu", str(cpu), "--start-at", str(start_at),
                                          "--stop-at", str(stop_at), "--out", str(out)],
                                         cwd=Path(__file__).resolve().parent.parent), out))
    return started


def collect(started: list[tuple[subprocess.Popen[bytes], Path]], timeout: float = 30.0) -> list[dict[str, Any]]:
    results = []
    for proc, out in started:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError, ValueError):
            results.append(json.loads(out.read_text()))
    return results


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Stalls of all CPUs together: count, the longest, and stalled ms per CPU-second."""
    stalls = [s for r in results for s in r["stalls"]]
    seconds = sum(r["seconds"] for r in results) or 1.0
    lengths = sorted(1000 * (b - a) for a, b in stalls)
    return {"cpus": len(results), "policy": sorted({r["policy"] for r in results}),
            "count": len(stalls), "longest_ms": round(lengths[-1], 1) if lengths else 0.0,
            "median_ms": round(lengths[len(lengths) // 2], 1) if lengths else 0.0,
            "stalled_pct": round(100 * sum(lengths) / 1000 / seconds, 2),
            "per_minute": round(60 * len(stalls) / seconds, 1)}  # per CPU


def overlaps(intervals: list[tuple[float, float]], stalls: list[tuple[float, float]]) -> list[bool]:
    """For each of `intervals`, whether it overlaps at least one stall (both [start, end]
    wall times)."""
    if not stalls:
        return [False] * len(intervals)
    stalls = sorted(stalls)
    starts = [s[0] for s in stalls]
    longest = max(b - a for a, b in stalls)
    hit = []
    for a, b in intervals:
        # a stall overlaps [a, b] if it starts before b and ends after a; those that end
        # after a start after a - longest
        i = bisect.bisect_left(starts, a - longest)
        j = bisect.bisect_right(starts, b)
        hit.append(any(stalls[k][1] > a for k in range(i, j)))
    return hit


def overlapping(intervals: list[tuple[float, float]], stalls: list[tuple[float, float]]) -> int:
    """How many of `intervals` overlap at least one stall."""
    return sum(overlaps(intervals, stalls))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stalls", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--cpu", type=int, help="probe this CPU only (default: one probe per CPU, and a summary)")
    p.add_argument("--gap-ms", type=float, default=GAP_MS, help="a wake-up this much late is a stall")
    p.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--out", help="write the result (JSON) here")
    p.add_argument("--ready", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gap_ms <= 1000 * WAKE_S:
        p.error(f"--gap-ms must be over {1000 * WAKE_S:g} (the probe's wake-up period)")
    start_at = args.start_at or time.time()
    stop_at = args.stop_at or start_at + args.seconds
    if args.cpu is not None:
        res = probe(args.cpu, start_at, stop_at, args.gap_ms, args.ready)
        if args.out:
            Path(args.out).write_text(json.dumps(res))
        else:
            print(json.dumps(res))
        return
    with tempfile.TemporaryDirectory(prefix="bench-stalls-") as tmp:
        started = start_probes(sys.executable, start_at, stop_at, Path(tmp))
        results = collect(started, timeout=stop_at - time.time() + 30)
    out = summary(results)
    print(json.dumps(out))
    if args.out:
        from .version import code_version

        commit = code_version()
        Path(args.out).write_text(json.dumps({
            "command": "python -m bench.stalls " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(start_at)), "commit": commit,
            "summary": out, "probes": results}, indent=1) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
