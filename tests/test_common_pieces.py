"""common/pieces.py: how a file is cut into pieces (Dragonfly v1's rule)."""

from __future__ import annotations

import pytest

from common.pieces import (
    DEFAULT_PIECE_SIZE, MAX_PIECE_SIZE, UNKNOWN, piece_count, piece_len, piece_of_range,
    piece_range, piece_size_for,
)

MIB = 1 << 20
# v1 (supernode/daemon/mgr/cdn computePieceSize): gapCount = length / 100 MiB (floor),
# size = (gapCount - 2) MiB + 4 MiB, capped at 15 MiB.
V1_FLOOR = pytest.mark.regression  # was a bug, fixed


@pytest.mark.parametrize("length,want", [
    (-1, 4 * MIB), (0, 4 * MIB), (1, 4 * MIB), (200 * MIB, 4 * MIB),
    pytest.param(200 * MIB + 1, 4 * MIB, marks=V1_FLOOR),
    pytest.param(250 * MIB, 4 * MIB, marks=V1_FLOOR),
    (300 * MIB, 5 * MIB),
    pytest.param(300 * MIB + 1, 5 * MIB, marks=V1_FLOOR),
    (400 * MIB, 6 * MIB), (1000 * MIB, 12 * MIB),
    pytest.param(1250 * MIB, 14 * MIB, marks=V1_FLOOR),
    (1300 * MIB, 15 * MIB), (10 << 30, 15 * MIB), (1 << 50, 15 * MIB),
])
def test_piece_size_for(length, want) -> None:
    assert piece_size_for(length) == want


def test_piece_size_never_outside_limits() -> None:
    for length in range(0, 3000 * MIB, 37 * MIB + 11):
        assert DEFAULT_PIECE_SIZE <= piece_size_for(length) <= MAX_PIECE_SIZE


@pytest.mark.parametrize("length,size,want", [
    (0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3), (-1, 4, UNKNOWN),
    (200 * MIB, 4 * MIB, 50), (200 * MIB + 1, 4 * MIB, 51),
])
def test_piece_count(length, size, want) -> None:
    assert piece_count(length, size) == want


@pytest.mark.parametrize("size", [0, -1])
def test_piece_count_rejects_bad_size(size) -> None:
    with pytest.raises(ValueError):
        piece_count(10, size)


@pytest.mark.parametrize("n,length,size,want", [
    (0, 10, 4, (0, 3)), (1, 10, 4, (4, 7)), (2, 10, 4, (8, 9)), (0, 1, 4, (0, 0)),
    (1, 8, 4, (4, 7)), (50, 200 * MIB + 1, 4 * MIB, (200 * MIB, 200 * MIB)),
])
def test_piece_range(n, length, size, want) -> None:
    assert piece_range(n, length, size) == want
    assert piece_len(n, length, size) == want[1] - want[0] + 1


@pytest.mark.parametrize("n,length,size", [
    (-1, 10, 4), (3, 10, 4), (2, 8, 4), (0, 0, 4), (1 << 40, 10, 4), (0, -1, 4),
])
def test_piece_range_out_of_range(n, length, size) -> None:
    with pytest.raises(ValueError):
        piece_range(n, length, size)


def test_pieces_tile_the_file() -> None:
    for length in (0, 1, 4, 5, 4095, 4096, 4097, 10_000):
        size = 1024
        ranges = [piece_range(i, length, size) for i in range(piece_count(length, size))]
        assert sum(e - s + 1 for s, e in ranges) == length
        assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("start,end,want", [
    (0, 3, 0), (4, 7, 1), (8, 9, 2), (5, 6, 1), (3, 4, None), (0, 9, None), (-1, 2, None),
    (5, 4, None), (8, 10, None), (10, 10, None),
])
def test_piece_of_range(start, end, want) -> None:
    assert piece_of_range(start, end, 10, 4) == want
