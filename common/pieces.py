"""Piece maths: how a file of a given length is cut, and where each piece lies."""

from __future__ import annotations

MIB = 1 << 20
DEFAULT_PIECE_SIZE = 4 * MIB
MAX_PIECE_SIZE = 15 * MIB
UNKNOWN = -1


def piece_size_for(length: int) -> int:
    """Dragonfly v1's rule: 4 MiB up to 200 MiB, then +1 MiB per 100 MiB, capped at 15 MiB.

    An unknown length (chunked origin) gets the default size.
    """
    if length <= 200 * MIB:
        return DEFAULT_PIECE_SIZE
    gaps = length // (100 * MIB)  # v1 rounds down: 300 MiB + 1 -> 5 MiB
    return min(DEFAULT_PIECE_SIZE + (gaps - 2) * MIB, MAX_PIECE_SIZE)


def piece_count(length: int, piece_size: int) -> int:
    if length < 0:
        return UNKNOWN
    if piece_size <= 0:
        raise ValueError("piece size must be positive")
    return (length + piece_size - 1) // piece_size


def piece_range(number: int, length: int, piece_size: int) -> tuple[int, int]:
    """Inclusive byte range [start, end] of piece `number`.

    Raises ValueError for a number outside 0 <= n < count.
    """
    count = piece_count(length, piece_size)
    if not 0 <= number < count:
        raise ValueError(f"piece {number} outside 0..{count - 1}")
    start = number * piece_size
    end = min(start + piece_size, length) - 1
    return start, end


def piece_len(number: int, length: int, piece_size: int) -> int:
    start, end = piece_range(number, length, piece_size)
    return end - start + 1


def piece_of_range(start: int, end: int, length: int, piece_size: int) -> int | None:
    """The piece that contains the whole inclusive range, or None if it spans two."""
    if start < 0 or end < start or end >= length:
        return None
    number = start // piece_size
    return number if end // piece_size == number else None
