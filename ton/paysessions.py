"""Metered sessions through the payment manager: what the node calls around one generation.

- :func:`pay_session` (client, or a proxy paying a worker directly): an async context manager
  that finds or opens the channel, opens the payment stream, prepays the prompt and yields the
  :class:`~ton.session.PayerSession`; the node calls ``await ps.received(token_ids)`` for each
  chunk that arrived. On exit it pays for everything received and waits for the final receipt.
- :func:`serve_session` (worker): waits for the payer's ``SessionOpen`` with the request's
  session id (it arrives on ``/cocoon/pay/1``), checks its prices, answers, and yields the
  :class:`~ton.session.WorkerSession`; the node calls ``await ws.produced(token_ids)`` before
  it streams each chunk (blocks at the credit window, raises SessionAborted when unpaid). On exit
  it signs the final receipt and waits (bounded) for the payer's last payment.
- a proxy sets a :data:`Router` (``pm.set_router``): every SessionOpen on a channel it is paid on
  is then forwarded to the worker the router names, on the proxy's own channel to that worker,
  at the worker's prices (:func:`~ton.session.forward_session`); a router returning None refuses
  the session at once (error code ``metering``). Without a router, sessions wait for
  :func:`serve_session` to claim them (for ``claim_timeout`` seconds).

:class:`SessionBoard` is where SessionOpens that arrive on the protocol meet the generation
that claims them (either may come first). A session id is accepted once per process.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import attrs
import trio

from overlay import wire
from overlay.errors import ChannelError, NodeError, RemoteError, RemoteProtocolError, TimeoutError_
from overlay.streams import MessageStream

from . import contract as C
from .channel import Phase
from .keys import KeyPair
from .messages import SessionOpen
from .metering import MeteringError, Prices
from .opening import (
    PROTOCOL,
    ChannelClosed,
    ChannelMismatch,
    DuplicateSession,
    UnknownChannel,
    error_code,
    error_from_remote,
)
from .session import PayerSession, SessionAborted, WorkerSession, forward_session, forwarder_for

if TYPE_CHECKING:
    from .manager import ManagedChannel, PaymentManager

__all__ = ["Route", "Router", "SessionBoard", "pay_session", "serve_session"]

log = logging.getLogger(__name__)


@attrs.frozen
class Route:
    """Where a proxy forwards a session: the worker's peer id and the worker's prices."""

    worker_peer: str
    prices: Prices


Router = Callable[[SessionOpen, str], Awaitable[Route | None]]


@contextmanager
def _single_errors() -> Iterator[None]:
    """Re-raise a lone error out of a nursery's exception group as itself (typed errors stay typed)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []

        def walk(g: BaseExceptionGroup[BaseException]) -> None:
            for e in g.exceptions:
                if isinstance(e, BaseExceptionGroup):
                    walk(e)
                else:
                    leaves.append(e)

        walk(group)
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from group
        raise


@attrs.define(eq=False)
class _Incoming:
    open: SessionOpen
    stream: MessageStream
    entry: ManagedChannel
    claimed: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)


class SessionBoard:
    """SessionOpens waiting for the generation that claims them; forwarding for proxies."""

    def __init__(self, pm: PaymentManager) -> None:
        self.pm = pm
        self.incoming: dict[bytes, _Incoming] = {}
        self.router: Router | None = None
        self.forward_fees = 0  # nanoTON kept as a proxy
        self._seen: set[bytes] = set()
        self._order: deque[bytes] = deque()
        self._changed = trio.Event()

    def _remember(self, session_id: bytes) -> None:
        if session_id in self._seen:
            raise DuplicateSession("this session id was used before")
        self._seen.add(session_id)
        self._order.append(session_id)
        if len(self._order) > 65536:
            self._seen.discard(self._order.popleft())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve_open(self, stream: MessageStream, msg: SessionOpen) -> None:
        """A payer opened a session on a channel it pays us on (called by the stream handler)."""
        pm = self.pm
        entry = pm._entry_for(msg.channel_id, stream.peer_id)
        if entry.meta.me != C.PARTY_B:
            raise UnknownChannel("sessions are paid by the channel's payer")
        if entry.meta.status == "proposed":  # the payer never confirmed: check the chain now
            async with entry.op_lock:
                await pm._sync(entry)
        if entry.meta.status != "open" or entry.core.phase is not Phase.OPEN:
            raise ChannelClosed(f"the channel is {entry.meta.status}")
        if len(msg.session_id) < 16 or msg.prompt_tokens < 0 or msg.max_tokens < 0:
            raise RemoteProtocolError("malformed SessionOpen")
        self._remember(msg.session_id)
        entry.core.note_activity(pm.clock())
        if self.router is not None:
            route = await self.router(msg, stream.peer_id)
            if route is None:
                raise MeteringError("no route for this session (offer unknown, or prices too low)")
            await self._forward(stream, msg, entry, route)
            return
        slot = _Incoming(msg, stream, entry)
        self.incoming[msg.session_id] = slot
        self._notify()
        try:
            with trio.move_on_after(pm.cfg.claim_timeout):
                await slot.claimed.wait()
            if not slot.claimed.is_set():
                raise ChannelError("no generation is waiting for this session")
            await slot.done.wait()
        finally:
            del self.incoming[msg.session_id]

    async def claim(self, session_id: bytes, timeout: float) -> _Incoming:
        with trio.move_on_after(timeout):
            while True:
                slot = self.incoming.get(session_id)
                if slot is not None and not slot.claimed.is_set():
                    slot.claimed.set()
                    return slot
                await self._changed.wait()
        raise SessionAborted(f"the payer did not open payment session {session_id.hex()[:16]} in {timeout} s")

    async def _forward(
        self, client: MessageStream, msg: SessionOpen, entry: ManagedChannel, route: Route
    ) -> None:
        pm = self.pm
        need = route.prices.cost(msg.prompt_tokens, msg.max_tokens)
        worker_entry = await pm.channel_to(route.worker_peer, min_available=need)
        worker_entry.core.note_activity(pm.clock())
        worker = await pm.host.open_stream(route.worker_peer, PROTOCOL)
        fwd = forwarder_for(msg, route.prices)
        ok = False
        try:
            with _single_errors():
                await forward_session(
                    client,
                    worker,
                    entry.shell,
                    worker_entry.shell,
                    route.prices,
                    open_msg=msg,
                    window=pm.cfg.meter.coalesce_window,
                    fwd=fwd,
                )
            ok = True
        except RemoteError as e:
            raise error_from_remote(e) from e
        finally:
            await worker.aclose()
            # What the client paid and the worker got before a failure is kept as well.
            self.forward_fees += fwd.fee
            pm.counters["sessions_forwarded" if ok else "forwards_failed"] += 1
            pm._notify()


