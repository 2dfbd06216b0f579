"""The shared fixtures themselves: deterministic files, process teardown, the CI Redis rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ProcessRunner, file_bytes, make_file

HERE = Path(__file__).resolve().parent


def test_make_file_is_deterministic(tmp_path: Path) -> None:
    a = make_file(tmp_path / "a", 20 << 20, seed=5).read_bytes()
    b = make_file(tmp_path / "b", 20 << 20, seed=5).read_bytes()
    c = make_file(tmp_path / "c", 20 << 20, seed=6).read_bytes()
    assert a == b == file_bytes(20 << 20, 5) and a != c and len(a) == 20 << 20
    assert make_file(tmp_path / "e", 0).read_bytes() == b""


def test_runner_reports_log_tail_when_the_process_dies(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('marker-xyz'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*marker-xyz"):
        with ProcessRunner(cmd, tmp_path / "log", ready_url="http://127.0.0.1:9/"):
            pass


def test_runner_times_out_when_never_ready(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    r = ProcessRunner(cmd, tmp_path / "log", ready_url=lambda: None, ready_timeout=0.5)
    with pytest.raises(RuntimeError, match="not ready within"):
        r.start()
    assert r.returncode is not None  # torn down


def test_runner_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('armed', flush=True); time.sleep(60)")
    log = tmp_path / "log"
    with ProcessRunner([sys.executable, "-c", code], log, term_timeout=0.5) as r:
        deadline = time.monotonic() + 10
        while "armed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert r.returncode == -9


def _run_inner(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n"
        "@pytest.mark.redis\n"
        "def test_uses_redis(redis_url):\n"
        "    assert redis_url\n"
        "def test_runs_on_the_embedded_store(redis_url):\n"
        "    assert redis_url is None\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )


def _env(**extra: str) -> dict[str, str]:
    # PYTEST_ADDOPTS too: .ci/run sets -rs, which would list the skip a second time
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "REDIS_URL", "PYTEST_ADDOPTS")}
    env.update(extra)
    return env


def test_redis_tests_fail_in_ci_without_redis_url(tmp_path: Path) -> None:
    res = _run_inner(tmp_path, _env(CI="true"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "REDIS_URL is not set" in res.stdout
    assert "skipped" not in res.stdout and "passed" not in res.stdout


def test_redis_tests_skip_outside_ci_with_the_line_that_runs_them(tmp_path: Path) -> None:
    """On a fresh clone (no REDIS_URL) a redis test neither fails nor runs on the embedded
    store: it is skipped, and the run's summary says in one line how to run it."""
    res = _run_inner(tmp_path, _env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 1 skipped" in res.stdout, res.stdout
    howto = "REDIS_URL=redis://127.0.0.1:6379/9 .venv/bin/python -m pytest -q -m redis"
    lines = [ln for ln in res.stdout.splitlines() if howto in ln]
    assert lines == [f"1 test(s) need a real Redis and were skipped; run them with: {howto}"], \
        res.stdout
