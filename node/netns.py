"""Homes behind NAT on one machine: network namespaces, veth pairs, a bridge, nftables masquerade.

``cocoon-node devnet --nat`` and the NAT tests build this (as root)::

    public "internet" 198.18.0.0/24 (RFC 2544 benchmarking range: never routed outside)
      bridge in <p>-sw
        +-- <p>-pubN   public hosts  198.18.0.(10+N)      chain, bootstrap, proxies
        +-- <p>-rK     home router   198.18.0.(100+K) WAN
              |  nftables: masquerade out of the WAN, unsolicited inbound dropped
              +-- <p>-hK   home host  192.168.K.2 (LAN 192.168.K.0/24, router .1)

A router's NAT is ``cone`` (plain masquerade: Linux keeps the source port when
it can, so a hole punch from a known port gets through) or ``symmetric``
(``masquerade fully-random``: every flow gets a random port, so a punch cannot
predict it and traffic stays relayed).  Unsolicited inbound packets are
dropped, not answered with a reset, as home routers do.

Everything lives in namespaces this module made and is removed by
:meth:`Topology.down` (also at the start of :meth:`Topology.up`, for leftovers
of a run that was killed).  :func:`forward_into` serves a loopback port of the
caller's namespace that connects into a namespace (a client API inside a home).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence

import attrs
import trio

from overlay.errors import ConfigError

__all__ = ["Home", "Topology", "forward_into", "namespaces_available"]

log = logging.getLogger(__name__)
PUBLIC_NET = "198.18.0"
_CLONE_NEWNET = 0x40000000


def namespaces_available() -> tuple[bool, str]:
    """Whether this process can build the topology, and if not, why."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed (iproute2, nftables)"
    name = f"cnprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return False, f"ip netns add refused: {r.stderr.strip()}"
    try:
        r = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "add", "table", "ip", "probe"],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            return False, f"nftables refused in a namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return True, "ok"


@attrs.frozen
class Home:
    nat: str = "cone"  # cone | symmetric | public (devnet: the node goes on a public host, no NAT)


