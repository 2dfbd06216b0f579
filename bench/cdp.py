"""A small Chrome DevTools Protocol client for headless Chromium (Debian's `chromium`),
over aiohttp's WebSocket client (no browser driver, no extra dependency): load a page,
run JavaScript in it to read the DOM or click, collect its errors, take a screenshot.
Used by the dashboard test (tests/test_ui_browser.py) and bench/dashboard.py.

The browser is started so that it talks to nothing but loopback: no background
networking, no component updates, and a resolver that maps every host name except
localhost to "not found".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
    "--disable-component-update", "--disable-domain-reliability", "--disable-sync",
    "--disable-client-side-phishing-detection", "--disable-default-apps", "--disable-breakpad",
    "--no-pings", "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
    "--dns-prefetch-disable", "--no-proxy-server",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)


class BrowserMissing(RuntimeError):
    """No Chromium on this machine (Debian: apt-get install chromium)."""


class CdpError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """$CHROMIUM, else the first Chromium/Chrome on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """`async with Chromium(workdir) as b: await b.navigate(url); await b.evaluate(js)`"""

    def __init__(self, workdir: Path, *, width: int = 1440, height: int = 1000,
                 timeout: float = 15.0) -> None:
        self.workdir = workdir
        self.width, self.height = width, height
        self.timeout = timeout
        self.errors: list[str] = []  # uncaught exceptions and console.error() of the page
        self.proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0

    async def __aenter__(self) -> Chromium:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        exe = find_chromium()
        if exe is None:
            raise BrowserMissing("no chromium on PATH (Debian: apt-get install chromium)")
        profile = self.workdir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "chromium.log", "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                exe, *FLAGS, f"--user-data-dir={profile}",
                f"--window-size={self.width},{self.height}", "about:blank",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        port = await self._devtools_port(profile / "DevToolsActivePort")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            raise CdpError(f"no page target in {targets!r}")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"],
                                                  max_msg_size=256 << 20)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _devtools_port(self, path: Path) -> int:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}; "
                               f"see {self.workdir}/chromium.log")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(path.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
        raise CdpError(f"chromium did not open its DevTools port; see {self.workdir}/chromium.log")

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                fut = self._pending.pop(data["id"], None) if "id" in data else None
                if fut is not None and not fut.done():
                    fut.set_result(data)
                else:
                    self._event(data.get("method"), data.get("params", {}))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(CdpError("the DevTools connection closed"))
            self._pending.clear()

    def _event(self, method: str | None, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append(d.get("exception", {}).get("description") or d.get("text", "?"))
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description")))
                                        for a in params["args"]))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        if self._ws is None or self._ws.closed:
            raise CdpError("not connected")
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        await self._ws.send_json({"id": self._next, "method": method, "params": params})
        msg = await asyncio.wait_for(fut, self.timeout)
        if "error" in msg:
            raise CdpError(f"{method}: {msg['error']}")
        return msg.get("result", {})  # type: ignore[no-any-return]

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                              awaitPromise=True)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CdpError(d.get("exception", {}).get("description") or d.get("text", "?"))
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, interval: float = 0.1) -> Any:
        """Evaluate until the value is truthy; returns it (TimeoutError after `timeout`)."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(interval)
        raise TimeoutError(f"not true within {timeout} s: {expression}\nlast value: {value!r}\n"
                           f"page errors: {self.errors}")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'",
                            self.timeout)

    async def screenshot(self, path: Path) -> Path:
        """The whole page (not only the window) as a PNG."""
        metrics = await self.send("Page.getLayoutMetrics")
        height = min(4000, math.ceil(metrics["cssContentSize"]["height"]))
        await self.send("Emulation.setDeviceMetricsOverride", width=self.width,
                        height=max(height, 100), deviceScaleFactor=1, mobile=False)
        try:
            shot = await self.send("Page.captureScreenshot", format="png")
        finally:
            await self.send("Emulation.clearDeviceMetricsOverride")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._session is not None:
            await self._session.close()
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                # our own session (start_new_session): its renderer children go with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
