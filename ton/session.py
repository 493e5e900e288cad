"""Metered sessions, the trio shell: channel cores and meters over MessageStreams.

The payment stream carries, payer -> payee: SessionOpen, SessionPayment*, SessionClose;
payee -> payer: SessionAccept, Receipt*. Tokens themselves travel on the inference stream
(another package): the worker calls :meth:`WorkerSession.produced` before it sends each chunk
(it blocks while the credit window is used up and raises when the payer stops paying); the
client calls :meth:`PayerSession.received` for each chunk it got.

:class:`ChannelShell` runs a channel core: under one lock it applies the core's effects in order,
writing every Persist to the KVStore (fsync, in a worker thread) before anything is sent.
A proxy runs :func:`forward_session` between a client's payment stream and a worker's.

Several sessions may share one channel, each on its own stream, so the payee may see the payer's
cumulative states out of order (state n+1 for session 2 before state n for session 1). The
shell keeps a per-channel *pool*: what newer states added and no session has claimed yet. A
session payment claims its increase from the pool; a late earlier state adds nothing but is
still checked. The payee thus never credits a session with money the channel did not receive.

Payments of several sessions on one channel share signed states: the payer's meters fire their
time rule on a common grid, ``run_receipts`` sends what they decide from a background task (the
token path never waits for a signature or an fsync), and :meth:`ChannelShell.pay_shared` puts
every payment asked for within ``MeterConfig.coalesce_window`` into one state. Each session still
sends its own SessionPayment (with the shared state); the payee checks the state once and each
session claims its part from the pool. The prompt's prepayment and the closing payment never wait.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence

import trio

from overlay.errors import ChannelError, NodeError
from overlay.streams import MessageStream, expect

from .channel import Channel, Persist, Received, Send, Submit
from .keys import KeyPair
from .messages import PayState, Receipt, SessionAccept, SessionClose, SessionOpen, SessionPayment
from .metering import Abort, Forwarder, MeterConfig, MeteringError, PayerMeter, PayFor, Prices, WorkerMeter
from .store import DurableWriter, KVStore

__all__ = [
    "ChannelShell",
    "PayerSession",
    "SessionAborted",
    "WorkerSession",
    "forward_session",
    "forwarder_for",
]

log = logging.getLogger(__name__)
TICK = 0.1  # seconds between meter ticks


class SessionAborted(ChannelError):
    """The metered session ended early (unpaid credit window, inflated receipt, idle stream)."""


class ChannelShell:
    """A channel core plus its store: effects are applied Persist-first, under one lock."""

    def __init__(self, core: Channel, store: KVStore, writer: DurableWriter | None = None) -> None:
        self.core = core
        self.store = store
        self.writer = writer or DurableWriter(store)  # share one per store: grouped commits
        self.lock = trio.Lock()
        self.pool = 0  # nanoTON received on this channel that no session has claimed yet
        self._batch: _Batch | None = None  # payments waiting to share one state

    async def _apply(self, effects: Sequence[object]) -> tuple[list[object], int]:
        out: list[object] = []
        received = 0
        for e in effects:
            if isinstance(e, Persist):
                try:
                    await self.writer.write(e.namespace, e.key, e.blob)
                except BaseException:
                    self._reload(e)  # the write may not have happened: back to what is durable
                    raise
                self.core.persisted(e.update_id)
            elif isinstance(e, Received):
                received += e.amount
            else:
                out.append(e)
        return out, received

    def _reload(self, p: Persist) -> None:
        """Replace the core by its last durable record (a fresh channel when none was written:
        nothing unsent was ever seen by the peer). A store that cannot even be read leaves the
        core frozen: every change is refused (LocalProtocolError) until the node restarts."""
        core = self.core
        try:
            blob = self.store.read(p.namespace, p.key)
        except (NodeError, OSError) as err:
            log.error("cannot reload channel %s: %s", core.key_name, err, extra={"channel_id": core.key_name})
            return
        if blob is not None:
            self.core = Channel.restore(core.params, core.key, blob, policy=core.policy)
        else:
            self.core = Channel(core.params, core.me, core.key, policy=core.policy)

    async def pay(self, amount: int) -> PayState:
        async with self.lock:
            out, _ = await self._apply(self.core.pay(amount))
        (send,) = out
        assert isinstance(send, Send)
        assert isinstance(send.msg, PayState)
        return send.msg

    async def pay_shared(self, amount: int, window: float, slot: _Queued | None = None) -> PayState:
        """Pay ``amount`` in one state with every other payment asked for on this channel within
        ``window`` seconds: one signature and one fsync here, one check at the payee, for all
        of them. ``window`` 0: a state of its own. A caller cancelled before the state is signed
        takes its amount back out; one cancelled after still finds the state in its ``slot``
        (to send it later instead of paying again). Each caller sends its own SessionPayment."""
        if window <= 0:
            st = await self.pay(amount)
            if slot is not None:
                slot.state = st
            return st
        batch = self._batch
        if batch is None or batch.flushed:
            batch = self._batch = _Batch(trio.current_time() + window)
        batch.amount += amount
        if slot is not None:
            batch.slots.append(slot)
        try:
            with trio.move_on_at(batch.deadline):
                await batch.done.wait()
        except BaseException:
            if not batch.flushed:
                batch.amount -= amount
                if slot is not None:
                    batch.slots.remove(slot)
            raise
        if not batch.flushed:  # the window is over and nobody took the batch yet: we pay it
            batch.flushed = True
            try:
                # Shielded: the other sessions' payments ride on it; our own cancellation is
                # delivered right after (a sign and a write, bounded).
                with trio.CancelScope(shield=True):
                    batch.state = await self.pay(batch.amount)
                for s in batch.slots:
                    s.state = batch.state
            except BaseException as e:
                batch.error = e
                raise
            finally:
                batch.done.set()
        await batch.done.wait()
        if batch.state is None:
            raise ChannelError(f"the shared payment state was not signed: {batch.error!r}") from (
                batch.error if isinstance(batch.error, Exception) else None
            )
        return batch.state

    async def receive(self, st: PayState) -> int:
        async with self.lock:
            _, received = await self._apply(self.core.receive_state(st))
        return received

    async def receive_payment(self, st: PayState) -> int:
        """A state that pays for a session: a newer one adds its increase to the pool, an
        earlier one that arrived late adds nothing (checked all the same). Returns the increase."""
        async with self.lock:
            core = self.core
            if core.r.peer_sig and st.seqno < core.r.peer_seqno:
                core.check_old_state(st)
                return 0
            _, received = await self._apply(core.receive_state(st))
            self.pool += received
        return received

    def claim(self, amount: int) -> None:
        """Credit ``amount`` of the pool to a session; MeteringError when the pool is short."""
        if amount < 0 or amount > self.pool:
            raise MeteringError(f"a session claims {amount} nanoTON, the channel holds {self.pool} unclaimed")
        self.pool -= amount

    async def run(self, effects_fn: Callable[[], Sequence[object]]) -> list[object]:
        """Run a core call (e.g. ``lambda: core.propose(close=True)``) and apply its effects."""
        async with self.lock:
            out, _ = await self._apply(effects_fn())
        return out

    async def submit_body(self, effects: list[object]) -> list[Submit]:
        return [e for e in effects if isinstance(e, Submit)]


class _Batch:
    """Payments on one channel that will share one signed state."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.amount = 0
        self.flushed = False  # taken by the caller that signs it: no one joins or leaves
        self.done = trio.Event()
        self.state: PayState | None = None
        self.error: BaseException | None = None
        self.slots: list[_Queued] = []