@asynccontextmanager
async def pay_session(
    pm: PaymentManager,
    peer_id: str,
    *,
    session_id: bytes,
    offer_id: bytes,
    prices: Prices,
    prompt_tokens: int,
    max_tokens: int,
    worker_key: bytes,
) -> AsyncIterator[PayerSession]:
    """Pay ``peer_id`` (the worker, or the proxy in hub mode) for one generation."""
    entry = await pm.channel_to(peer_id, min_available=prices.cost(prompt_tokens, max_tokens))
    entry.core.note_activity(pm.clock())
    open_msg = SessionOpen(
        session_id, offer_id, entry.cid, prices.prompt, prices.completion, prompt_tokens, max_tokens
    )
    stream = await pm.host.open_stream(peer_id, PROTOCOL)
    ps = PayerSession(stream, entry.shell, open_msg, worker_key, pm.cfg.meter)
    try:
        with trio.move_on_after(pm.cfg.request_timeout) as scope:
            try:
                await ps.start()
            except RemoteError as e:
                err = error_from_remote(e)
                if isinstance(err, UnknownChannel | ChannelClosed | ChannelMismatch):
                    pm.retire(entry, str(err))  # the next session opens a fresh channel
                raise err from e
        if scope.cancelled_caught:
            raise TimeoutError_(f"{peer_id} did not accept the payment session")
        done = trio.Event()

        async def receipts() -> None:
            await ps.run_receipts()
            done.set()

        try:
            with _single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receipts)
                    yield ps
                    await ps.close()
                    with trio.move_on_after(pm.cfg.meter.idle_timeout):
                        await done.wait()
                    nursery.cancel_scope.cancel()
        except Exception:
            if not ps.aborted:  # the generation failed on our side: still pay what arrived
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await ps.close()
                    except NodeError as e:
                        log.info("could not pay the tail of session %s: %s", session_id.hex()[:16], e)
            raise
        pm.counters["sessions_paid"] += 1
    finally:
        await stream.aclose()


@asynccontextmanager
async def serve_session(
    pm: PaymentManager,
    session_id: bytes,
    *,
    min_prices: Prices | None = None,
    payer: str | None = None,
    timeout: float | None = None,
    receipt_key: KeyPair | None = None,
) -> AsyncIterator[WorkerSession]:
    """Be paid for one generation: waits for the payer's session, yields the metering shell."""
    slot = await pm.board.claim(session_id, pm.cfg.claim_timeout if timeout is None else timeout)
    try:
        o = slot.open
        problem = ""
        if payer is not None and slot.stream.peer_id != payer:
            problem = "the session is paid by another peer than the one that asked"
        elif min_prices is not None and (
            o.price_prompt < min_prices.prompt or o.price_completion < min_prices.completion
        ):
            problem = "the session's prices are below the offer's"
        if problem:
            err = MeteringError(problem)
            with trio.move_on_after(2):
                try:
                    await slot.stream.send(wire.ErrorFrame(error_code(err), problem))
                except NodeError:
                    pass
            raise err
        ws = WorkerSession(slot.stream, slot.entry.shell, receipt_key or pm.key, pm.cfg.meter)
        await ws.accept(o)
        with _single_errors():
            async with trio.open_nursery() as nursery:
                await nursery.start(ws.run_payments)
                yield ws
                await ws.finish()
                with trio.move_on_after(pm.cfg.meter.pause_timeout):
                    await ws.closed.wait()
                nursery.cancel_scope.cancel()
        pm.counters["sessions_served"] += 1
    finally:
        slot.done.set()
