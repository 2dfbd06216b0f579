"""The README's first command runs `python -m bench.demo`: run it for real (smaller file)
and check what a newcomer is told, and that it leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, processes_under


def test_demo_distributes_and_cleans_up() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.demo", "--size", "12MiB"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "OK: every host got the file; the origin sent it once, not 4 times." in out, out
    assert "origin served 12.0 MiB = 1.00 x file" in out, out
    assert "files identical to the origin: 4/4" in out, out
    rows = re.findall(r"^  (127\.0\.0\.\d+)\s+[\d.]+s\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)
    assert len(rows) == 4, out  # one row per host, each on its own loopback address
    assert len({r[0] for r in rows}) == 4, out
    for _, peers, sn, origin in rows:
        assert float(origin) == 0.0  # no host went back to the origin itself
        assert abs(float(peers) + float(sn) - 12.0) < 0.05, out
    scratch = re.search(r"\(scratch: (\S+)\)", out)
    assert scratch is not None, out
    assert not Path(scratch.group(1)).exists()  # the scratch directory was removed
    assert processes_under(Path(scratch.group(1))) == []  # and every process stopped
