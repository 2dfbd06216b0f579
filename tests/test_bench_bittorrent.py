"""bench.bittorrent's pure parts: the info-hash the tracker whitelist needs, and the
baseline table bench.swarm writes."""

from __future__ import annotations

import hashlib

import pytest

from bench import swarm
from bench.bittorrent import info_hash


def test_info_hash_is_the_sha1_of_the_info_value_as_written() -> None:
    info = b"d6:lengthi5e4:name1:f12:piece lengthi4194304e6:pieces20:" + b"p" * 20 + b"e"
    torrent = b"d8:announce9:http://x/13:creation datei1e4:info" + info + b"8:url-listl9:http://o/ee"
    assert info_hash(torrent) == hashlib.sha1(info).hexdigest()
    with pytest.raises(ValueError):
        info_hash(b"d8:announce9:http://x/e")  # no info dictionary


def _summary(p50: float, origin: float, complete: int = 5) -> dict[str, object]:
    return {"p50": p50, "p90": p50, "max": p50 + 1, "origin_ratio": origin, "complete": complete}


def test_the_swarm_table_compares_with_the_best_complete_aria2_variant() -> None:
    row = {"name": "n5-256MiB", "clients": 5, "size": 256 << 20, "t_min": 20.0, "binding": "F/peer_down",
           "caps": {"origin": 32 << 20, "cdn_up": 50 << 20, "peer_down": 13 << 20, "peer_up": 13 << 20},
           "swarm": {"p50": 21.0, "p90": 21.0, "max": 22.0, "origin_ratio": 1.0, "eff_p50": 0.95,
                     "eff_max": 0.9, "peer_share": 0.8, "bytes_from_peers": 4, "bytes_from_supernode": 1,
                     "bytes_back_to_source": 0, "aggregate_mib_s": 60, "cpu_busy": 0.4, "correct": 5,
                     "times": [21.0] * 5},
           # random finished first but one host never completed: defaults is the best complete
           "bittorrent": {"defaults": _summary(42.0, 5.0), "random": _summary(30.0, 3.1, complete=4)}}
    text = swarm.markdown([row])
    line = next(ln for ln in text.splitlines() if ln.startswith("| n5-256MiB | 5 | 21.0"))
    assert "42.0 / 43.0 | 5.00" in line and "30.0 / 31.0 | 3.10" in line
    assert line.endswith("| 0.50 |")  # 21 / 42
