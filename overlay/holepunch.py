"""Hole punching (DCUtR) and what happens around relayed connections.

We use py-libp2p 0.8.1's ``DCUtRProtocol`` for the exchange itself (CONNECT
with observed addresses, SYNC after RTT/2, TCP simultaneous open from the
listen port over ``SO_REUSEPORT`` sockets, the spec's role assignment) and
change two things:

- it polls every connection every 2 s to start punches on its own; we start a
  punch where we know one is wanted (right after a relayed dial), so its
  ``_auto_drive_loop`` does nothing here;
- after a direct connection appears it closes the relayed one after 60 s
  whatever it carries, which would cut a long generation short; we close the
  relay leg once it carries no stream (new streams already prefer the direct
  connection: py-libp2p picks direct over relayed).

:func:`install_relayed_filter` makes a node serve only
:data:`~overlay.relay.RELAYED_PROTOCOLS` on relayed connections (gossip, the DHT
and everything else are refused there), so a relay carries what a worker needs
and nothing else.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .relay import RELAYED_PROTOCOLS, is_relayed_conn

if TYPE_CHECKING:
    from .host import Overlay

__all__ = ["HolePuncher", "PunchStats", "install_relayed_filter"]

log = logging.getLogger(__name__)


def install_relayed_filter(host: Any, allowed: frozenset[str] = RELAYED_PROTOCOLS) -> None:
    """Refuse inbound streams of other protocols on relayed connections (see the module docstring)."""
    ms = host.multiselect
    original = ms.negotiate

    async def negotiate(communicator: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        protocol, handler = await original(communicator, *args, **kwargs)
        stream = getattr(communicator, "read_writer", None)
        if handler is not None and protocol not in allowed and is_relayed_conn(stream):
            log.debug("refusing %s over a relayed connection", protocol)
            return protocol, None  # the host resets the stream
        return protocol, handler

    ms.negotiate = negotiate


@attrs.frozen
class PunchStats:
    attempts: int
    direct: int  # punches that ended with a direct connection
    failed: int
    relay_legs_closed: int


class HolePuncher:
    """Starts DCUtR punches and retires relay legs (see the module docstring)."""

    def __init__(self, overlay: Overlay, *, enabled: bool = True, dial_timeout_s: int = 5) -> None:
        self.overlay = overlay
        self.enabled = enabled
        self.dial_timeout_s = dial_timeout_s
        self._dcutr: Any = None
        self._nursery: trio.Nursery | None = None
        self._running: set[str] = set()
        self._done = trio.Event()
        self.attempts = 0
        self.direct = 0
        self.failed = 0
        self.legs_closed = 0

    def make_service(self) -> Any:
        """The DCUtR service to run for the host (None when punching is off)."""
        if not self.enabled:
            return None
        from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

        puncher = self

        class _DCUtR(DCUtRProtocol):
            async def _auto_drive_loop(self) -> None:
                await trio.sleep_forever()

            def _schedule_relay_close(self, peer_id: Any) -> None:
                puncher.retire_relay_legs(str(peer_id))

        self._dcutr = _DCUtR(
            self.overlay.libp2p_host, read_timeout=10, write_timeout=10, dial_timeout=self.dial_timeout_s
        )
        return self._dcutr

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def statistics(self) -> PunchStats:
        return PunchStats(self.attempts, self.direct, self.failed, self.legs_closed)

    def has_direct(self, peer: str) -> bool:
        return any(not is_relayed_conn(c) for c in self.overlay.connections_of(peer))

    def punch_soon(self, peer: str) -> None:
        """Start a punch toward ``peer`` in the background (once at a time per peer)."""
        if self._dcutr is None or self._nursery is None or peer in self._running:
            return
        self._running.add(peer)
        self._nursery.start_soon(self._punch, peer)

    async def punch(self, peer: str) -> bool:
        """One punch toward ``peer``; True when a direct connection exists afterwards."""
        if self._dcutr is None:
            return False
        from libp2p.peer.id import ID

        self.attempts += 1
        try:
            ok = bool(await self._dcutr.initiate_hole_punch(ID.from_base58(peer)))
        except Exception as e:  # the library's own errors: a failed punch, never a crash
            log.info("hole punch toward %s failed: %s", peer, e, extra={"peer_id": peer})
            ok = False
        ok = ok and self.has_direct(peer)
        if ok:
            self.direct += 1
            log.info("hole punch toward %s: direct connection", peer, extra={"peer_id": peer})
            self.retire_relay_legs(peer)
        else:
            self.failed += 1
            log.info("hole punch toward %s failed; staying relayed", peer, extra={"peer_id": peer})
        self._done.set()
        self._done = trio.Event()
        return ok

    async def _punch(self, peer: str) -> None:
        try:
            await self.punch(peer)
        finally:
            self._running.discard(peer)

    async def wait_punched(self, n: int = 1) -> PunchStats:
        """Wait until ``n`` punches ended, either way (bound it with trio.fail_after)."""
        while self.direct + self.failed < n:
            await self._done.wait()
        return self.statistics()

    def retire_relay_legs(self, peer: str) -> None:
        """Close ``peer``'s relayed connections once they carry no stream (direct exists)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._retire, peer)

    async def _retire(self, peer: str) -> None:
        with trio.move_on_after(3600):  # a relay leg outliving an hour-long stream is closed by the relay
            while self.has_direct(peer):
                legs = [c for c in self.overlay.connections_of(peer) if is_relayed_conn(c)]
                if not legs:
                    return
                idle = [c for c in legs if not c.get_streams()]
                for c in idle:
                    log.info("closing the relay leg to %s (direct now)", peer, extra={"peer_id": peer})
                    with trio.move_on_after(5):
                        try:
                            await c.close()
                        except Exception as e:
                            log.debug("closing relay leg: %s", e)
                    self.legs_closed += 1
                if len(idle) == len(legs):
                    return
                await self.overlay.wait_stream_change()
