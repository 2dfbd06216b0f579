"""A one-minute demo: 4 hosts get one 128 MiB file through the P2P swarm.

    pip install . && python -m bench.demo [--clients 4] [--size 128MiB]

Everything runs on this machine on loopback (127.0.0.x), nothing to install besides the
project: a capped test origin that counts its bytes, a supernode with its embedded store,
and 4 dfget "hosts", each with its own peer server. It prints who got the file in how
long, where each host's bytes came from, and how much the origin served.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from common.units import parse_size

from .swarm import MIB, Caps, Scenario, ScenarioResult, run_scenario


def _mib(n: int) -> str:
    return f"{n / MIB:7.1f}"


def show(r: ScenarioResult) -> None:
    s, caps, size = r.swarm, r.caps, r.size
    print()
    print(f"{r.clients} hosts downloaded one {size / MIB:.0f} MiB file "
          f"(each host: {caps['peer_down'] / MIB:g} MiB/s down, {caps['peer_up'] / MIB:g} MiB/s up;"
          f" origin capped at {caps['origin'] / MIB:g} MiB/s)")
    print()
    print(f"  {'host':<12} {'time':>7}  {'MiB from peers':>15} {'from supernode':>15} "
          f"{'from origin':>12}")
    for c in sorted(r.clients_detail, key=lambda c: c["seconds"]):
        status = "" if c["ok"] else "  FAILED"
        print(f"  {c['host']:<12} {c['seconds']:6.1f}s  {_mib(c['bytes_from_peers']):>15} "
              f"{_mib(c['bytes_from_supernode']):>15} {_mib(c['bytes_from_origin']):>12}{status}")
    print()
    print(f"  origin served {s['origin_bytes'] / MIB:.1f} MiB = {s['origin_ratio']:.2f} x file "
          f"(downloading directly, {r.clients} hosts would take "
          f"{r.clients:.2f} x file from it)")
    print(f"  peers served {s['peer_share']:.0%} of the bytes, the supernode the rest; "
          f"files identical to the origin: {s['correct']}/{r.clients}")
    print(f"  slowest host {s['max']:.1f}s; fluid lower bound {r.t_min:.1f}s "
          f"(efficiency {s['eff_max']:.2f})")
    print()
    good = (s["correct"] == r.clients and s["origin_ratio"] <= 1.0
            and s["back_to_source"] == 0)
    if good:
        print(f"OK: every host got the file; the origin sent it once, not {r.clients} times.")
    else:
        print("PROBLEM: see the numbers above (logs were in the temp directory).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--size", type=parse_size, default=128 * MIB)
    args = ap.parse_args(argv)
    caps = Caps(origin=100 * MIB, cdn_up=50 * MIB, peer_down=20 * MIB, peer_up=20 * MIB)
    sc = Scenario("demo", args.clients, args.size, caps)
    workdir = Path(tempfile.mkdtemp(prefix="dragonfly-demo-"))
    print(f"Starting an origin, a supernode and {args.clients} dfget hosts on loopback "
          f"(scratch: {workdir}) ...")
    try:
        res = asyncio.run(run_scenario(sc, workdir, workdir / "files", None, direct=False,
                                       log=lambda m: print("  " + m)))
    except KeyboardInterrupt:
        print("interrupted: everything was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    show(res)
    ok = res.swarm["correct"] == args.clients and res.swarm["origin_ratio"] <= 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
