"""common/units.py: human sizes, rates and durations as the CLI flags take them."""

from __future__ import annotations

import pytest

from common.units import format_size, parse_duration, parse_size

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
BUG = "BUG common/units.py (see report)"


@pytest.mark.parametrize("text,want", [
    ("0", 0), ("1", 1), ("1024", 1024), ("512KB", 512 * KIB), ("512kb", 512 * KIB),
    ("512K", 512 * KIB), ("20MB", 20 * MIB), ("20M", 20 * MIB), ("1G", GIB), ("1GB", GIB),
    ("1.5MiB", 3 * MIB // 2), ("2T", 2 << 40), (" 7 MB ", 7 * MIB), ("1B", 1), ("0.5KB", 512),
    (0, 0), (123, 123),
])
def test_parse_size(text, want) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", [
    "", " ", "-1", "MB", "1XB", "1 2", "1e3", "1,5MB", "abc", "1PB", "1..5M", "+1",
    "1ib",
    "1iB",
])
def test_parse_size_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_rejects_negative_int() -> None:
    with pytest.raises(ValueError):
        parse_size(-1)


@pytest.mark.parametrize("text,want", [
    ("0", 0.0), ("5", 5.0), ("1.5", 1.5), ("5s", 5.0), ("250ms", 0.25), ("3m", 180.0),
    ("1h", 3600.0), ("1h30m", 5400.0), ("1m30s", 90.0), ("2h0m1s", 7201.0), ("1.5s", 1.5),
    (" 5S ", 5.0), (0, 0.0), (2.5, 2.5), (3, 3.0),
])
def test_parse_duration(text, want) -> None:
    assert parse_duration(text) == pytest.approx(want)


@pytest.mark.parametrize("text", [
    "", " ", "-1", "-5s", "s", "5x", "5 s", "m5", "1h 30m", "5sec", "abc", -1, -0.5,
    "inf",
    "nan",
    "infinity",
    float("nan"),
    float("inf"),
])
def test_parse_duration_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("n,want", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (MIB, "1.0 MiB"),
    (GIB, "1.0 GiB"), (1 << 40, "1.0 TiB"), (1 << 50, "1024.0 TiB"),
])
def test_format_size(n, want) -> None:
    assert format_size(n) == want
