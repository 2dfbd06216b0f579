"""bench.tls runs both modes and both legs end to end and writes its table (small file)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import tls as bench_tls


def test_tls_bench_writes_its_table(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert bench_tls.main(["--size", "8MiB", "--runs", "1", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")]) == 0
    data = json.loads((tmp_path / "out" / "tls.json").read_text())
    legs = {(x["mode"], x["leg"]): x for x in data["legs"]}
    assert set(legs) == {("plain", "cdn"), ("plain", "peer"), ("tls", "cdn"), ("tls", "peer")}
    assert all(x["ok"] for x in legs.values())
    # the peer leg is served by the first host's peer server, the CDN leg by the supernode
    assert all(legs[(m, "peer")]["bytes_from_peers"] == 8 << 20 for m in ("plain", "tls"))
    assert all(legs[(m, "cdn")]["bytes_from_supernode"] == 8 << 20 for m in ("plain", "tls"))
    table = (tmp_path / "out" / "tls.md").read_text()
    assert table.count("\n| cdn |") == 2 and table.count("\n| peer |") == 2
    assert "TLS cost per GiB" in table and "CPU s/GiB" in capsys.readouterr().out
