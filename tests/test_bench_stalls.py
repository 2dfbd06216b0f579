"""bench.stalls: which intervals overlap a CPU stall, the summary, and a real probe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import stalls


def test_overlap_counts_each_interval_that_touches_a_stall() -> None:
    stopped = [(10.0, 10.1), (20.0, 20.5)]
    intervals = [(9.0, 9.99), (9.95, 10.05), (10.05, 10.2), (10.2, 19.9), (19.0, 21.0), (20.4, 20.45), (21.0, 22.0)]
    # before, straddling the start, straddling the end, between, around, inside the long one, after
    assert stalls.overlapping(intervals, stopped) == 4
    assert stalls.overlapping(intervals, []) == 0
    assert stalls.overlapping([], stopped) == 0


def test_summary_adds_up_every_cpu() -> None:
    results = [{"cpu": 0, "policy": "SCHED_FIFO", "seconds": 10.0, "stalls": [(1.0, 1.1), (2.0, 2.05)]},
               {"cpu": 1, "policy": "SCHED_FIFO", "seconds": 10.0, "stalls": [(3.0, 3.1)]}]
    s = stalls.summary(results)
    assert s["count"] == 3 and s["cpus"] == 2
    assert abs(s["longest_ms"] - 100.0) < 0.01 and abs(s["median_ms"] - 100.0) < 0.01
    assert abs(s["stalled_pct"] - 1.25) < 0.01  # 250 ms of 20 CPU-seconds
    assert s["per_minute"] == 9.0  # 3 stalls in 20 CPU-seconds, per CPU-minute


def test_a_probe_sees_a_stop_it_is_made_to_take(tmp_path: Path) -> None:
    """A probe stopped with SIGSTOP for 0.3 s reports a stall of about that length."""
    out, ready = tmp_path / "p.json", tmp_path / "ready"
    start = time.time() + 0.3
    proc = subprocess.Popen([sys.executable, "-m", "bench.stalls", "--cpu", "0", "--start-at", str(start),
                             "--stop-at", str(start + 3), "--out", str(out), "--ready", str(ready)],
                            cwd=Path(stalls.__file__).parents[1])
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.05)
        assert ready.exists(), "the probe never started watching"
        time.sleep(0.2)
        stopped_at = time.time()
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = json.loads(out.read_text())
    hit = [(a, b) for a, b in res["stalls"] if a <= stopped_at + 0.05 and b >= stopped_at + 0.25]
    assert hit and 0.25 < hit[0][1] - hit[0][0] < 1.0, res["stalls"]