@attrs.define
class Topology:
    """The namespaces of one run (see the module docstring)."""

    prefix: str
    public_hosts: int = 1
    homes: tuple[Home, ...] = (Home(), Home())
    made: list[str] = attrs.field(factory=list)
    _links: int = 0

    @classmethod
    def for_run(cls, public_hosts: int, homes: Sequence[Home]) -> Topology:
        return cls(f"cn{os.getpid() % 10000:04d}", public_hosts, tuple(homes))

    # ------------------------------------------------------------------ names

    def ns_public(self, i: int) -> str:
        return f"{self.prefix}-pub{i}"

    def ns_home(self, k: int) -> str:
        return f"{self.prefix}-h{k}"

    def ns_router(self, k: int) -> str:
        return f"{self.prefix}-r{k}"

    def public_ip(self, i: int) -> str:
        return f"{PUBLIC_NET}.{10 + i}"

    def router_wan_ip(self, k: int) -> str:
        return f"{PUBLIC_NET}.{100 + k}"

    def home_ip(self, k: int) -> str:
        return f"192.168.{k}.2"

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    # ------------------------------------------------------------------ building

    def _run(self, *args: str, ns: str | None = None, stdin: str | None = None) -> None:
        cmd = [*(self.exec_prefix(ns) if ns else []), *args]
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise ConfigError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")

    def _ns(self, name: str) -> None:
        self._run("ip", "netns", "add", name)
        self.made.append(name)
        self._run("ip", "link", "set", "lo", "up", ns=name)

    def _veth(self, a_ns: str, a: str, b_ns: str, b: str) -> None:
        """A veth pair with ends ``a`` in ``a_ns`` and ``b`` in ``b_ns`` (made under unique names here)."""
        self._links += 1
        ta, tb = f"{self.prefix}x{self._links}", f"{self.prefix}y{self._links}"
        self._run("ip", "link", "add", ta, "type", "veth", "peer", "name", tb)
        for tmp, ns, name in ((ta, a_ns, a), (tb, b_ns, b)):
            self._run("ip", "link", "set", tmp, "netns", ns)
            self._run("ip", "link", "set", tmp, "name", name, ns=ns)

    def _up(self, ns: str, dev: str, cidr: str | None = None) -> None:
        if cidr:
            self._run("ip", "addr", "add", cidr, "dev", dev, ns=ns)
        self._run("ip", "link", "set", dev, "up", ns=ns)

    def _nat_rules(self, k: int, kind: str) -> str:
        wan = f"{self.prefix}w{k}"
        masq = "masquerade fully-random" if kind == "symmetric" else "masquerade"
        return f"""
table ip nat {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{wan}" {masq}
  }}
}}
table inet home {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{wan}" ct state established,related accept
    iifname "{wan}" drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{wan}" ct state established,related accept
    iifname "{wan}" drop
  }}
}}
"""

    def up(self) -> Topology:
        """Build every namespace, link and rule; ConfigError (after cleaning up) when anything fails."""
        ok, why = namespaces_available()
        if not ok:
            raise ConfigError(f"cannot build NAT namespaces: {why}")
        self.down()
        try:
            sw = f"{self.prefix}-sw"
            self._ns(sw)
            self._run("ip", "link", "add", "br0", "type", "bridge", ns=sw)
            self._up(sw, "br0")
            for i in range(1, self.public_hosts + 1):
                ns = self.ns_public(i)
                self._ns(ns)
                self._veth(ns, "eth0", sw, f"{self.prefix}p{i}")
                self._run("ip", "link", "set", f"{self.prefix}p{i}", "master", "br0", ns=sw)
                self._up(sw, f"{self.prefix}p{i}")
                self._up(ns, "eth0", f"{self.public_ip(i)}/24")
            for k, home in enumerate(self.homes, start=1):
                r, h = self.ns_router(k), self.ns_home(k)
                self._ns(r)
                self._ns(h)
                wan = f"{self.prefix}w{k}"
                self._veth(r, wan, sw, f"{self.prefix}W{k}")
                self._run("ip", "link", "set", f"{self.prefix}W{k}", "master", "br0", ns=sw)
                self._up(sw, f"{self.prefix}W{k}")
                self._up(r, wan, f"{self.router_wan_ip(k)}/24")
                self._veth(r, "lan0", h, "eth0")
                self._up(r, "lan0", f"192.168.{k}.1/24")
                self._up(h, "eth0", f"{self.home_ip(k)}/24")
                self._run("ip", "route", "add", "default", "via", f"192.168.{k}.1", ns=h)
                self._run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", ns=r)
                self._run("nft", "-f", "-", ns=r, stdin=self._nat_rules(k, home.nat))
        except BaseException:
            self.down()
            raise
        n_pub, n_homes = self.public_hosts, len(self.homes)
        log.info("NAT topology %s: %d public hosts, %d homes", self.prefix, n_pub, n_homes)
        return self

    def down(self) -> None:
        """Remove every namespace of this prefix (veths and rules go with them)."""
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
        ours = [line.split()[0] for line in r.stdout.splitlines() if line.startswith(f"{self.prefix}-")]
        for ns in sorted(set(ours) | set(self.made)):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.made.clear()


# --------------------------------------------------------------------------- reaching into a namespace


_setns_lock = threading.Lock()


def _connect_in(ns: str, host: str, port: int) -> socket.socket:
    """A TCP connection made from inside namespace ``ns`` (setns on this thread only, then back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    here, there = "/proc/thread-self/ns/net", f"/run/netns/{ns}"
    with _setns_lock, open(here, "rb") as home, open(there, "rb") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            sock = socket.create_connection((host, port), timeout=10)
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:  # pragma: no cover - cannot fail as root
                raise OSError(ctypes.get_errno(), "setns back failed")
    sock.settimeout(None)
    return sock


async def forward_into(
    ns: str,
    port: int,
    *,
    listen_port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve 127.0.0.1:``listen_port`` here, each connection piped to 127.0.0.1:``port`` inside ``ns``."""

    async def pipe(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
        try:
            while data := await a.receive_some(65536):
                await b.send_all(data)
            await b.send_eof()  # type: ignore[attr-defined]
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def handle(client: trio.SocketStream) -> None:
        try:
            raw = await trio.to_thread.run_sync(_connect_in, ns, "127.0.0.1", port)
        except OSError as e:
            log.info("forward into %s:%d failed: %s", ns, port, e)
            await client.aclose()
            return
        inner = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
        async with client, inner, trio.open_nursery() as n:
            n.start_soon(pipe, client, inner)
            n.start_soon(pipe, inner, client)

    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    task_status.started(int(listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(handle, listeners)
