"""common/netpolicy.py: which addresses may be dialled."""

from __future__ import annotations

import ipaddress

import pytest

from common.netpolicy import AddressPolicy, parse_networks

DENIED_BY_DEFAULT = [
    "127.0.0.1", "127.255.255.254", "::1", "169.254.169.254", "169.254.0.1", "fe80::1",
    "0.0.0.0", "::", "224.0.0.1", "239.255.255.250", "ff02::1", "240.0.0.1",
    "255.255.255.255", "100.100.100.200", "fd00:ec2::254", "::ffff:127.0.0.1",
    "::ffff:169.254.169.254", "::ffff:0.0.0.0",
]
ALLOWED_BY_DEFAULT = ["8.8.8.8", "93.184.216.34", "10.0.0.7", "192.168.1.10", "172.16.5.4",
                      "2606:4700::1111", "::ffff:10.0.0.7", "fd12:3456::1"]
NOT_ADDRESSES = ["", "localhost", "127.0.0.1:80", "1.2.3", "999.1.1.1", "http://1.2.3.4",
                 "1.2.3.4\x00", " 1.2.3.4"]


@pytest.mark.parametrize("addr", DENIED_BY_DEFAULT)
def test_default_denies(addr) -> None:
    assert not AddressPolicy().permits(addr)
    assert not AddressPolicy.build().permits(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", ALLOWED_BY_DEFAULT)
def test_default_allows(addr) -> None:
    assert AddressPolicy.build().permits(addr)


@pytest.mark.parametrize("addr", NOT_ADDRESSES)
def test_garbage_is_denied(addr) -> None:
    assert not AddressPolicy.build(allow=["0.0.0.0/0"]).permits(addr)


@pytest.mark.parametrize("addr,want", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::ffff:127.0.0.1", True), ("::1", False),
    ("169.254.169.254", False), ("8.8.8.8", True),
])
def test_allow_opens_loopback(addr, want) -> None:
    assert AddressPolicy.build(allow=["127.0.0.0/8"]).permits(addr) is want


@pytest.mark.parametrize("addr,want", [
    ("10.1.2.3", False), ("10.255.0.1", False), ("11.0.0.1", True), ("127.0.0.1", False),
    ("::ffff:10.1.2.3", False),
])
def test_extra_deny_wins_even_over_allow(addr, want) -> None:
    p = AddressPolicy.build(allow=["127.0.0.0/8", "10.0.0.0/8"], deny=["10.0.0.0/8", "127.0.0.0/8"])
    assert p.permits(addr) is want


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "nope", "", "1.2.3.4/x"])
def test_parse_networks_rejects(bad) -> None:
    with pytest.raises(ValueError):
        parse_networks([bad])


def test_parse_networks_non_strict() -> None:
    assert parse_networks(["10.1.2.3/8", " ::1/128 "]) == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
