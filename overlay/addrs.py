"""Addresses: what a node listens on, what it tells others to dial, and circuit addresses.

- :func:`interface_ipv4s` lists this host's IPv4 interface addresses (Linux
  ``SIOCGIFADDR``; no extra package), so a node listening on ``0.0.0.0``
  advertises addresses others can dial instead of ``0.0.0.0``.
- :func:`expand_unspecified` turns ``/ip4/0.0.0.0/tcp/P`` into one address per
  interface, loopback last.
- :func:`circuit_addr` / :func:`parse_circuit` build and split
  ``/ip4/R/tcp/P/p2p/<relay>/p2p-circuit[/p2p/<target>]``, the address of a
  peer reachable through relay ``<relay>``.
- :func:`ip_class` tells loopback, private (RFC 1918, CGNAT, link-local) and
  public addresses apart (dial-back and address ordering use it).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

import attrs

from .errors import DialError

__all__ = [
    "CIRCUIT",
    "CircuitAddr",
    "circuit_addr",
    "expand_unspecified",
    "interface_ipv4s",
    "ip_class",
    "ip_port",
    "is_circuit",
    "parse_circuit",
    "strip_peer",
]

CIRCUIT = "/p2p-circuit"
_SIOCGIFADDR = 0x8915


def interface_ipv4s() -> list[str]:
    """IPv4 addresses of this host's interfaces that are up (loopback included)."""
    out: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address, or the interface is down
                continue
            ip = socket.inet_ntoa(packed[20:24])
            if ip not in out:
                out.append(ip)
    return out


def ip_class(ip: str) -> str:
    """``loopback`` | ``private`` (RFC 1918, CGNAT, link-local, unique-local) | ``public`` | ``invalid``."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return "invalid"
    if a.is_loopback:
        return "loopback"
    if a.is_unspecified:
        return "invalid"
    cgnat = isinstance(a, ipaddress.IPv4Address) and a in ipaddress.ip_network("100.64.0.0/10")
    if a.is_link_local or cgnat or (a.is_private and not _is_benchmark(a)):
        return "private"
    return "public"


def _is_benchmark(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # 198.18.0.0/15 (RFC 2544, network benchmarking) is what our NAT tests use as "the internet";
    # Python counts it as private, but no home router hands it out.
    return isinstance(a, ipaddress.IPv4Address) and a in ipaddress.ip_network("198.18.0.0/15")


def ip_port(addr: str) -> tuple[str, int] | None:
    """(ip, port) of ``/ip4/<ip>/tcp/<port>...``; None for other shapes."""
    parts = addr.split("/")
    if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
        try:
            return parts[2], int(parts[4])
        except ValueError:
            return None
    return None


def strip_peer(addr: str) -> str:
    """``addr`` without a trailing ``/p2p/<id>``."""
    i = addr.rfind("/p2p/")
    if i >= 0 and CIRCUIT not in addr[i:]:
        return addr[:i]
    return addr


def expand_unspecified(addrs: list[str], interfaces: list[str] | None = None) -> list[str]:
    """Each ``/ip4/0.0.0.0/...`` replaced by one address per interface (public, private, loopback)."""
    ips = interface_ipv4s() if interfaces is None else interfaces
    order = {"public": 0, "private": 1, "loopback": 2}
    ips = sorted(ips, key=lambda ip: order.get(ip_class(ip), 3))
    out: list[str] = []
    for a in addrs:
        if a.startswith("/ip4/0.0.0.0/"):
            rest = a[len("/ip4/0.0.0.0") :]
            out.extend(f"/ip4/{ip}{rest}" for ip in ips)
        else:
            out.append(a)
    return list(dict.fromkeys(out))


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


@attrs.frozen
class CircuitAddr:
    relay_addr: str  # the relay's transport multiaddr, without /p2p/
    relay_id: str
    target: str  # peer id of the relayed peer ("" when the address does not name it)


def circuit_addr(relay_addr: str, relay_id: str, target: str = "") -> str:
    """``<relay_addr>/p2p/<relay_id>/p2p-circuit[/p2p/<target>]``."""
    base = f"{strip_peer(relay_addr)}/p2p/{relay_id}{CIRCUIT}"
    return f"{base}/p2p/{target}" if target else base


def parse_circuit(addr: str) -> CircuitAddr:
    """Split a circuit address; DialError when it is not one."""
    head, sep, tail = addr.partition(CIRCUIT)
    if not sep:
        raise DialError(f"{addr!r} is not a /p2p-circuit address")
    i = head.rfind("/p2p/")
    if i < 0 or not head[i + 5 :]:
        raise DialError(f"{addr!r}: the relay part has no /p2p/<relay id>")
    target = ""
    if tail:
        if not tail.startswith("/p2p/") or not tail[5:] or "/" in tail[5:]:
            raise DialError(f"{addr!r}: expected /p2p-circuit/p2p/<peer id> after the relay")
        target = tail[5:]
    if not head[:i]:
        raise DialError(f"{addr!r}: the relay part has no transport address")
    return CircuitAddr(head[:i], head[i + 5 :], target)
