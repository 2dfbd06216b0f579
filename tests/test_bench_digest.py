"""bench.digest runs, reports every piece size and writes its results (small total)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import digest as bench_digest


def test_digest_bench_writes_its_table(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert bench_digest.main(["--total", "16MiB", "--runs", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "digest.json").read_text())
    want = [(a, p) for a in ("blake3", "sha256") for p in bench_digest.PIECE_SIZES]
    assert [(r["algorithm"], r["piece_size"]) for r in data["rows"]] == want
    assert all(r["bytes_per_s"] > 0 for r in data["rows"])
    table = (tmp_path / "digest.md").read_text()
    assert table.count("\n| ") == 1 + len(want)  # header + one row each
    assert "GB/s" in capsys.readouterr().out
