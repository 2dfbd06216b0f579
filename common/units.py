"""Parsing of human sizes, rates and durations as Dragonfly's flags take them."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)(b?)|()()(b?))\s*\Z", re.IGNORECASE)
_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DUR_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DUR_MULT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str | int) -> int:
    """`20MB`, `512KB`, `1G`, `1.5MiB` or plain bytes -> bytes (binary multiples, as v1).

    Raises ValueError with a readable message on anything else.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 20MB, 512KB, 1G or plain bytes)")
    number, unit = m.group(1), m.group(2) or ""
    return int(float(number) * _MULT[unit.lower()])


def parse_duration(text: str | float | int) -> float:
    """`3m`, `5s`, `1h30m`, `250ms` or plain seconds -> seconds."""
    if isinstance(text, (int, float)):
        if text != text or text in (float("inf"), float("-inf")):
            raise ValueError(f"duration must be finite: {text}")
        if text < 0:
            raise ValueError(f"duration must not be negative: {text}")
        return float(text)
    s = text.strip().lower()
    try:
        value = float(s) if re.fullmatch(r"\d+(?:\.\d+)?", s) else None
    except ValueError:
        value = None
    if value is not None:
        if value < 0:
            raise ValueError(f"duration must not be negative: {text}")
        return value
    pos, total = 0, 0.0
    for m in _DUR_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DUR_MULT[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"not a duration: {text!r} (use e.g. 3m, 30s, 250ms, 1h)")
    return total


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
