"""Which addresses the crawl may connect to: public ones, plus `allow_networks`, minus `deny_networks`.

Loopback, private, link-local (cloud metadata), shared, reserved and other non-global space is refused
unless an `allow_networks` CIDR covers it; an IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64,
compatible) is judged by both. `check` is the DNS check: a host is refused if any address it resolves
to is, and the connection (sockets.guarded_connect) then goes to the addresses checked, so DNS cannot
answer differently between the check and the connect. It runs on every connection, on whatever the
resolver's cache (resolver.py) answers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddress(OSError):
    """The host resolves to an address the policy refuses."""


@dataclass(frozen=True)
class AddressPolicy:
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def from_cidrs(cls, allow: list[str], deny: list[str]) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in allow),
                   tuple(ipaddress.ip_network(c, strict=False) for c in deny))

    def refuses(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        # an IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64, compatible) is judged by both
        return any(self._refuses(a) for a in (ip, *_embedded_ipv4(ip)))

    def _refuses(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(ip in net for net in self.deny):
            return True
        if any(ip in net for net in self.allow):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST_V6 and ip not in _NAT64:
            return True  # site-local fec0::/10, IPv4-compatible ::a.b.c.d and other legacy space
        if isinstance(ip, ipaddress.IPv4Address) and ip in _IETF_V4:
            return True  # Python counts some of it global; Oracle Cloud's legacy metadata service is 192.0.0.192
        # not global: loopback, private, link-local (cloud metadata), shared, reserved, unspecified
        return not ip.is_global or ip.is_multicast


_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")  # IETF protocol assignments: anycast relays, no web servers


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def check(policy: AddressPolicy, host: str, infos: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """`host`'s resolved addresses (getaddrinfo's tuples) as given; BlockedAddress if the policy refuses any."""
    for *_, sockaddr in infos:
        if policy.refuses(str(sockaddr[0])):
            raise BlockedAddress(f"{host} resolves to {sockaddr[0]}, which is not a public address "
                                 "(add its network to allow_networks to crawl it)")
    return infos
