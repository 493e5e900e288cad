"""Reachability: is this node publicly dialable?  A dial-back asked of other nodes.

py-libp2p 0.8.1 ships ``libp2p.host.autonat``, but its server dials back
with ``host.connect``, which returns the *existing* connection to the asking
peer (the one the request came on) without dialling anything, so every node
looks public.  Our dial-back (``/cocoon/dialback/1``) does what AutoNAT
means:

- the asking node sends the addresses it listens on (with its public IP as a
  server saw it, when it knows one);
- the server dials only addresses on the IP it *observes* the request from
  (no amplification toward third parties), over a **fresh** TCP connection
  from an ephemeral port, and completes a Noise handshake that proves the
  asker's peer id; then it closes that connection and answers;
- a server refuses to vouch for a private or loopback requester unless its own
  end of the connection is private or loopback too (a LAN or a devnet), and
  rate-limits each peer and IP.

:class:`Reachability` (pure) keeps the latest verdict of each server and
decides ``public`` / ``private`` / ``unknown`` with hysteresis: a status
changes only when at least ``need`` servers (or every server that answered,
when fewer did) agree and outnumber those that disagree.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from typing import TYPE_CHECKING

import attrs
import trio

from . import wire
from .addrs import ip_class, ip_port
from .errors import NodeError, RemoteError, TransportError
from .streams import FramedStream

if TYPE_CHECKING:
    from .host import Overlay

__all__ = [
    "DIALBACK_PROTOCOL",
    "DialBackLimiter",
    "DialBackRequest",
    "DialBackResponse",
    "DialBackService",
    "Reachability",
    "ReachabilityStats",
]

log = logging.getLogger(__name__)
DIALBACK_PROTOCOL = "/cocoon/dialback/1"
STATUSES = ("unknown", "public", "private")


@wire.message(10)
@attrs.frozen
class DialBackRequest:
    addrs: tuple[str, ...] = attrs.field(metadata=wire.limits(max_items=8, max_len=256))


@wire.message(11)
@attrs.frozen
class DialBackResponse:
    status: str = attrs.field(metadata=wire.limits(max_len=16))  # ok | dial_error | refused
    addr: str = attrs.field(metadata=wire.limits(max_len=256))  # the address that answered (ok)
    reason: str = attrs.field(metadata=wire.limits(max_len=128))


@attrs.frozen
class ReachabilityStats:
    status: str  # unknown | public | private
    forced: bool  # set by configuration, not measured
    public_addrs: tuple[str, ...]  # addresses servers reached us at
    verdicts: dict[str, bool]  # server peer id -> reached us
    probes: int  # dial-backs asked


class Reachability:
    """Verdicts of dial-back servers -> a status (see the module docstring)."""

    def __init__(self, *, need: int = 2, max_age_s: float = 3600.0, forced: str = "auto") -> None:
        if forced not in ("auto", "public", "private"):
            raise ValueError(f"reachability must be auto, public or private, not {forced!r}")
        self.need = need
        self.max_age_s = max_age_s
        self.forced = forced
        self._verdicts: dict[str, tuple[bool, str, float]] = {}
        self._status = forced if forced != "auto" else "unknown"
        self.probes = 0

    def record(self, server: str, reached: bool, addr: str, now: float) -> str:
        """One server's verdict; returns the (possibly new) status."""
        self._verdicts[server] = (reached, addr, now)
        self.probes += 1
        return self.status(now)

    def status(self, now: float) -> str:
        if self.forced != "auto":
            return self.forced
        live = [v for v in self._verdicts.values() if now - v[2] <= self.max_age_s]
        if not live:
            self._status = "unknown"
            return self._status
        yes = sum(1 for v in live if v[0])
        no = len(live) - yes
        need = min(self.need, len(live))
        if yes >= need and yes > no:
            self._status = "public"
        elif no >= need and no > yes:
            self._status = "private"
        return self._status

    def public_addrs(self, now: float) -> tuple[str, ...]:
        """Addresses a server reached us at (what to announce while public)."""
        seen = [v[1] for v in self._verdicts.values() if v[0] and v[1] and now - v[2] <= self.max_age_s]
        return tuple(dict.fromkeys(seen))

    def statistics(self, now: float) -> ReachabilityStats:
        return ReachabilityStats(
            self.status(now),
            self.forced != "auto",
            self.public_addrs(now),
            {s: v[0] for s, v in self._verdicts.items()},
            self.probes,
        )


class DialBackLimiter:
    """At most ``per_peer`` dial-backs per peer and ``per_ip`` per IP in ``window_s`` (pure)."""

    def __init__(self, per_peer: int = 4, per_ip: int = 16, window_s: float = 60.0) -> None:
        self.per_peer = per_peer
        self.per_ip = per_ip
        self.window_s = window_s
        self._seen: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, peer: str, ip: str, now: float) -> bool:
        for key, cap in ((f"peer:{peer}", self.per_peer), (f"ip:{ip}", self.per_ip)):
            q = self._seen[key]
            while q and q[0] <= now - self.window_s:
                q.popleft()
            if len(q) >= cap:
                return False
        self._seen[f"peer:{peer}"].append(now)
        self._seen[f"ip:{ip}"].append(now)
        if len(self._seen) > 4096:
            for k in [k for k, q in self._seen.items() if not q]:
                del self._seen[k]
        return True


