"""OCI image layouts of random layers and an isolated skopeo, for the container-image
benchmark (bench/image.py) and its tests (tests/registry_support.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_layout(layout: Path, tag: str, layers: list[bytes]) -> bytes:
    """An OCI layout of uncompressed 'layers' (no tar needed by skopeo) under `tag`;
    returns the config blob."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        h = sha256(data)
        (blobs / h).write_bytes(data)
        return h

    hexes = [put(b) for b in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{h}" for h in hexes]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{put(config)}",
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{h}",
                    "size": len(b)} for h, b in zip(hexes, layers)]}).encode()
    mhex = put(manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": MANIFEST, "digest": f"sha256:{mhex}", "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return config


class Skopeo:
    """skopeo with a policy that accepts anything, no registries.conf of the machine's,
    no proxy variables and its own HOME: only loopback registries are ever asked."""

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.policy = work / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (work / "registries.conf").write_text("")
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.env |= {"CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf"), "HOME": str(work)}

    async def run_timed(self, *args: str, timeout: float = 600) -> tuple[int, str, float]:
        """(exit code, output, seconds); -9 and "timeout" when it ran out of time."""
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec("skopeo", "--policy", str(self.policy), *args, env=self.env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -9, "timeout", time.monotonic() - t0
        return proc.returncode or 0, out.decode(errors="replace"), time.monotonic() - t0
