"""The code a benchmark measured: `git rev-parse --short HEAD`, marked `+dirty` when the
tree holds uncommitted edits to anything but the benchmarks' own results and prose
(bench/results/, docs/, README.md: a chain of benchmarks writes the first two as it goes,
and neither is measured). One home for every results file's stamp."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_CODE = (":(exclude)bench/results", ":(exclude)docs", ":(exclude)README.md")


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")
