"""Keeping reservations on relays (the side behind NAT): which relays, and when to reserve again.

Theory of operation.  A node behind NAT (a worker) keeps one reservation on
each relay it is told to use (its attached proxies, which change with the
proxy election).  :class:`KeeperCore` (pure) decides, given the wanted set and
the outcome of each attempt:

- a new relay is reserved at once; a held reservation is renewed when
  ``renew_fraction`` of its lifetime has passed (never later than
  ``renew_margin_s`` before it expires);
- a refused or failed attempt is retried after a delay that doubles from
  ``retry_s`` up to ``max_retry_s`` (a relay that refuses because it does not
  know us yet usually accepts once our first heartbeat arrived);
- a relay that leaves the wanted set is dropped at once: we stop accepting
  circuits from it and let the reservation lapse there.

:class:`ReservationKeeper` is the trio shell: it runs the attempts through a
:class:`~overlay.relay.RelayClient` and wakes whoever publishes our addresses
when the set of circuit addresses changes.  Times are Unix seconds, because a
relay states a reservation's expiry as one (circuit relay v2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import attrs
import trio

from .errors import NodeError
from .relay import RelayClient

__all__ = ["KeeperCore", "RelayRef", "ReservationKeeper"]

log = logging.getLogger(__name__)


@attrs.frozen
class RelayRef:
    peer_id: str
    addrs: tuple[str, ...]  # transport multiaddrs without /p2p/


@attrs.define
class _Slot:
    next_at: float  # when to (re)reserve
    expires: float = 0.0  # 0: no reservation held
    delay: float = 0.0  # current retry delay (0 after a success)
    last_error: str = ""


class KeeperCore:
    """When to reserve on which relay (see the module docstring)."""

    def __init__(
        self,
        *,
        renew_fraction: float = 0.5,
        renew_margin_s: float = 30.0,
        retry_s: float = 2.0,
        max_retry_s: float = 300.0,
    ) -> None:
        self.renew_fraction = renew_fraction
        self.renew_margin_s = renew_margin_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._slots: dict[str, _Slot] = {}

    def want(self, relays: Iterable[str], now: float) -> list[str]:
        """Set the wanted relays; returns those dropped."""
        wanted = list(dict.fromkeys(relays))
        dropped = [r for r in self._slots if r not in wanted]
        for r in dropped:
            del self._slots[r]
        for r in wanted:
            self._slots.setdefault(r, _Slot(next_at=now))
        return dropped

    def due(self, now: float) -> list[str]:
        return [r for r, s in self._slots.items() if s.next_at <= now]

    def reserved(self, relay: str, expires: float, now: float) -> None:
        s = self._slots.get(relay)
        if s is None:
            return
        life = max(expires - now, 0.0)
        s.expires = expires
        s.delay = 0.0
        s.last_error = ""
        s.next_at = now + min(life * self.renew_fraction, max(life - self.renew_margin_s, 0.0))

    def failed(self, relay: str, error: str, now: float) -> float:
        """An attempt failed; returns the delay before the next one."""
        s = self._slots.get(relay)
        if s is None:
            return 0.0
        s.delay = min(self.max_retry_s, s.delay * 2 if s.delay else self.retry_s)
        s.last_error = error
        s.next_at = now + s.delay
        if s.expires <= now:
            s.expires = 0.0
        return s.delay

    def held(self, now: float) -> list[str]:
        """Relays on which a reservation is live now."""
        return [r for r, s in self._slots.items() if s.expires > now]

    def next_wake(self) -> float | None:
        return min((s.next_at for s in self._slots.values()), default=None)

    def errors(self) -> dict[str, str]:
        return {r: s.last_error for r, s in self._slots.items() if s.last_error}


class ReservationKeeper:
    """Holds reservations on ``relays()`` (see the module docstring)."""

    def __init__(
        self,
        client: RelayClient,
        relays: Callable[[], list[RelayRef]],
        *,
        core: KeeperCore | None = None,
        wall: Callable[[], float] = time.time,
        max_sleep_s: float = 5.0,
    ) -> None:
        self.client = client
        self.relays = relays
        self.core = core or KeeperCore()
        self.wall = wall
        self.max_sleep_s = max_sleep_s  # how often the wanted set is looked at again
        self.enabled = True
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._addrs: tuple[str, ...] = ()

    def circuit_addrs(self) -> tuple[str, ...]:
        return self._addrs

    def nudge(self) -> None:
        """Look at the wanted relays now (the election or our reachability changed)."""
        self._wake.set()

    async def wait_changed(self) -> tuple[str, ...]:
        """Wait until our circuit addresses change; returns them."""
        await self._changed.wait()
        return self._addrs

    async def wait_addrs(self, n: int = 1) -> tuple[str, ...]:
        """Wait until we hold at least ``n`` circuit addresses (bound it with trio.fail_after)."""
        while len(self._addrs) < n:
            await self._changed.wait()
        return self._addrs

    def _publish(self) -> None:
        addrs = self.client.circuit_addrs()
        if addrs != self._addrs:
            self._addrs = addrs
            self._changed.set()
            self._changed = trio.Event()

    async def _attempt(self, ref: RelayRef) -> None:
        try:
            r = await self.client.reserve(ref.peer_id, ref.addrs)
        except NodeError as e:
            delay = self.core.failed(ref.peer_id, str(e), self.wall())
            log.info(
                "reservation on relay %s failed (%s); again in %.0f s", ref.peer_id, e, delay,
                extra={"peer_id": ref.peer_id},
            )  # fmt: skip
            return
        self.core.reserved(ref.peer_id, r.expires_unix, self.wall())
        log.info(
            "reserved on relay %s for %.0f s", ref.peer_id, r.expires_unix - self.wall(),
            extra={"peer_id": ref.peer_id},
        )  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            wanted = {r.peer_id: r for r in self.relays()} if self.enabled else {}
            for gone in self.core.want(wanted, self.wall()):
                self.client.drop(gone)
                log.info("dropped the reservation on relay %s", gone, extra={"peer_id": gone})
            due = [wanted[r] for r in self.core.due(self.wall()) if r in wanted]
            if due:
                async with trio.open_nursery() as n:
                    for ref in due:
                        n.start_soon(self._attempt, ref)
            held = self.core.held(self.wall())
            for r in list(self.client.reservations):
                if r not in held:
                    self.client.drop(r)
            self._publish()
            nxt = self.core.next_wake()
            sleep = self.max_sleep_s if nxt is None else min(self.max_sleep_s, max(nxt - self.wall(), 0.05))
            with trio.move_on_after(sleep):
                await self._wake.wait()
            self._wake = trio.Event()
