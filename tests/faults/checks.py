"""What every fault scenario asserts about its outcome (issue 5): a dfget that reports
success has exactly the origin's bytes; any other one failed with its documented exit
code, left no output and no half-written file that looks complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import (
    EXIT_DISK,
    EXIT_INTEGRITY,
    EXIT_NO_SUPERNODE,
    EXIT_ORIGIN,
    EXIT_P2P_FAILED,
    EXIT_TIMEOUT,
)

from .harness import Result

# every code a dfget may end with in a fault scenario besides success (README table)
DOCUMENTED = {EXIT_NO_SUPERNODE, EXIT_ORIGIN, EXIT_INTEGRITY, EXIT_TIMEOUT, EXIT_DISK, EXIT_P2P_FAILED}


def ok(r: Result, out: Path, data: bytes) -> dict[str, Any]:
    """Success: exit 0, identical bytes, no part file left, a consistent --json report."""
    assert r.code == 0, f"dfget failed ({r.code}): {r.stderr}"
    assert out.read_bytes() == data, "dfget reported success with bytes that are not the origin's"
    assert not parts(out), f"part files left next to a finished download: {parts(out)}"
    rep = r.report
    assert rep["exit_code"] == 0 and rep["length"] == len(data)
    assert "Traceback" not in r.stderr, r.stderr
    return rep


# dfget's notices (dfget/notices.py): said whatever happens, they are not errors
NOTICES = ("dfget: started a peer server for ", "dfget: downloading from the origin: ")


def failed(r: Result, code: int, out: Path) -> dict[str, Any]:
    """A clean failure: the expected documented code, one error line on stderr (besides
    dfget's notices, at most one of each), no output."""
    assert code in DOCUMENTED
    assert r.code == code, f"expected exit {code}, got {r.code}: {r.stderr}"
    all_lines = r.stderr.strip().splitlines()
    lines = [ln for ln in all_lines if not ln.startswith(NOTICES)]
    assert len(lines) == 1 and lines[0].startswith("dfget: error:"), r.stderr
    assert len(all_lines) - len(lines) <= len(NOTICES), r.stderr
    assert not out.exists(), "a failed download left an output file"
    rep = r.report
    assert rep["exit_code"] == code
    return rep


def parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.dfget-part"))


def transferred(rep: dict[str, Any]) -> int:
    """Bytes of verified pieces this run got (each piece counted once when verified)."""
    return int(rep["bytes_from_peers"] + rep["bytes_from_supernode"] + rep["bytes_from_origin"])