def dialable_for(observed_ip: str, addrs: tuple[str, ...], limit: int = 3) -> list[str]:
    """What a server may dial for a request: the *observed* IP at the ports of its TCP addresses.

    Only the requester's own IP is ever dialled (no amplification toward third
    parties); taking the ports alone also covers a router that forwards a port
    to a node that only knows its LAN address.
    """
    out = []
    for a in addrs:
        ip_p = ip_port(a)
        if ip_p is None or not 0 < ip_p[1] < 65536:
            continue
        out.append(f"/ip4/{observed_ip}/tcp/{ip_p[1]}")
    return list(dict.fromkeys(out))[:limit]


def may_vouch(observed_ip: str, local_ip: str) -> bool:
    """Whether a server whose end of the connection is ``local_ip`` may judge ``observed_ip``."""
    seen, ours = ip_class(observed_ip), ip_class(local_ip)
    if seen == "invalid":
        return False
    if seen == "public":
        return True
    return ours == seen  # a LAN judges a LAN, a devnet's loopback judges loopback


class DialBackService:
    """Serves dial-backs and asks servers for them (the shell around :class:`Reachability`)."""

    def __init__(self, overlay: Overlay, core: Reachability, *, dial_timeout_s: float = 5.0) -> None:
        self.overlay = overlay
        self.core = core
        self.limiter = DialBackLimiter()
        self.dial_timeout_s = dial_timeout_s
        self.served = 0
        self._changed = trio.Event()

    def status(self) -> str:
        return self.core.status(trio.current_time())

    async def wait_changed(self) -> str:
        """Wait for the next dial-back verdict; returns the status then."""
        await self._changed.wait()
        return self.status()

    async def wait_status(self, *wanted: str) -> str:
        """Wait until the status is one of ``wanted`` (bound it with trio.fail_after)."""
        while (s := self.status()) not in wanted:
            await self._changed.wait()
        return s

    # ------------------------------------------------------------------ server

    async def serve(self, stream: FramedStream) -> None:
        req: DialBackRequest | None = None
        with trio.move_on_after(10):
            req = await stream.receive_as(DialBackRequest)
        if req is None:
            return
        conn = self.overlay.connection_info(stream)
        if conn is None or conn.relayed:
            await stream.send(DialBackResponse("refused", "", "dial-backs are not asked over relays"))
            return
        observed, local = conn.remote_ip, conn.local_ip
        if not may_vouch(observed, local):
            why = f"cannot judge {ip_class(observed)} {observed}"
            await stream.send(DialBackResponse("refused", "", why))
            return
        if not self.limiter.allow(stream.peer_id, observed, trio.current_time()):
            await stream.send(DialBackResponse("refused", "", "rate limited"))
            return
        targets = dialable_for(observed, req.addrs)
        if not targets:
            await stream.send(DialBackResponse("refused", "", "no TCP address to dial back"))
            return
        self.served += 1
        for addr in targets:
            try:
                with trio.fail_after(self.dial_timeout_s):
                    await self.overlay.dial_fresh(addr, stream.peer_id)
            except (TransportError, trio.TooSlowError) as e:
                log.debug("dial-back %s failed: %s", addr, e, extra={"peer_id": stream.peer_id})
                continue
            await stream.send(DialBackResponse("ok", addr, ""))
            return
        await stream.send(DialBackResponse("dial_error", "", "no address answered"))

    # ------------------------------------------------------------------ client

    async def ask(self, server: str, addrs: tuple[str, ...]) -> DialBackResponse:
        """One dial-back from ``server`` for ``addrs``; TransportError/RemoteError when it fails."""
        stream = await self.overlay.open_stream(server, DIALBACK_PROTOCOL)
        try:
            return await stream.request(
                DialBackRequest(addrs[:8]), DialBackResponse, timeout=self.dial_timeout_s * 3 + 5
            )
        finally:
            await stream.aclose()

    async def probe(self, servers: list[str]) -> str:
        """Ask each server (concurrently) and record the verdicts; returns the status."""
        addrs = self.overlay.dialback_candidates()

        async def one(server: str) -> None:
            try:
                r = await self.ask(server, addrs)
            except (NodeError, RemoteError) as e:
                log.info("dial-back from %s failed: %s", server, e, extra={"peer_id": server})
                return
            if r.status in ("ok", "dial_error"):
                before = self.core.status(trio.current_time())
                now_status = self.core.record(server, r.status == "ok", r.addr, trio.current_time())
                if now_status != before:
                    log.info("reachability: %s (dial-back from %s)", now_status, server)
                self._changed.set()
                self._changed = trio.Event()
            else:
                log.info("dial-back from %s refused: %s", server, r.reason, extra={"peer_id": server})

        async with trio.open_nursery() as n:
            for s in servers:
                n.start_soon(one, s)
        return self.status()
