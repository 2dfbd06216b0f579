"""common/ranges.py: strict single-range parsing."""

from __future__ import annotations

import pytest

from common.ranges import (
    ByteRange, RangeSyntaxError, RangeUnsatisfiable, parse_content_range, parse_range,
)


@pytest.mark.parametrize("header,size,want", [
    ("bytes=0-9", 100, (0, 9)), ("bytes=0-0", 1, (0, 0)), ("bytes=10-", 100, (10, 99)),
    ("bytes=99-", 100, (99, 99)), ("bytes=90-200", 100, (90, 99)), ("bytes=-10", 100, (90, 99)),
    ("bytes=-100", 100, (0, 99)), ("bytes=-500", 100, (0, 99)), (" bytes=1-2 ", 100, (1, 2)),
    ("bytes=0-99", 100, (0, 99)),
])
def test_parse_range(header, size, want) -> None:
    r = parse_range(header, size)
    assert (r.start, r.end) == want
    assert r.length == want[1] - want[0] + 1


@pytest.mark.parametrize("header", [
    "bytes=0-1,3-4", "bytes=0-1, 3-4", "bytes=-", "bytes=", "items=0-1", "bytes 0-1", "0-1",
    "bytes=a-b", "bytes=1-a", "bytes=-1-2", "bytes=5-2", "bytes=1.5-2", "garbage", "",
    "bytes=0-1\r\nX: y", "bytes=+1-2", "bytes=" + "9" * 20 + "-", "bytes=0x10-",
])
def test_parse_range_syntax_errors(header) -> None:
    with pytest.raises(RangeSyntaxError):
        parse_range(header, 100)


@pytest.mark.parametrize("header,size", [
    ("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0),
    ("bytes=-1", 0), ("bytes=0-0", 0),
])
def test_parse_range_unsatisfiable(header, size) -> None:
    with pytest.raises(RangeUnsatisfiable):
        parse_range(header, size)


def test_syntax_and_unsatisfiable_are_distinct() -> None:
    # 400 vs 416: neither may be a subclass of the other
    assert not issubclass(RangeSyntaxError, RangeUnsatisfiable)
    assert not issubclass(RangeUnsatisfiable, RangeSyntaxError)


def test_byte_range_headers() -> None:
    r = ByteRange(10, 19)
    assert r.header() == "bytes=10-19"
    assert r.content_range(100) == "bytes 10-19/100"
    assert r.content_range(None) == "bytes 10-19/*"


@pytest.mark.parametrize("header,want", [
    ("bytes 0-9/100", (0, 9, 100)), ("bytes 5-5/*", (5, 5, None)),
    (" bytes 0-0/1 ", (0, 0, 1)),
])
def test_parse_content_range(header, want) -> None:
    assert parse_content_range(header) == want


@pytest.mark.parametrize("header", [
    "bytes 9-0/100", "bytes */100", "bytes 0-9", "bytes=0-9/100", "0-9/100", "",
    "bytes 0-9/abc", "bytes -1-9/100", "bytes 0-9/100/1",
])
def test_parse_content_range_rejects(header) -> None:
    with pytest.raises(RangeSyntaxError):
        parse_content_range(header)
