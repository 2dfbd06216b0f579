"""dfdaemon's pure decisions: route classification, digests, names, proxy rules, headers."""

from __future__ import annotations

import pytest

from dfdaemon import routes

H = "0123456789abcdef" * 4


@pytest.mark.parametrize("method,path,kind,name", [
    ("GET", f"/v2/library/alpine/blobs/sha256:{H}", "blob", "library/alpine"),
    ("GET", f"/v2/a/b/c/blobs/sha256:{H}", "blob", "a/b/c"),
    ("GET", f"/v2/x/blobs/sha256:{H}", "blob", "x"),
    ("HEAD", f"/v2/x/blobs/sha256:{H}", "registry", ""),  # only GETs go through the swarm
    ("GET", f"/v2/x/blobs/sha512:{H}{H}", "registry", ""),  # other algorithms: the registry's
    ("GET", f"/v2/x/blobs/sha256:{H.upper()}", "registry", ""),
    ("GET", f"/v2/x/blobs/sha256:{H}0", "registry", ""),
    ("GET", f"/v2/X/blobs/sha256:{H}", "registry", ""),  # not a valid repository name
    ("GET", f"/v2/../etc/blobs/sha256:{H}", "registry", ""),
    ("GET", f"/v2//blobs/sha256:{H}", "registry", ""),
    ("GET", "/v2/", "registry", ""),
    ("GET", "/v2", "registry", ""),
    ("GET", "/v2/x/manifests/latest", "registry", ""),
    ("PUT", "/v2/x/manifests/latest", "registry", ""),
    ("GET", "/v2/x/tags/list", "registry", ""),
    ("GET", "/metrics", "metrics", ""),
    ("GET", "/_ping", "ping", ""),
    ("GET", "/", "not_found", ""),
    ("GET", "/v20/x", "not_found", ""),
    ("GET", "/etc/passwd", "not_found", ""),
    ("CONNECT", "/", "proxy", ""),
])
def test_classify(method: str, path: str, kind: str, name: str) -> None:
    r = routes.classify(method, path)
    assert r.kind == kind
    assert r.name == name
    if kind == "blob":
        assert r.digest == f"sha256:{H}" and r.hex == H


def test_absolute_form_is_the_proxy() -> None:
    assert routes.classify("GET", "/v2/", absolute=True).kind == "proxy"


def test_names() -> None:
    assert routes.valid_name("a.b-c__d/e_f")
    for bad in ("", "A", "a//b", "/a", "a/", "a..b", "-a", "a" * 256, "a b", "a\x00"):
        assert not routes.valid_name(bad), bad


def test_digest() -> None:
    assert routes.parse_digest(f"sha256:{H}") == H
    for bad in (H, f"sha256:{H}\n", f"SHA256:{H}", f"sha256:{H[:-1]}g", "sha256:"):
        assert routes.parse_digest(bad) is None


def test_rules_and_proxy_decisions() -> None:
    rules = routes.parse_rules([r"direct:/private/", routes.DEFAULT_P2P_RULE, r"\.iso$"])
    blob = f"http://reg:5000/v2/x/blobs/sha256:{H}"
    assert routes.proxy_decision("GET", blob, rules) == "p2p"
    assert routes.proxy_decision("GET", f"http://reg/private/v2/x/blobs/sha256:{H}", rules) == "direct"
    assert routes.proxy_decision("GET", "https://mirror/debian.iso", rules) == "p2p"
    assert routes.proxy_decision("GET", "http://example/index.html", rules) == "direct"
    assert routes.proxy_decision("HEAD", blob, rules) == "direct"
    assert routes.proxy_decision("POST", blob, rules) == "direct"
    assert routes.proxy_decision("CONNECT", "reg:443", rules) == "tunnel"
    assert routes.proxy_decision("GET", "ftp://x/y", rules) == "refuse"
    assert routes.proxy_decision("GET", "file:///etc/passwd", rules) == "refuse"
    with pytest.raises(ValueError):
        routes.parse_rules(["("])


def test_forward_headers_drops_hop_by_hop_and_keeps_repeats() -> None:
    got = routes.forward_headers([
        ("Accept", "a"), ("Accept", "b"), ("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"),
        ("Transfer-Encoding", "chunked"), ("Proxy-Authorization", "Basic x"), ("Host", "h"),
        ("Authorization", "Bearer t")], drop=("host",))
    assert got == [("Accept", "a"), ("Accept", "b"), ("Authorization", "Bearer t")]


def test_origin_of() -> None:
    assert routes.origin_of("http://Reg:80/v2/") == routes.origin_of("http://reg/x") == ("http", "reg", 80)
    assert routes.origin_of("https://reg/x") == ("https", "reg", 443)
    assert routes.origin_of("http://reg:5000/x") != routes.origin_of("http://reg/x")
    assert routes.origin_of("http://reg:99999/x")[2] == 80  # a bad port is no port
