"""Real container-registry components for dfdaemon's tests: Debian's docker-registry
(CNCF distribution) as the upstream, a counting reverse proxy in front of it (bytes per
blob; can corrupt a blob or demand auth), skopeo as the client, OCI layouts of random
layers, and dfdaemon processes on their own 127.0.0.x."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from bench import oci
from bench.oci import sha256, write_layout
from conftest import REPO_ROOT, ProcessRunner, free_port, in_ci

PY = sys.executable
_BLOB = re.compile(r"^/v2/(.+)/blobs/sha256:([0-9a-f]{64})$")


def require_tools() -> None:
    missing = [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
    if missing:
        msg = f"{' and '.join(missing)} not installed (apt-get install docker-registry skopeo)"
        if in_ci():
            pytest.fail(msg + ": the container-image tests cannot run", pytrace=False)
        pytest.skip(msg)


@dataclass
class Image:
    name: str
    tag: str
    layout: Path
    layers: list[bytes]
    config: bytes

    @property
    def layer_hexes(self) -> list[str]:
        return [sha256(b) for b in self.layers]

    @property
    def blob_hexes(self) -> list[str]:
        return self.layer_hexes + [sha256(self.config)]


def build_image(layout: Path, name: str, tag: str, layers: list[bytes]) -> Image:
    """An OCI image layout of uncompressed random 'layers' (no tar needed by skopeo)."""
    return Image(name, tag, layout, layers, write_layout(layout, tag, layers))


class Registry:
    """docker-registry serving a directory on 127.0.0.1:<port>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        cfg = root / "config.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.runner = ProcessRunner(["docker-registry", "serve", str(cfg)], root / "registry.log",
                                    ready_url=f"http://127.0.0.1:{self.port}/v2/", ready_timeout=20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Registry:
        self.runner.start()
        return self

    def stop(self) -> None:
        self.runner.stop()


@dataclass
class CountingProxy:
    """Reverse proxy in front of the registry (in the test's loop): counts the body bytes
    of every blob GET per digest; can corrupt blobs and demand auth per repository."""

    upstream: str
    blob_bytes: Counter[str] = field(default_factory=Counter)
    blob_gets: Counter[str] = field(default_factory=Counter)
    corrupt: set[str] = field(default_factory=set)  # hexes whose bytes are altered
    auth_required: set[str] = field(default_factory=set)  # repository names answering 401
    auth_seen: list[str] = field(default_factory=list)  # Authorization headers received
    blob_rate: float = 0.0  # bytes/s for each blob GET's body (0: as fast as it goes)
    redirect_blobs: bool = False  # blob GETs answer 307 to "object storage" on 127.0.0.2
    storage_auth: list[str | None] = field(default_factory=list)  # Authorization seen there
    port: int = 0
    storage_port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    CHALLENGE = 'Bearer realm="http://127.0.0.1:9/token",service="test-registry",scope="repository:{}:pull"'

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> CountingProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        storage = web.TCPSite(self._runner, "127.0.0.2", 0)
        await storage.start()
        self.storage_port = storage._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def layer_traffic(self) -> int:
        return sum(self.blob_bytes.values())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        if "Authorization" in request.headers:
            self.auth_seen.append(request.headers["Authorization"])
        for name in self.auth_required:
            if request.path.startswith(f"/v2/{name}/") and "Authorization" not in request.headers:
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}, status=401,
                    headers={"WWW-Authenticate": self.CHALLENGE.format(name)})
        m = _BLOB.match(request.path)
        if request.host.startswith("127.0.0.2"):
            if not request.path.startswith("/storage/"):
                return web.Response(status=404)
            # object storage: a signed URL, no registry credentials wanted
            self.storage_auth.append(request.headers.get("Authorization"))
            m = _BLOB.match(request.path[len("/storage"):])
            if request.query.get("sig") != "s1gned" or m is None:
                return web.Response(status=403)
            request = request.clone(rel_url=request.path[len("/storage"):])
        elif m and request.method == "GET" and self.redirect_blobs:
            return web.Response(status=307, headers={
                "Location": f"http://127.0.0.2:{self.storage_port}/storage{request.path}?sig=s1gned"})
        # a list, not a dict: clients send several Accept headers and all must reach the registry
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "connection")]
        body = await request.read()
        async with self._session.request(request.method, self.upstream + str(request.rel_url), headers=headers,
                                         data=body or None, allow_redirects=False) as up:
            if m and request.method == "GET" and up.status == 200 and self.blob_rate > 0:
                return await self._trickle(request, up, m.group(2))
            data = await up.read()
            if m and request.method == "GET" and up.status == 200:
                hexd = m.group(2)
                self.blob_gets[hexd] += 1
                self.blob_bytes[hexd] += len(data)
                if hexd in self.corrupt and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
            out = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in (
                "content-length", "transfer-encoding", "connection", "content-encoding"))
            return web.Response(status=up.status, body=data if request.method != "HEAD" else None,
                                headers=out)


    async def _trickle(self, request: web.Request, up: aiohttp.ClientResponse, hexd: str) -> web.StreamResponse:
        """A blob body at `blob_rate`, in 256 KiB steps (a slow registry or CDN)."""
        self.blob_gets[hexd] += 1
        resp = web.StreamResponse(status=200, headers=CIMultiDict(
            (k, v) for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection")))
        await resp.prepare(request)
        step = 256 << 10
        async for chunk in up.content.iter_chunked(step):
            await asyncio.sleep(len(chunk) / self.blob_rate)
            self.blob_bytes[hexd] += len(chunk)
            await resp.write(chunk)
        await resp.write_eof()
        return resp


class Skopeo(oci.Skopeo):
    async def run(self, *args: str, timeout: float = 120) -> tuple[int, str]:
        rc, out, _ = await self.run_timed(*args, timeout=timeout)
        return rc, out

    async def push(self, image: Image, registry: str) -> None:
        rc, out = await self.run("copy", "--preserve-digests", "--dest-tls-verify=false",
                                 f"oci:{image.layout}:{image.tag}",
                                 f"docker://{registry}/{image.name}:{image.tag}")
        assert rc == 0, out

    async def pull(self, hostport: str, name: str, tag: str, dest: Path, *extra: str) -> tuple[int, str]:
        return await self.run("copy", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers",
                              *extra, f"docker://{hostport}/{name}:{tag}", f"oci:{dest}:{tag}")


def blobs_in_layout(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


class DaemonProc:
    def __init__(self, root: Path, k: int, registry: str, supernode_port: int, *extra: str) -> None:
        self.ip = f"127.0.0.{10 + k}"
        self.port = free_port(self.ip)
        self.home = root / f"host{k}"
        self.home.mkdir(parents=True, exist_ok=True)
        self.runner = ProcessRunner(
            [PY, "-m", "dfdaemon", "--registry", registry, "--listen", self.ip, "--port", str(self.port),
             "--ip", self.ip, "--home", str(self.home), "-n", f"127.0.0.1:{supernode_port}", *extra],
            self.home / "dfdaemon.log", ready_url=f"http://{self.ip}:{self.port}/_ping", cwd=REPO_ROOT)

    @property
    def hostport(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self) -> DaemonProc:
        self.runner.start()
        return self

    async def metrics(self) -> dict[str, float]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{self.hostport}/metrics") as r:
                text = await r.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    async def stop(self) -> None:
        from dfget_support import stop_server
        self.runner.stop()
        await stop_server(self.home)


def metric(m: dict[str, float], name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return m.get(key, 0.0)
