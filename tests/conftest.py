"""Shared fixtures and helpers.

Helpers (also importable: `from conftest import free_port, make_file, ProcessRunner`):
  free_port(host="127.0.0.1") -> int
  make_file(path, size, seed=0) -> Path            deterministic pseudo-random content
  file_bytes(size, seed=0) -> bytes                the same content, in memory
  ProcessRunner(cmd, log_path, ready_url=..., ...) context manager around a process

Fixtures:
  redis_url        REDIS_URL (db FLUSHDB-ed first) or None (use the embedded store); fails
                   in CI (CI=true) when REDIS_URL is missing. Mark a test `redis` when it
                   needs the real one: it is then skipped without REDIS_URL (one line says
                   how to run it) and fails in CI.
  origin           a running `python -m bench.origin` (OriginProc) on a temp dir
  origin_factory   origin_factory(rate=0) -> another OriginProc
  supernode        supernode(redis_url=DEFAULT, extra_args=()) -> SupernodeProc
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

# urllib would honour http_proxy for 127.0.0.1 otherwise
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# --- small helpers -------------------------------------------------------------------------
def file_url(base: str, name: str, **query: Any) -> str:
    """URL of a file on a test origin (bench.origin), with its query (modes, times...)."""
    qs = urlencode({k: str(v) for k, v in query.items()})
    return f"{base}/files/{name}" + (f"?{qs}" if qs else "")


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago. Prefer binding port 0 where the program allows."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """n distinct ports that were free a moment ago: all are held open together while
    picked (picked one at a time, the kernel may hand out the same port twice)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


_GEN_CHUNK = 8 << 20


def _chunks(size: int, seed: int) -> Iterator[bytes]:
    rnd = random.Random(seed)
    left = size
    while left > 0:
        n = min(_GEN_CHUNK, left)
        yield rnd.randbytes(n)
        left -= n


def file_bytes(size: int, seed: int = 0) -> bytes:
    """The exact content make_file(path, size, seed) writes."""
    return b"".join(_chunks(size, seed))


def make_file(path: str | os.PathLike[str], size: int, seed: int = 0) -> Path:
    """Write `size` deterministic pseudo-random bytes (same seed, same bytes)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        for chunk in _chunks(size, seed):
            f.write(chunk)
    return p


def http_get(url: str, timeout: float = 5.0, data: bytes | None = None) -> tuple[int, bytes]:
    """Blocking GET (POST when data is given) for fixtures; (status, body), never raises
    on an HTTP status."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with _HTTP.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        e.close()
        return e.code, body


