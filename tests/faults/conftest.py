"""Fixtures and options of the fault suite.

    pytest tests/faults                          every scenario once, in a seeded random order
    pytest tests/faults --fault-rounds 10        each scenario ten times, all shuffled together
    pytest tests/faults --fault-seed 1234        replay an order (the seed is printed in the header)
    python -m tests.faults.soak --rounds 10      the same, as a script

After every scenario the `world` fixture checks that nothing it started is still
running (peer servers are detached: a leak would survive the test) and that no tmpfs is
left mounted.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .harness import PrivateRedis, World, kill_all, processes_under


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("faults", "fault suite (tests/faults)")
    group.addoption("--fault-rounds", type=int, default=1,
                    help="run every fault scenario this many times (soak)")
    group.addoption("--fault-seed", type=int, default=None,
                    help="seed of the scenario order and of random fault points (default: random)")


def _seed(config: pytest.Config) -> int:
    seed = config.getoption("--fault-seed", default=None)
    if seed is None:
        seed = getattr(config, "_fault_seed", None)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "big")
            config._fault_seed = seed  # type: ignore[attr-defined]
    return int(seed)


def pytest_report_header(config: pytest.Config) -> str:
    rounds = config.getoption("--fault-rounds", default=1)
    return f"fault suite: rounds={rounds} seed={_seed(config)}"


_HERE = Path(__file__).resolve().parent


def _is_fault_item(item: pytest.Item) -> bool:
    return _HERE in Path(str(item.path)).resolve().parents


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    rounds = metafunc.config.getoption("--fault-rounds", default=1)
    if "world" in metafunc.fixturenames and rounds > 1:
        metafunc.parametrize("fault_round", range(rounds), ids=lambda r: f"round{r}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Shuffle the fault scenarios among their own slots (other tests keep their order)."""
    slots = [i for i, item in enumerate(items) if _is_fault_item(item)]
    chosen = [items[i] for i in slots]
    random.Random(_seed(config)).shuffle(chosen)
    for i, item in zip(slots, chosen):
        items[i] = item


@pytest.fixture
def fault_round() -> int:
    return 0


@pytest.fixture
def fault_rng(request: pytest.FixtureRequest, fault_round: int) -> random.Random:
    """Random fault points, reproducible from --fault-seed, different per test and round."""
    return random.Random(f"{_seed(request.config)}/{request.node.nodeid}/{fault_round}")


@pytest.fixture
async def world(tmp_path: Path, redis_url: str | None, fault_round: int) -> AsyncIterator[World]:
    private: PrivateRedis | None = None
    if redis_url is None:  # no REDIS_URL (and not CI): a real Redis of our own
        private = PrivateRedis(tmp_path / "suite-redis")
        private.start()
        redis_url = private.url
    w = World(tmp_path, redis_url)
    try:
        yield w
    finally:
        await w.close()
        if private is not None:
            private.kill()
        _check_no_leaks(tmp_path)


_FDS: list[int] = []  # open fds of this (pytest) process after the first scenario
FD_SLACK = 32


def _check_no_leaks(tmp: Path) -> None:
    deadline = time.monotonic() + 5.0
    left = processes_under(tmp)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = processes_under(tmp)
    if left:
        kill_all([pid for pid, _ in left])
        pytest.fail(f"processes left running after the scenario: {left}", pytrace=False)
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if str(tmp) in line]
    assert not mounts, f"mounts left behind: {mounts}"
    fds = len(os.listdir("/proc/self/fd"))
    if not _FDS:
        _FDS.append(fds)
    assert fds <= _FDS[0] + FD_SLACK, f"the test process holds {fds} fds, {_FDS[0]} after the first scenario"
