"""A BitTorrent baseline for bench.swarm: the same file, the same N hosts (each on its own
127.0.0.x), the same per-host caps and the same capped origin, with Debian's aria2c.

- a local opentracker on 127.0.0.1 (Debian's build only admits whitelisted info-hashes:
  the torrent's is written to the whitelist file in its chroot directory);
- a torrent made with mktorrent (4 MiB pieces) whose web seed (BEP 19, `url-list`) is the
  origin: the only complete copy at the start, as the origin is for the swarm;
- DHT, LPD and peer exchange off (aria2 has no UPnP), so peers meet only through the
  tracker; every client keeps seeding until all are done;
- completion time: aria2's --on-bt-download-complete hook (the plain one fires only
  after seeding ends) writes a timestamp per host.

Variants: `defaults` (aria2's own settings) and `random` (random piece order and 4 MiB
web-seed splits, its best case on this setup, /work/shared/reference notes).
Needs aria2c, opentracker and mktorrent (`apt-get install aria2 opentracker mktorrent`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "random": ["--stream-piece-selector=random", "--min-split-size=4M"],
}
TOOLS = ("aria2c", "opentracker", "mktorrent")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _skip(data: bytes, pos: int) -> int:
    """Index just past the bencoded value starting at pos."""
    c = data[pos:pos + 1]
    if c == b"i":
        return data.index(b"e", pos) + 1
    if c in (b"l", b"d"):
        pos += 1
        while data[pos:pos + 1] != b"e":
            pos = _skip(data, pos)
        return pos + 1
    colon = data.index(b":", pos)
    return colon + 1 + int(data[pos:colon])


def info_hash(torrent: bytes) -> str:
    """SHA-1 of the bencoded `info` value, as it appears in the file."""
    if not torrent.startswith(b"d"):
        raise ValueError("not a bencoded dictionary")
    pos = 1
    while torrent[pos:pos + 1] != b"e":
        key_end = _skip(torrent, pos)
        key = torrent[torrent.index(b":", pos) + 1:key_end]
        value_end = _skip(torrent, key_end)
        if key == b"info":
            return hashlib.sha1(torrent[key_end:value_end]).hexdigest()
        pos = value_end
    raise ValueError("no info dictionary")


def _free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


class Aria2Swarm:
    """Tracker + torrent for one file; `run` starts N aria2c and times them."""

    def __init__(self, work: Path, blob: Path, web_seed: str) -> None:
        self.work, self.blob, self.web_seed = work, blob, web_seed
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tracker_port = 0
        self.torrent = work / "file.torrent"

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.tracker_port = _free_port()
        announce = f"http://127.0.0.1:{self.tracker_port}/announce"
        subprocess.run(["mktorrent", "-l", "22", "-a", announce, "-w", self.web_seed, "-n", self.blob.name,
                        "-o", str(self.torrent), str(self.blob)], check=True, capture_output=True, timeout=300)
        tdir = self.work / "tracker"
        tdir.mkdir(exist_ok=True)
        (tdir / "whitelist.txt").write_text(info_hash(self.torrent.read_bytes()) + "\n")
        # it chroots into tdir and drops to nobody: both must be readable by others
        os.chmod(tdir, 0o755)
        os.chmod(tdir / "whitelist.txt", 0o644)
        self.procs.append(subprocess.Popen(
            ["opentracker", "-i", "127.0.0.1", "-p", str(self.tracker_port), "-P", str(self.tracker_port),
             "-d", str(tdir), "-w", "whitelist.txt"],
            stdin=subprocess.DEVNULL, stdout=open(self.work / "tracker.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.tracker_port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("opentracker did not start")

    async def run(self, hosts: list[str], variant: str, peer_down: int, peer_up: int, timeout: float,
                  outdir: Path) -> list[tuple[str, float, bool]]:
        """(host ip, seconds from the common start to its completion hook, done) per host."""
        outdir.mkdir(parents=True, exist_ok=True)
        marks = self.work / f"done-{variant}"
        marks.mkdir(exist_ok=True)
        clients: list[subprocess.Popen[bytes]] = []
        t0 = time.time()
        for i, ip in enumerate(hosts):
            hook = self.work / f"hook-{variant}-{i}.sh"
            hook.write_text(f"#!/bin/sh\ndate +%s.%N > {marks / str(i)}.tmp && mv {marks / str(i)}.tmp {marks / str(i)}\n")
            hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
            port = _free_port(ip)
            cmd = ["aria2c", "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
                   "--enable-peer-exchange=false", f"--interface={ip}", f"--listen-port={port}",
                   "--bt-tracker-interval=1", "--seed-time=100000", "--seed-ratio=0.0",
                   f"--max-download-limit={peer_down}", f"--max-upload-limit={peer_up}",
                   f"--on-bt-download-complete={hook}", f"--dir={outdir / f'host{i + 1}'}",
                   "--file-allocation=none", "--summary-interval=0", "--console-log-level=warn",
                   "--no-conf=true", "--check-certificate=false", "--all-proxy=", "--follow-torrent=mem",
                   *VARIANTS[variant], str(self.torrent)]
            clients.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                            stdout=open(self.work / f"aria2-{variant}-{i}.log", "ab"),  # noqa: SIM115
                                            stderr=subprocess.STDOUT, start_new_session=True))
        self.procs.extend(clients)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if all((marks / str(i)).exists() for i in range(len(hosts))):
                    break
                if all(c.poll() is not None for c in clients):
                    break
                await asyncio.sleep(0.2)
        finally:
            for c in clients:
                _stop(c)
        out = []
        for i, ip in enumerate(hosts):
            try:
                done_at = float((marks / str(i)).read_text().strip())
                out.append((ip, done_at - t0, True))
            except (OSError, ValueError):
                out.append((ip, time.time() - t0, False))
        return out

    def close(self) -> None:
        for p in self.procs:
            _stop(p)
        self.procs.clear()


def _stop(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