# --- processes -----------------------------------------------------------------------------
class ProcessRunner:
    """Start a command, wait until it is ready, and always tear it down.

        with ProcessRunner([sys.executable, "-m", "x"], tmp_path / "x.log",
                           ready_url="http://127.0.0.1:8002/_ping") as p:
            ...

    `ready_url` is a URL or a callable returning one (or None while not yet known); ready
    means HTTP 200 within `ready_timeout` seconds. Output goes to `log_path`; its tail is
    in the error when the process dies or never gets ready. On exit: SIGTERM, then SIGKILL
    after `term_timeout` seconds.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        log_path: str | os.PathLike[str],
        *,
        ready_url: str | Callable[[], str | None] | None = None,
        ready_timeout: float = 20.0,
        term_timeout: float = 5.0,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cmd = [str(c) for c in cmd]
        self.log_path = Path(log_path)
        self.ready_url = ready_url
        self.ready_timeout = ready_timeout
        self.term_timeout = term_timeout
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> ProcessRunner:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        if self.ready_url is None:
            return
        deadline = time.monotonic() + self.ready_timeout
        last = "not tried"
        while time.monotonic() < deadline:
            if self.returncode is not None:
                self._fail(f"exited with code {self.returncode} before it was ready")
            url = self.ready_url() if callable(self.ready_url) else self.ready_url
            if url is not None:
                try:
                    status, _ = http_get(url, timeout=1.0)
                    if status == 200:
                        return
                    last = f"HTTP {status}"
                except OSError as exc:
                    last = repr(exc)
            time.sleep(0.05)
        self._fail(f"not ready within {self.ready_timeout}s (last: {last})")

    def _fail(self, why: str) -> None:
        raise RuntimeError(
            f"{shlex.join(self.cmd)}: {why}\n--- last lines of {self.log_path} ---\n"
            f"{self.log_tail()}"
        )

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after term_timeout. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.term_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(self.term_timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(self.term_timeout)

    def __enter__(self) -> ProcessRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # bench/ is not installed: the children find it (and the editable packages) from here
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --- redis -----------------------------------------------------------------------------------
def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        if db == 0:
            pytest.fail(f"REDIS_URL={url!r} names db 0; tests FLUSHDB it, use a dedicated db "
                        "such as redis://127.0.0.1:6379/9", pytrace=False)
        client.flushdb()
    except redis.RedisError as exc:
        pytest.fail(f"REDIS_URL={url!r} does not answer: {exc}", pytrace=False)
    finally:
        client.close()


def processes_under(path: Path) -> list[tuple[int, str]]:
    """Live processes whose command line mentions `path` (zombies are not alive)."""
    needle = os.fsencode(str(path))
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != "Z":
            out.append((int(entry.name), cmd.replace(b"\0", b" ").decode(errors="replace")[:200]))
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Nothing a test started outlives the run: peer servers that in-process downloads
    started (detached, meant to outlive their dfget) and anything else still running
    from this session's temp dirs are stopped (SIGTERM, then SIGKILL)."""
    from dfget.server import launcher

    for p in launcher._CHILDREN:
        if p.poll() is None:
            p.terminate()
    for p in launcher._CHILDREN:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    launcher._CHILDREN.clear()
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = str(factory.getbasetemp())
    left = processes_under(Path(base))
    if left:  # the tests' own cleanup missed these: say so, then stop them
        sys.stderr.write(f"\nconftest: stopping {len(left)} process(es) left running from {base}\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for pid, _ in processes_under(Path(base))]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            alive = {pid for pid, _ in processes_under(Path(base))}
            pids = [pid for pid in pids if pid in alive]
            time.sleep(0.05)
        if not pids:
            break




# The one line a newcomer needs to run what was skipped for want of a real Redis.
REDIS_HOWTO = "REDIS_URL=redis://127.0.0.1:6379/9 .venv/bin/python -m pytest -q -m redis"
REDIS_SKIP = f"needs a real Redis: run with {REDIS_HOWTO}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `redis` runs on the real Redis at REDIS_URL or not at all: without it
    the test is skipped with the one line that runs it, and fails when CI=true. Such a test
    never silently falls back to the embedded store (two supernodes would not share it)."""
    if item.get_closest_marker("redis") and not os.environ.get("REDIS_URL"):
        if in_ci():
            pytest.fail("CI=true but REDIS_URL is not set: redis tests need the real Redis",
                        pytrace=False)
        pytest.skip(REDIS_SKIP)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and REDIS_HOWTO in str(r.longrepr[2])]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test(s) need a real Redis and were skipped; run them with: "
            f"{REDIS_HOWTO}")


@pytest.fixture
def redis_url() -> str | None:
    """The real Redis (its db flushed first), or None: then the test runs on the embedded
    store. Tests marked `redis` always get the real one (see pytest_runtest_setup)."""
    url = os.environ.get("REDIS_URL") or None
    if url is None:
        if in_ci():
            pytest.fail("CI=true but REDIS_URL is not set", pytrace=False)
        return None
    _flush_redis(url)
    return url


# --- origin ----------------------------------------------------------------------------------
@dataclass
class OriginProc:
    """A `python -m bench.origin` child serving `dir`."""

    dir: Path
    port: int
    runner: ProcessRunner

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, name: str, **query: Any) -> str:
        return file_url(self.base, name, **query)

    def put(self, name: str, data: bytes) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def put_random(self, name: str, size: int, seed: int = 0) -> Path:
        return make_file(self.dir / name, size, seed)

    def stats(self) -> dict[str, Any]:
        status, body = http_get(f"{self.base}/_stats")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    def reset(self) -> None:
        status, body = http_get(f"{self.base}/_stats/reset", data=b"")
        assert status == 200, body


def _start_origin(tmp: Path, rate: float, stack: list[ProcessRunner]) -> OriginProc:
    tmp.mkdir(parents=True, exist_ok=True)
    files = tmp / "files"
    files.mkdir(exist_ok=True)
    port_file = tmp / "port"

    def ready() -> str | None:
        try:
            return f"http://{LOOPBACK}:{int(port_file.read_text())}/_stats"
        except (OSError, ValueError):
            return None

    cmd = [sys.executable, "-m", "bench.origin", "--dir", files, "--host", LOOPBACK,
           "--port", "0", "--port-file", port_file]
    if rate:
        cmd += ["--rate", str(int(rate))]
    runner = ProcessRunner(cmd, tmp / "origin.log", ready_url=ready, env=_child_env(),
                           cwd=REPO_ROOT)
    stack.append(runner)
    runner.start()
    return OriginProc(dir=files, port=int(port_file.read_text()), runner=runner)


@pytest.fixture
def origin_factory(tmp_path: Path) -> Iterator[Callable[..., OriginProc]]:
    """origin_factory(rate=0) -> OriginProc; each call starts another origin."""
    runners: list[ProcessRunner] = []
    count = 0

    def factory(rate: float = 0) -> OriginProc:
        nonlocal count
        count += 1
        return _start_origin(tmp_path / f"origin{count}", rate, runners)

    try:
        yield factory
    finally:
        for r in reversed(runners):
            r.stop()


@pytest.fixture
def origin(origin_factory: Callable[..., OriginProc]) -> OriginProc:
    return origin_factory()


# --- supernode -------------------------------------------------------------------------------
@dataclass
class SupernodeProc:
    port: int
    download_port: int
    home: Path
    runner: ProcessRunner

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def download_url(self) -> str:
        return f"http://{LOOPBACK}:{self.download_port}"


_DEFAULT = object()


@pytest.fixture
def supernode(
    tmp_path: Path, redis_url: str | None
) -> Iterator[Callable[..., SupernodeProc]]:
    """supernode(redis_url=<the redis_url fixture>, extra_args=(), ready_timeout=20.0)
    -> SupernodeProc. Several calls give several supernodes sharing that Redis (flushed
    once per test). Pass redis_url=None to force the embedded store. All stopped (SIGTERM,
    then SIGKILL) at teardown."""
    default_url = redis_url
    runners: list[ProcessRunner] = []

    def factory(redis_url: Any = _DEFAULT, extra_args: Sequence[str] = (),
                ready_timeout: float = 20.0) -> SupernodeProc:
        if redis_url is _DEFAULT:
            redis_url = default_url
        n = len(runners) + 1
        home = tmp_path / f"supernode{n}"
        home.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            port, dport = free_ports(2)
            cmd = [sys.executable, "-m", "supernode", "--listen", LOOPBACK, "--port", str(port),
                   "--download-port", str(dport), "--home", str(home),
                   "--advertise-ip", LOOPBACK, "--allow-origin", "127.0.0.0/8", "--allow-peer", "127.0.0.0/8"]
            if redis_url:
                cmd += ["--redis-url", redis_url]
            cmd += list(extra_args)
            runner = ProcessRunner(cmd, home / "supernode.log",
                                   ready_url=f"http://{LOOPBACK}:{port}/_ping",
                                   ready_timeout=ready_timeout, env=_child_env(), cwd=REPO_ROOT)
            runners.append(runner)
            try:
                runner.start()
            except RuntimeError:
                # another process took a port between our pick and the supernode's bind
                if attempt == 2 or "cannot listen on" not in runner.log_tail(5):
                    raise
                continue
            return SupernodeProc(port=port, download_port=dport, home=home, runner=runner)
        raise AssertionError("unreachable")

    try:
        yield factory
    finally:
        for r in reversed(runners):
            r.stop()


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[..., int]:
    return free_port


@pytest.fixture(name="make_file")
def make_file_fixture() -> Callable[..., Path]:
    return make_file


class LogTrap(logging.Handler):
    """Collects every record at ERROR or above or with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(record)


@pytest.fixture
def log_trap() -> Iterator[LogTrap]:
    """Every error (or traceback) logged in this process during the test."""
    trap = LogTrap()
    root = logging.getLogger()
    old = root.level
    root.addHandler(trap)
    root.setLevel(logging.INFO)  # what the daemons log by default
    try:
        yield trap
    finally:
        root.removeHandler(trap)
        root.setLevel(old)


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Run the test twice: on the embedded store and on the real Redis (REDIS_URL; that
    half is skipped without it)."""
    if request.param == "embedded":
        return None
    return request.getfixturevalue("redis_url")  # type: ignore[no-any-return]


@pytest.fixture
async def api(aiohttp_client, tmp_path, store_url):  # type: ignore[no-untyped-def]
    """An in-process supernode on `store_url`, driven through its HTTP API (Api)."""
    from supernode_support import Api, app_for, settings_for

    client = await aiohttp_client(app_for(settings_for(tmp_path / "sn", store_url)))
    return Api(client)
