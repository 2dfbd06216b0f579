"""Soak the fault suite: every scenario `--rounds` times, all in one seeded random order,
each one checked for leftover processes and mounts (and the test process for leaked
file descriptors) when it ends.

    python -m tests.faults.soak --rounds 10 [--seed N] [-k EXPR] [-x]

Run from the repository root with Redis reachable as REDIS_URL (a dedicated db: it is
flushed), or without REDIS_URL to have every scenario start its own redis-server. Ten
rounds take about 10 x the suite's time (~15 min here); CI runs one round (the plain
`pytest` run, in a random order whose seed is printed in the header).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="runs of every scenario (default 10)")
    p.add_argument("--seed", type=int, default=None, help="order and fault points (default: random)")
    p.add_argument("-k", dest="keyword", default=None, help="only scenarios matching this pytest -k")
    p.add_argument("-x", dest="exitfirst", action="store_true", help="stop at the first failure")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    cmd = [str(HERE), "-q", "-p", "no:cacheprovider", "--fault-rounds", str(args.rounds),
           "--fault-seed", str(seed), "-rfE"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    if args.exitfirst:
        cmd.append("-x")
    print(f"soak: {args.rounds} rounds, seed {seed} (replay: --seed {seed})", flush=True)
    return int(pytest.main(cmd))


if __name__ == "__main__":
    sys.exit(main())
