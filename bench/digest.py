"""Piece digest throughput on one core: the cost every verified byte pays.

    python -m bench.digest [--total 1GiB] [--runs 5]

Hashes `--total` bytes as pieces of each size with each of the project's piece digests
(common.digest: blake3 and SHA-256, streamed in 1 MiB updates as dfget and the CDN do)
and reports the best of `--runs` in GB/s and GiB/s. Writes bench/results/digest.md and digest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import digest
from common.units import parse_size

from .version import code_version

MIB = 1 << 20
CHUNK = MIB  # the update size of dfget's and the CDN's hashing
PIECE_SIZES = (MIB, 4 * MIB, 16 * MIB)
OUT = Path(__file__).resolve().parent / "results"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return "SHA-NI" if "sha_ni" in flags else "no SHA-NI"


def rate(algo: str, piece: int, total: int, block: bytes) -> float:
    """Bytes per second hashing `total` bytes as pieces of `piece` bytes."""
    pieces = max(1, total // piece)
    view = memoryview(block)
    t0 = time.perf_counter()
    for _ in range(pieces):
        h = digest.new(algo)
        for off in range(0, piece, CHUNK):
            h.update(view[off:off + CHUNK])
        h.hexdigest()
    return pieces * piece / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.digest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=parse_size, default=1 << 30)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.total <= 0 or args.runs <= 0:
        ap.error("--total and --runs must be positive")
    block = os.urandom(max(PIECE_SIZES))
    rows = []
    for algo in digest.ALGORITHMS:
        for piece in PIECE_SIZES:
            best = max(rate(algo, piece, args.total, block) for _ in range(args.runs))
            rows.append({"algorithm": algo, "piece_size": piece, "bytes_per_s": best})
            print(f"{algo:>7}, piece {piece // MIB:>2} MiB: {best / 1e9:.2f} GB/s ({best / (1 << 30):.2f} GiB/s)")
    meta = {"algorithms": list(digest.ALGORITHMS), "cpu": cpu_flags(), "python": platform.python_version(),
            "commit": code_version(), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "total": args.total, "runs": args.runs, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "digest.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = ["# Piece digest throughput (`python -m bench.digest`)", "",
             f"Every piece digest algorithm on one core ({meta['cpu']} for SHA-256, Python "
             f"{meta['python']}, blake3 from its Python bindings of the Rust crate, one thread), "
             f"{args.total / (1 << 30):g} GiB per piece size, 1 MiB updates as dfget and the CDN "
             f"hash, best of {args.runs}; {meta['measured']}, code {meta['commit']}. The machine may "
             f"have been shared with other work: best of {args.runs} is kept.", "",
             "| algorithm | piece size | GB/s | GiB/s | CPU seconds per GiB |", "|---|---|---|---|---|"]
    for r in rows:
        v = r["bytes_per_s"]
        lines.append(f"| {r['algorithm']} | {r['piece_size'] // MIB} MiB | {v / 1e9:.2f} | {v / (1 << 30):.2f} "
                     f"| {(1 << 30) / v:.2f} |")
    lines += ["", "New tasks use blake3 where the registering dfget can check it (`--piece-digest`, "
              "common/digest.py); tasks named by a sha256 content digest use sha256."]
    (args.out / "digest.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
