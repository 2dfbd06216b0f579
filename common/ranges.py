"""HTTP Range header parsing (RFC 9110 section 14), strict: one range only."""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import Error

# [0-9], not \d: \d also matches other scripts' digits, which int() then accepts
_RANGE_RE = re.compile(r"^bytes=([0-9]{0,19})-([0-9]{0,19})\Z")
_CONTENT_RANGE_RE = re.compile(r"^bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)\Z")


class RangeSyntaxError(Error, ValueError):
    """The header is malformed or asks for several ranges (answer 400)."""


class RangeUnsatisfiable(Error, ValueError):
    """Well-formed but outside the resource (answer 416)."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def header(self) -> str:
        return f"bytes={self.start}-{self.end}"

    def content_range(self, total: int | None) -> str:
        return f"bytes {self.start}-{self.end}/{'*' if total is None else total}"


def parse_range(header: str, size: int) -> ByteRange:
    """Resolve a single `bytes=` range against a resource of `size` bytes.

    Multi-range requests, other units, and garbage raise RangeSyntaxError;
    ranges that begin at or past the end raise RangeUnsatisfiable.
    """
    m = _RANGE_RE.match(header.strip())
    if not m:
        raise RangeSyntaxError(f"unsupported Range header: {header[:80]!r}")
    first, last = m.groups()
    if first == "" and last == "":
        raise RangeSyntaxError("empty range")
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise RangeUnsatisfiable("zero-length suffix range")
        if size == 0:
            raise RangeUnsatisfiable("empty resource")
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        raise RangeSyntaxError("range end before start")
    if start >= size:
        raise RangeUnsatisfiable(f"range starts at {start}, resource has {size} bytes")
    return ByteRange(start, min(end, size - 1))


def parse_content_range(header: str) -> tuple[int, int, int | None]:
    """`bytes a-b/total` -> (a, b, total or None). Raises RangeSyntaxError."""
    m = _CONTENT_RANGE_RE.match(header.strip())
    if not m:
        raise RangeSyntaxError(f"bad Content-Range: {header[:80]!r}")
    a, b, total = m.groups()
    start, end = int(a), int(b)
    if end < start:
        raise RangeSyntaxError("Content-Range end before start")
    return start, end, None if total == "*" else int(total)