class _Queued:
    """A payment the meter decided on; its state once signed (so a retry resends, never re-pays)."""

    def __init__(self, pay: PayFor) -> None:
        self.pay = pay
        self.state: PayState | None = None


class PayerSession:
    """The client (or proxy) side of one metered session."""

    def __init__(
        self,
        stream: MessageStream,
        channel: ChannelShell,
        open_msg: SessionOpen,
        worker_key: bytes,
        cfg: MeterConfig | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.stream = stream
        self.channel = channel
        self.open_msg = open_msg
        self.clock = clock
        self.cfg = cfg or MeterConfig()
        prices = Prices(open_msg.price_prompt, open_msg.price_completion)
        self.meter = PayerMeter(
            open_msg.session_id, prices, open_msg.prompt_tokens, worker_key, self.cfg, clock()
        )
        self.receipts: list[Receipt] = []
        self.aborted: str = ""
        self._pay_lock = trio.Lock()  # payments go out in the order the meter decided them
        self._queue: deque[_Queued] = deque()
        self._sender_wake: trio.Event | None = None  # set while run_receipts pays in the background

    async def start(self) -> SessionAccept:
        await self.stream.send(self.open_msg)
        msg = await self.stream.receive()
        accept = expect(SessionAccept, msg)
        await self._submit([self.meter.open()], window=0.0)  # the prompt gates prefill: no wait
        return accept

    async def _submit(self, effects: Sequence[PayFor | Abort], *, window: float | None = None) -> None:
        """Queue the meter's decisions in order; pay them here, or wake the background sender."""
        for e in effects:
            if isinstance(e, Abort):
                self.aborted = e.reason
                raise SessionAborted(e.reason)
            if e.amount > 0:
                self._queue.append(_Queued(e))
        if self._sender_wake is not None and window is None:
            self._sender_wake.set()
        else:
            await self._pay_queued(0.0 if window is None else window)  # inline: never hold tokens

    async def _pay_queued(self, window: float) -> None:
        async with self._pay_lock:
            while self._queue:
                q = self._queue[0]
                if q.state is None:  # a retry after a cancellation resends, never pays twice
                    await self.channel.pay_shared(q.pay.amount, window, q)
                assert q.state is not None
                sid = self.open_msg.session_id
                await self.stream.send(SessionPayment(sid, q.pay.tokens, q.pay.total, q.state))
                self._queue.popleft()

    async def received(self, token_ids: list[int]) -> None:
        """Call for each chunk of tokens that arrived. Payments the meter decides on go out from
        ``run_receipts``'s sender when it runs (the token path never waits for a signature or
        an fsync), else here."""
        effects = self.meter.on_tokens(token_ids, self.clock())
        if effects:
            await self._submit(effects)

    async def run_receipts(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read receipts until the stream ends; tick the meter and send payments meanwhile."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._sender)
            nursery.start_soon(self._ticker)
            task_status.started()
            while True:
                msg = await self.stream.receive()
                if msg is None:
                    break
                r = expect(Receipt, msg)
                effects = self.meter.on_receipt(r)
                if effects:
                    await self._submit(effects)
                self.receipts.append(r)
                if r.final:
                    break
            nursery.cancel_scope.cancel()

    async def _sender(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        wake = self._sender_wake = trio.Event()
        task_status.started()
        try:
            while True:
                await wake.wait()
                wake = self._sender_wake = trio.Event()
                await self._pay_queued(self.cfg.coalesce_window)
        finally:
            self._sender_wake = None

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(max(TICK, self.meter.next_deadline() - self.clock()))
            effects = self.meter.tick(self.clock())
            if effects:
                await self._submit(effects)

    async def close(self) -> None:
        """Pay for every token received (what is queued first), then end the session."""
        effects = self.meter.close(self.clock())
        await self._submit(effects, window=0.0)
        await self.stream.send(SessionClose(self.open_msg.session_id, "done"))


class WorkerSession:
    """The worker side of one metered session."""

    def __init__(
        self,
        stream: MessageStream,
        channel: ChannelShell,
        key: KeyPair,
        cfg: MeterConfig | None = None,
        clock: Callable[[], float] = trio.current_time,
        *,
        forwarded: bool = False,
    ) -> None:
        self.stream = stream
        self.channel = channel
        self.key = key
        self.cfg = cfg or MeterConfig()
        self.clock = clock
        self.forwarded = forwarded
        self.meter: WorkerMeter | None = None
        self._paid = trio.Event()
        self.closed = trio.Event()

    async def accept(self, open_msg: SessionOpen | None = None) -> SessionOpen:
        """Answer the payer's SessionOpen (read from the stream unless already read)."""
        msg = open_msg if open_msg is not None else expect(SessionOpen, await self.stream.receive())
        prices = Prices(msg.price_prompt, msg.price_completion)
        self.meter = WorkerMeter(msg.session_id, prices, msg.prompt_tokens, self.key, self.cfg, self.clock())
        await self.stream.send(SessionAccept(msg.session_id, self.cfg.receipt_every, self.cfg.credit_window))
        return msg

    async def run_payments(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read payments until the payer closes the session."""
        assert self.meter is not None
        task_status.started()
        while True:
            msg = await self.stream.receive()
            if msg is None or isinstance(msg, SessionClose):
                break
            p = expect(SessionPayment, msg)
            due = self.meter.check_payment(p)
            await self.channel.receive_payment(p.state)
            self.channel.claim(due)
            self.meter.on_payment(p, due, self.clock())
            self._paid.set()
            self._paid = trio.Event()
        self.closed.set()

    async def produced(self, token_ids: list[int]) -> None:
        """Call before streaming ``token_ids``: waits while the credit window is used up."""
        m = self.meter
        assert m is not None
        while m.may_send() < len(token_ids):
            if m.aborted:
                raise SessionAborted(m.aborted)
            if m.paused_since is None:
                m.paused_since = self.clock()
            wait = m.paused_since + self.cfg.pause_timeout - self.clock()
            with trio.move_on_after(max(0.0, min(wait, TICK))):
                await self._paid.wait()
            for a in m.tick(self.clock()):
                raise SessionAborted(a.reason)
        for r in m.on_generated(token_ids, self.clock()):
            await self.stream.send(r.receipt)

    async def finish(self) -> None:
        assert self.meter is not None
        await self.stream.send(self.meter.finish().receipt)


def forwarder_for(open_msg: SessionOpen, worker_prices: Prices) -> Forwarder:
    """The Forwarder of a hub session: the client's prices from its SessionOpen, the worker's."""
    client_prices = Prices(open_msg.price_prompt, open_msg.price_completion)
    return Forwarder(client_prices, worker_prices, open_msg.prompt_tokens)


async def forward_session(
    client_stream: MessageStream,
    worker_stream: MessageStream,
    client_channel: ChannelShell,
    worker_channel: ChannelShell,
    worker_prices: Prices,
    *,
    open_msg: SessionOpen | None = None,
    window: float = 0.0,
    fwd: Forwarder | None = None,
) -> Forwarder:
    """A proxy's half of a hub session: relays open/accept/receipts, forwards payments minus fee.
    ``open_msg``: the client's SessionOpen when the caller already read it. ``window``: forwarded
    payments (all but the prompt's) share states with other sessions to the same worker
    (:meth:`ChannelShell.pay_shared`). ``fwd``: the session's Forwarder (see
    :func:`forwarder_for`), for a caller that must read what was forwarded even when the
    session fails mid-way."""
    if open_msg is None:
        open_msg = expect(SessionOpen, await client_stream.receive())
    if fwd is None:
        fwd = forwarder_for(open_msg, worker_prices)
    to_worker = SessionOpen(
        open_msg.session_id, open_msg.offer_id, worker_channel.core.cid,
        worker_prices.prompt, worker_prices.completion, open_msg.prompt_tokens, open_msg.max_tokens,
    )  # fmt: skip
    await worker_stream.send(to_worker)
    await client_stream.send(expect(SessionAccept, await worker_stream.receive()))

    async def receipts() -> None:
        while True:
            msg = await worker_stream.receive()
            if msg is None:
                return
            r = expect(Receipt, msg)
            await client_stream.send(r)
            if r.final:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receipts)
        while True:
            msg = await client_stream.receive()
            if msg is None or isinstance(msg, SessionClose):
                await worker_stream.send(SessionClose(open_msg.session_id, "client closed"))
                break
            p = expect(SessionPayment, msg)
            due = fwd.check_client_payment(p)
            await client_channel.receive_payment(p.state)
            client_channel.claim(due)
            out = fwd.on_client_payment(p, due)
            if out.amount > 0:
                st = await worker_channel.pay_shared(out.amount, window if out.tokens else 0.0)
                await worker_stream.send(SessionPayment(open_msg.session_id, out.tokens, out.total, st))
    return fwd
