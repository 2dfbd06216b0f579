"""Which addresses may be dialled: origins by the supernode, peers by dfget.

Default: deny loopback, link-local (cloud metadata lives there), unspecified, multicast
and reserved; allow everything else (intranet origins are normal). `allow` networks
are checked first, so `--allow-origin 127.0.0.0/8` opens loopback for demos and tests;
`deny` networks the operator adds always win over the defaults' allow-all.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DENY: tuple[str, ...] = (
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "fd00:ec2::254/128",  # AWS metadata over IPv6
)


def parse_networks(values: list[str] | tuple[str, ...]) -> tuple[IPNet, ...]:
    nets: list[IPNet] = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not a network: {v!r} (use CIDR, e.g. 10.0.0.0/8)") from None
    return tuple(nets)


@dataclass(frozen=True)
class AddressPolicy:
    allow: tuple[IPNet, ...] = ()
    deny: tuple[IPNet, ...] = field(default_factory=lambda: parse_networks(DEFAULT_DENY))
    extra_deny: tuple[IPNet, ...] = ()

    @classmethod
    def build(cls, allow: list[str] | tuple[str, ...] = (), deny: list[str] | tuple[str, ...] = ()) -> AddressPolicy:
        return cls(allow=parse_networks(allow), extra_deny=parse_networks(deny))

    def permits(self, address: str | IPAddr) -> bool:
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in n for n in self.extra_deny):
            return False
        if any(ip in n for n in self.allow):
            return True
        return not any(ip in n for n in self.deny)
