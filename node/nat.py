"""The roles' side of NAT: which addresses a worker's offers carry, and whom a proxy relays for.

A worker's offers must name addresses a client can dial:

- reachable (dial-backs got through): its own addresses;
- behind NAT: ``/p2p-circuit`` addresses through its attached proxies, where
  it holds reservations (:class:`~overlay.reserve.ReservationKeeper`), moving
  with the proxy election (the attached set is the directory's
  ``handover_proxies``, so the next epoch's proxies get reservations before
  their epoch begins);
- not known yet: its own addresses and any circuit addresses, once the status
  has stayed unknown for ``unknown_grace_s`` (before that, nothing is published).

A proxy (or the bootstrap fallback) relays only for workers it serves: the
peer heartbeats to it or has a live offer in its book, and, once proxies are
elected, the proxy is one of the peer's attached proxies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from market.directory import Directory
from market.service import ProxyService, WorkerService
from overlay.host import Overlay
from overlay.reserve import RelayRef, ReservationKeeper

__all__ = ["WorkerAddresses", "relay_policy"]

log = logging.getLogger(__name__)


class WorkerAddresses:
    """Keeps a worker's offer addresses right (see the module docstring)."""

    def __init__(self, overlay: Overlay, directory: Directory, *, unknown_grace_s: float = 15.0) -> None:
        self.overlay = overlay
        self.directory = directory
        self.unknown_grace_s = unknown_grace_s
        self.keeper = ReservationKeeper(overlay.nat.client, self._relays)
        self._started = trio.current_time()

    def _relays(self) -> list[RelayRef]:
        if self.overlay.nat.status() == "public":
            return []
        refs = self.directory.handover_proxies(self.overlay.peer_id)
        return [RelayRef(p.peer_id, p.addrs) for p in refs if p.peer_id != self.overlay.peer_id]

    def addrs(self) -> tuple[str, ...]:
        status = self.overlay.nat.status()
        own = tuple(self.overlay.advertised_addrs()) if self.overlay.settings.listen else ()
        circuits = self.keeper.circuit_addrs()
        if status == "public":
            chosen = own
        elif status == "private":
            chosen = circuits
        else:
            chosen = own + circuits
        return chosen[:8]

    def ready(self) -> bool:
        """Whether an offer may be published (it names an address a client can use)."""
        status = self.overlay.nat.status()
        if status == "public":
            return True
        if status == "private":
            return bool(self.keeper.circuit_addrs())
        return trio.current_time() - self._started >= self.unknown_grace_s

    async def run(
        self, market: WorkerService, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow reachability, reservations and the election; tell ``market`` when the addresses move."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.keeper.run)
            market.set_addrs(self.addrs())
            task_status.started()
            last_status = self.overlay.nat.status()
            while True:
                with trio.move_on_after(2.0):
                    async with trio.open_nursery() as wait:

                        async def relays_moved() -> None:
                            await self.keeper.wait_changed()
                            wait.cancel_scope.cancel()

                        async def election_moved() -> None:
                            await self.directory.changed.wait()
                            wait.cancel_scope.cancel()

                        async def verdict() -> None:
                            await self.overlay.nat.reach.wait_changed()
                            wait.cancel_scope.cancel()

                        wait.start_soon(relays_moved)
                        wait.start_soon(election_moved)
                        wait.start_soon(verdict)
                status = self.overlay.nat.status()
                if status != last_status:
                    log.info("reachability now %s: offers follow", status)
                    last_status = status
                self.keeper.nudge()
                new = self.addrs()
                if new != market.publisher.profile.addrs:
                    log.info("offer addresses: %s", ", ".join(new) or "-")
                    market.set_addrs(new)
                else:
                    market.nudge()


def relay_policy(
    overlay: Overlay, directory: Directory, service: Callable[[], ProxyService | None]
) -> Callable[[str], bool]:
    """Whether this proxy relays for ``peer`` (see the module docstring)."""

    def allowed(peer: str) -> bool:
        svc = service()
        if svc is None:
            return False
        book = svc.core.book
        if book.load_of(peer) is None and book.get(peer) is None:
            return False
        if not directory.elected():
            return True  # before an election the bootstrap fallback serves every worker
        return overlay.peer_id in {p.peer_id for p in directory.handover_proxies(peer)}

    return allowed
