"""How the store encodes piece sets and counts: a Redis bitmap (`SETBIT`, bit n is the
MSB-first bit n of the string) and a `BITFIELD` array of big-endian u16 counts. Pure: the
repository returns these and the scheduling policy reads them."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from itertools import compress

_FLAG = bytes.maketrans(b"01", b"\x00\x01")


class Bitmap:
    """A Redis bitmap (bit n is the MSB-first bit n of the string), read-only."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes | None = None) -> None:
        self._data = data or b""

    def __contains__(self, n: int) -> bool:
        i = n >> 3
        return 0 <= i < len(self._data) and bool(self._data[i] & (0x80 >> (n & 7)))

    def count(self) -> int:
        return int.from_bytes(self._data, "big").bit_count()

    def flags(self, n: int) -> bytes:
        """n bytes, byte i is 1 if bit i is set (for itertools.compress: C speed)."""
        if not self._data:
            return bytes(n)
        bits = bin(int.from_bytes(self._data, "big") | (1 << (8 * len(self._data))))[3:]
        return bits.encode().translate(_FLAG)[:n].ljust(n, b"\0")

    def members(self, n: int) -> list[int]:
        """The set bits below n, ascending."""
        return list(compress(range(n), self.flags(n)))

    @classmethod
    def of(cls, pieces: Iterable[int]) -> Bitmap:
        buf = bytearray()
        for n in pieces:
            i = n >> 3
            if i >= len(buf):
                buf.extend(b"\x00" * (i + 1 - len(buf)))
            buf[i] |= 0x80 >> (n & 7)
        return cls(bytes(buf))


def decode_counts(raw: bytes | None, n: int) -> list[int]:
    """BITFIELD u16 array (big-endian) -> list of n counts (missing tail = 0)."""
    raw = raw or b""
    a = array("H")
    a.frombytes(raw[: 2 * min(n, len(raw) // 2)])
    if sys.byteorder == "little":
        a.byteswap()
    out = a.tolist()
    out.extend([0] * (n - len(out)))
    return out
