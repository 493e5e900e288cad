"""The payment manager, one per node: channels per counterparty, opened over the wire,
persisted, settled and watched (the trio shell over the channel cores).

Protocol ``/cocoon/pay/1``; the first message of a stream says what it is for::

    OpenChannel     payer -> payee   open a channel (ton.opening draws the conversation)
    ChannelCheck    either way       "read the channel on chain now" -> ChannelChecked
    CommitProposal  either way       co-sign a commit or close -> CommitSignature,
                                     then ChannelCheck once it landed
    SessionOpen     payer -> payee   a metered session (ton.session): handed to the node's
                                     generation through serve_session(), or forwarded by a proxy

A refusal is an ``ErrorFrame(code, message)`` (codes: ``ton.opening.error_code``); the requester
raises the matching typed error. Garbage resets the stream and changes nothing.

Storage (a :class:`~ton.store.ListableKVStore`, SQLite in the data dir): namespace ``channel``
holds each core's record (written before anything is sent), ``channel_meta`` the parameters, the
peer and the status (proposed | deploying | open | closing | disputed | closed | failed).

The driver (:meth:`PaymentManager.run`) ticks every core's settlement policy every
``tick_interval`` seconds and runs propose -> co-sign -> submit with the counterparty when it says
Settle; every ``watch_interval`` seconds (at most a quarter of a quarantine) it reads every
channel on chain (the :class:`~ton.watcher.Watcher`: challenge, finish, adopt commits).

Session helpers and statistics live in :mod:`ton.paysessions` and :mod:`ton.paystats`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import attrs
import trio

from overlay import wire
from overlay.errors import (
    ChainError,
    ChannelError,
    CorruptStore,
    DecodeError,
    NodeError,
    RemoteError,
    RemoteProtocolError,
    StreamBroken,
    TimeoutError_,
)
from overlay.streams import FramedStream, MessageStream, expect

from . import contract as C
from . import settlement
from .chain import ChainClient, normalize_address
from .channel import Channel, Phase, Send, SettlementPolicy
from .keys import KeyPair
from .messages import (
    ChannelCheck,
    ChannelChecked,
    ChannelMeta,
    CommitProposal,
    OpenAccept,
    OpenChannel,
    SessionOpen,
)
from .metering import MeterConfig, Prices
from .onchain import ChannelOps
from .opening import (
    PROTOCOL,
    ChannelClosed,
    ChannelOpenError,
    ChannelTerms,
    UnknownChannel,
    check_accept,
    check_chain_state,
    check_open,
    derive_channel_id,
    error_code,
    error_from_remote,
)
from .paysessions import Router, SessionBoard, pay_session, serve_session
from .paystats import PaymentStats, snapshot
from .session import ChannelShell, PayerSession, WorkerSession
from .store import DurableWriter, ListableKVStore, SQLiteKVStore
from .wallets import Wallet, wallet_from_data_dir
from .watcher import Watcher

if TYPE_CHECKING:
    from overlay.host import Overlay

__all__ = ["PROTOCOL", "ManagedChannel", "PayHost", "PaymentConfig", "PaymentManager"]

log = logging.getLogger(__name__)
NS_META = "channel_meta"
_M = TypeVar("_M")
TON = 10**9
LIVE = ("open", "closing", "disputed")


class PayHost(Protocol):
    """The part of the overlay the payment manager needs (``overlay.host.Overlay`` is one)."""

    peer_id: str

    async def open_stream(self, peer_id: str, protocol: str) -> MessageStream: ...

    def set_stream_handler(
        self, protocol: str, handler: Callable[[FramedStream], Awaitable[None]]
    ) -> None: ...


if TYPE_CHECKING:  # mypy checks that the real overlay satisfies PayHost

    def _overlay_is_a_pay_host(ov: Overlay) -> PayHost:
        return ov


@attrs.frozen
class PaymentConfig:
    """How a node pays and gets paid.  Units in the comments."""

    terms: ChannelTerms = attrs.field(factory=ChannelTerms)
    policy: SettlementPolicy = attrs.field(factory=SettlementPolicy)
    meter: MeterConfig = attrs.field(factory=MeterConfig)
    tick_interval: float = 5.0  # seconds between settlement-policy ticks
    watch_interval: float = 300.0  # seconds between on-chain checks (capped at quarantine / 4)
    open_timeout: float = 180.0  # seconds for a whole open, deployment included
    request_timeout: float = 30.0  # seconds for one control request
    chain_timeout: float = 120.0  # seconds to wait for one transaction
    claim_timeout: float = 30.0  # seconds a SessionOpen waits for the node to claim it
    proposal_ttl: float = 3600.0  # seconds an unfunded open proposal is kept (payee)
    retry_max: float = 600.0  # seconds, longest back-off between failed settlements
    force_close_after: float = 24 * 3600.0  # seconds of failed settlements before closing unilaterally


@attrs.define(eq=False)
class ManagedChannel:
    """One channel as the manager holds it: metadata, the core's shell, its chain operations."""

    meta: ChannelMeta
    shell: ChannelShell
    ops: ChannelOps
    watcher: Watcher
    op_lock: trio.Lock = attrs.field(factory=trio.Lock)
    retry_at: float = 0.0  # no settlement attempt before this time (back-off)
    backoff: float = 0.0
    failing_since: float = 0.0  # first of the settlement failures in a row

    @property
    def core(self) -> Channel:
        return self.shell.core

    @property
    def cid(self) -> bytes:
        return self.meta.channel_id

    @property
    def params(self) -> C.ChannelParams:
        return self.shell.core.params

    @property
    def log_extra(self) -> dict[str, str]:
        return {"peer_id": self.meta.peer_id, "channel_id": self.cid.hex()}


def _params_of(m: ChannelMeta) -> C.ChannelParams:
    cid = int.from_bytes(m.channel_id, "big")
    return C.ChannelParams(cid, m.key_a, m.key_b, m.addr_a, m.addr_b, m.quarantine, m.fine)


def _ton(n: int) -> str:
    return f"{n / TON:.4f} TON"


class PaymentManager:
    """Channels to every counterparty of one node; see the module docstring."""

    def __init__(
        self,
        host: PayHost,
        chain: ChainClient,
        wallet: Wallet,
        store: ListableKVStore,
        cfg: PaymentConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.chain = chain
        self.wallet = wallet
        self.key = wallet.keys
        self.address = wallet.address()
        self.store = store
        self.writer = DurableWriter(store)  # every channel's records go through it (grouped commits)
        self.cfg = cfg or PaymentConfig()
        self.clock = clock  # the time settlement policies run on (seconds, survives restarts)
        self.wallet_lock = trio.Lock()
        self.entries: dict[bytes, ManagedChannel] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("opened", "top_ups", "commits", "closes", "uncooperative", "challenges", "settle_failures",
             "refused", "garbage", "sessions_paid", "sessions_served", "sessions_forwarded",
             "forwards_failed", "fees"), 0,
        )  # fmt: skip
        self._peer_locks: dict[str, trio.Lock] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None  # background jobs while run() runs
        self.board = SessionBoard(self)
        self._restore()

    @classmethod
    def from_data_dir(
        cls,
        host: PayHost,
        chain: ChainClient,
        data_dir: Path,
        cfg: PaymentConfig | None = None,
        *,
        wallet: Wallet | None = None,
        clock: Callable[[], float] = time.time,
    ) -> PaymentManager:
        """The node's manager: channels in ``data_dir/payments.sqlite``, the data dir's wallet."""
        store = SQLiteKVStore(data_dir / "payments.sqlite")
        return cls(host, chain, wallet or wallet_from_data_dir(data_dir), store, cfg, clock=clock)

    # ------------------------------------------------------------------ bookkeeping

    def _make_entry(self, meta: ChannelMeta, blob: bytes | None) -> ManagedChannel:
        params = _params_of(meta)
        policy = self.cfg.policy
        core = (
            Channel.restore(params, self.key, blob, policy=policy)
            if blob
            else Channel(params, meta.me, self.key, policy=policy)
        )
        shell = ChannelShell(core, self.store, self.writer)
        ops = ChannelOps(
            self.chain, self.wallet, params, timeout=self.cfg.chain_timeout, lock=self.wallet_lock
        )
        return ManagedChannel(meta, shell, ops, Watcher(self.chain, ops, shell, clock=self.clock))

    def _restore(self) -> None:
        """Every channel back from the store. A record that does not decode is CorruptStore
        naming the file and the channel: a node never starts without a channel it holds."""
        where = getattr(self.store, "path", None) or type(self.store).__name__
        metas = self.store.keys(NS_META)
        for k in metas:
            raw = self.store.read(NS_META, k)
            try:
                meta = wire.decode_as(ChannelMeta, raw or b"")
                if meta.channel_id.hex() != k:
                    raise ChannelError(f"the record names channel {meta.channel_id.hex()}")
                entry = self._make_entry(meta, self.store.read("channel", k))
            except (DecodeError, ChannelError) as e:
                raise CorruptStore(
                    f"{where}: channel {k} cannot be restored ({e}); the store was left as it is"
                ) from e
            self.entries[meta.channel_id] = entry
        orphans = sorted(set(self.store.keys("channel")) - set(metas))
        if orphans:
            raise CorruptStore(f"{where}: channel {orphans[0]} has a state but no parameters")
        if self.entries:
            live = sum(1 for e in self.entries.values() if e.meta.status in LIVE)
            log.info("restored %d payment channels (%d live)", len(self.entries), live)

    async def _save_meta(self, entry: ManagedChannel, **changes: object) -> None:
        if changes:
            entry.meta = attrs.evolve(entry.meta, **changes)  # type: ignore[arg-type]
        await self.writer.write(NS_META, entry.cid.hex(), wire.encode(entry.meta))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked at every change (bound it with fail_after)."""
        while not predicate():
            await self._changed.wait()

    def _entry_for(self, channel_id: bytes, peer_id: str) -> ManagedChannel:
        entry = self.entries.get(channel_id)
        if entry is None or entry.meta.peer_id != peer_id:
            raise UnknownChannel(f"no channel {channel_id.hex()[:16]} with this peer")
        return entry

    def payer_channel(self, peer_id: str) -> ManagedChannel | None:
        """Our newest open channel paying ``peer_id``."""
        best: ManagedChannel | None = None
        for e in self.entries.values():
            if e.meta.peer_id == peer_id and e.meta.me == C.PARTY_A and e.meta.status == "open":
                if e.core.phase is Phase.OPEN and (best is None or e.meta.created_at > best.meta.created_at):
                    best = e
        return best

    def channels_with(self, peer_id: str) -> list[ManagedChannel]:
        return [e for e in self.entries.values() if e.meta.peer_id == peer_id]

    # ------------------------------------------------------------------ requests

    async def _request(self, stream: MessageStream, msg: object, cls: type[_M], timeout: float) -> _M:
        with trio.move_on_after(timeout):
            await stream.send(msg)
            reply = await stream.receive()
            if reply is None:
                raise StreamBroken(f"{stream.peer_id} closed the stream before answering")
            try:
                return expect(cls, reply)
            except RemoteError as e:
                raise error_from_remote(e) from e
        raise TimeoutError_(f"{stream.peer_id} did not answer {type(msg).__name__} within {timeout} s")

    # ------------------------------------------------------------------ opening (payer)

    async def channel_to(self, peer_id: str, *, min_available: int = 0) -> ManagedChannel:
        """An open channel paying ``peer_id`` with at least ``min_available`` nanoTON to spend:
        reused, topped up, or opened (deployed and confirmed by the peer) as needed."""
        lock = self._peer_locks.setdefault(peer_id, trio.Lock())
        async with lock:
            entry = self.payer_channel(peer_id)
            terms = self.cfg.terms
            if entry is None:
                return await self._open(peer_id, max(terms.deposit, min_available))
            available = entry.core.available()
            if available < max(min_available, terms.top_up_below * terms.deposit):
                await self.top_up(entry, max(terms.deposit, min_available - available))
            return entry

    async def _open(self, peer_id: str, deposit: int) -> ManagedChannel:
        extra = {"peer_id": peer_id}
        log.info("opening a payment channel to %s (deposit %s)", peer_id, _ton(deposit), extra=extra)
        terms = self.cfg.terms
        offer = OpenChannel(
            os.urandom(32), self.key.public, self.address, deposit, terms.quarantine, terms.fine
        )
        entry: ManagedChannel | None = None
        with trio.move_on_after(self.cfg.open_timeout) as scope:
            stream = await self.host.open_stream(peer_id, PROTOCOL)
            try:
                accept = await self._request(stream, offer, OpenAccept, self.cfg.request_timeout)
                params = check_accept(offer, accept)
                if (await self.chain.get_account(params.address())).status != "nonexist":
                    raise ChannelOpenError("the channel address is already in use on chain")
                meta = ChannelMeta(
                    params.channel_id.to_bytes(16, "big"), C.PARTY_A, peer_id, params.key_a, params.key_b,
                    params.addr_a, params.addr_b, params.quarantine, params.fine, "deploying", self.clock(),
                    deposit,
                )  # fmt: skip
                entry = self._make_entry(meta, None)
                self.entries[entry.cid] = entry
                await self._save_meta(entry)  # before any money moves
                log.info(
                    "deploying channel %s with %s", params.address(), _ton(deposit), extra=entry.log_extra
                )
                tx = await entry.ops.top_up(C.PARTY_A, deposit)
                self.counters["fees"] += tx.total_fees
                if not tx.success:
                    await self._save_meta(entry, status="failed")
                    raise ChainError(f"deploying the channel failed with exit code {tx.exit_code}")
                await self._sync(entry)
                log.info(
                    "channel %s deployed; waiting for %s to confirm", params.address(), peer_id, extra=extra
                )
                await self._request(stream, ChannelCheck(entry.cid), ChannelChecked, self.cfg.request_timeout)
            except ChannelError as e:
                if entry is not None and entry.meta.status == "open":
                    await self._abandon(entry, str(e))
                raise
            finally:
                await stream.aclose()
        if scope.cancelled_caught or entry is None:
            raise TimeoutError_(f"opening a channel to {peer_id} took over {self.cfg.open_timeout} s")
        self.counters["opened"] += 1
        log.info(
            "channel %s to %s confirmed: %s deposited", entry.cid.hex(), peer_id, _ton(deposit), extra=extra
        )
        return entry

    async def _abandon(self, entry: ManagedChannel, why: str) -> None:
        """The payee refused a channel we funded: take the deposit back unilaterally."""
        log.warning(
            "payee refused channel %s (%s): closing it on chain", entry.cid.hex(), why, extra=entry.log_extra
        )
        try:
            await self._uncooperative_close(entry)
        except NodeError as e:
            log.error("could not start closing channel %s: %s", entry.cid.hex(), e, extra=entry.log_extra)

    async def top_up(self, entry: ManagedChannel, amount: int) -> None:
        """Deposit ``amount`` more on a channel we pay on, and have the payee re-read it."""
        async with entry.op_lock:
            log.info("topping up channel %s by %s", entry.cid.hex(), _ton(amount), extra=entry.log_extra)
            tx = await entry.ops.top_up(entry.meta.me, amount)
            self.counters["fees"] += tx.total_fees
            if not tx.success:
                raise ChainError(f"top-up failed with exit code {tx.exit_code}")
            self.counters["top_ups"] += 1
            await self._sync(entry)
        await self._tell_check(entry)

    async def _tell_check(self, entry: ManagedChannel) -> None:
        """Ask the counterparty to re-read the channel (best effort: its watcher would anyway)."""
        try:
            stream = await self.host.open_stream(entry.meta.peer_id, PROTOCOL)
            try:
                await self._request(stream, ChannelCheck(entry.cid), ChannelChecked, self.cfg.request_timeout)
            finally:
                await stream.aclose()
        except NodeError as e:
            log.info(
                "%s did not re-read channel %s: %s",
                entry.meta.peer_id,
                entry.cid.hex(),
                e,
                extra=entry.log_extra,
            )

    # ------------------------------------------------------------------ chain state

    async def _sync(self, entry: ManagedChannel) -> C.ChannelData:
        """Check the channel on chain (ours, as agreed, solvent) and adopt what it shows."""
        address = entry.ops.address
        account = await self.chain.get_account(address)
        data = await self.chain.get_channel_state(address)
        status = entry.meta.status
        if (
            data is not None
            and data.status is not C.Status.OPEN
            and account.code_hash == C.channel_code().hash
        ):
            pass  # closing or closed: adopt it below whatever the balance
        else:
            opening = status in ("proposed", "deploying")
            min_dep = entry.meta.deposit if opening else 0
            data = check_chain_state(entry.params, account, data, min_deposit_a=min_dep, fresh=opening)
        assert data is not None
        seen = data
        await entry.shell.run(lambda: entry.core.sync_onchain(seen, self.clock()))
        new = {C.Status.OPEN: "open", C.Status.QUARANTINE: "disputed", C.Status.CLOSED: "closed"}[data.status]
        if new == "open" and entry.core.phase is Phase.CLOSING:
            new = "closing"
        if new != status:
            await self._save_meta(entry, status=new)
        else:
            self._notify()
        return data

    async def _serve_check(self, stream: MessageStream, msg: ChannelCheck) -> None:
        entry = self._entry_for(msg.channel_id, stream.peer_id)
        if entry.meta.status in ("closed", "failed"):
            raise ChannelClosed("the channel is closed")
        data = await self._sync(entry)  # no channel lock: we may be settling with this peer right now
        reply = ChannelChecked(
            entry.cid, entry.meta.status, data.deposit_a, data.deposit_b, data.seqno_a, data.seqno_b
        )
        await stream.send(reply)

    # ------------------------------------------------------------------ serving (payee side)

    async def _handle(self, stream: MessageStream) -> None:
        """Serve one /cocoon/pay/1 stream; never raises (a refusal goes back as an error frame)."""
        peer = stream.peer_id
        try:
            first: object | None = None
            with trio.move_on_after(self.cfg.request_timeout):  # a peer that opens and never speaks
                first = await stream.receive()
            if isinstance(first, OpenChannel):
                await self._serve_open(stream, first)
            elif isinstance(first, ChannelCheck):
                await self._serve_check(stream, first)
            elif isinstance(first, CommitProposal):
                await self._serve_proposal(stream, first)
            elif isinstance(first, SessionOpen):
                await self.board.serve_open(stream, first)
            elif first is not None:
                raise RemoteProtocolError(f"{type(first).__name__} cannot start a {PROTOCOL} stream")
        except DecodeError as e:
            self.counters["garbage"] += 1
            log.info("garbage on %s: %s", PROTOCOL, e, extra={"peer_id": peer})
        except NodeError as e:
            self.counters["refused"] += 1
            log.info("refused a %s request: %s", PROTOCOL, e, extra={"peer_id": peer})
            with trio.move_on_after(2):
                try:
                    await stream.send(wire.ErrorFrame(error_code(e), str(e)[:500]))
                except NodeError:
                    pass

    async def _serve_open(self, stream: MessageStream, msg: OpenChannel) -> None:
        addr_a = check_open(msg, self.cfg.terms, self.key.public)
        nonce = os.urandom(32)
        cid = derive_channel_id(msg.nonce, nonce, msg.key, self.key.public)
        cid_b = cid.to_bytes(16, "big")
        if cid_b in self.entries:
            raise ChannelOpenError("channel id collision")
        meta = ChannelMeta(
            cid_b, C.PARTY_B, stream.peer_id, msg.key, self.key.public, addr_a,
            normalize_address(self.address), msg.quarantine, msg.fine, "proposed", self.clock(), msg.deposit,
        )  # fmt: skip
        entry = self._make_entry(meta, None)
        self.entries[cid_b] = entry
        await self._save_meta(entry)
        log.info("accepted a channel proposal from %s", stream.peer_id, extra=entry.log_extra)
        await stream.send(OpenAccept(nonce, self.key.public, meta.addr_b, cid_b, entry.params.address()))
        with trio.move_on_after(self.cfg.open_timeout):
            nxt = await stream.receive()
            if nxt is not None:
                await self._serve_check(stream, expect(ChannelCheck, nxt))

    async def _serve_proposal(self, stream: MessageStream, p: CommitProposal) -> None:
        entry = self._entry_for(p.channel_id, stream.peer_id)
        if entry.meta.status != "open":
            raise ChannelClosed(f"the channel is {entry.meta.status}")
        entry.core.check_proposal_signature(p)  # before anything costs us a chain query
        await self._sync(entry)  # judge it against the chain's latest view
        out = await entry.shell.run(lambda: entry.core.receive_proposal(p))
        (send,) = out
        assert isinstance(send, Send)
        await stream.send(send.msg)
        if p.close:
            await self._save_meta(entry, status="closing")
        log.info(
            "co-signed a %s of channel %s",
            "close" if p.close else "commit",
            entry.cid.hex(),
            extra=entry.log_extra,
        )
        with trio.move_on_after(self.cfg.chain_timeout + self.cfg.request_timeout):
            nxt = await stream.receive()
            if nxt is not None:
                await self._serve_check(stream, expect(ChannelCheck, nxt))

    # ------------------------------------------------------------------ settling, the driver

    async def settle(self, entry: ManagedChannel, kind: str = "commit", reason: str = "requested") -> None:
        """Commit (or close) ``entry`` cooperatively now: see ton.settlement."""
        await settlement.settle(self, entry, kind, reason)

    async def close(self, peer_id: str, *, force: bool = False) -> int:
        """Close every live channel with ``peer_id``; ``force``: unilaterally if it will not co-sign."""
        return await settlement.close(self, peer_id, force=force)

    async def tick_once(self) -> None:
        await settlement.tick_once(self)

    async def watch_once(self) -> None:
        await settlement.watch_once(self)

    async def _uncooperative_close(self, entry: ManagedChannel) -> None:
        await settlement.uncooperative_close(self, entry)

    def retire(self, entry: ManagedChannel, why: str) -> None:
        """Stop using a channel the peer no longer serves (it forgot it, or says it is closed):
        no new sessions on it; it is closed in the background (unilaterally if need be)."""
        if entry.meta.status != "open":
            return
        log.warning("retiring channel %s: %s", entry.cid.hex(), why, extra=entry.log_extra)
        entry.meta = attrs.evolve(entry.meta, status="closing")
        if self._nursery is not None:
            self._nursery.start_soon(self._retire, entry)

    async def _retire(self, entry: ManagedChannel) -> None:
        try:
            await self._save_meta(entry)
            await settlement.close_entry(self, entry, force=True)
        except NodeError as e:
            log.error("could not close channel %s: %s", entry.cid.hex(), e, extra=entry.log_extra)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve /cocoon/pay/1 and drive settlements and watching until cancelled."""
        self.host.set_stream_handler(PROTOCOL, self._handle)
        log.info("payments ready: wallet %s, %d channels", self.address, len(self.entries))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await settlement.drive(self)
            finally:
                self._nursery = None

    # ------------------------------------------------------------------ sessions, statistics

    def pay_session(
        self,
        peer_id: str,
        *,
        session_id: bytes,
        offer_id: bytes,
        prices: Prices,
        prompt_tokens: int,
        max_tokens: int,
        worker_key: bytes,
    ) -> AbstractAsyncContextManager[PayerSession]:
        """Pay ``peer_id`` (worker, or proxy in hub mode) for one generation: see ton.paysessions."""
        return pay_session(
            self, peer_id, session_id=session_id, offer_id=offer_id, prices=prices,
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, worker_key=worker_key,
        )  # fmt: skip

    def serve_session(
        self,
        session_id: bytes,
        *,
        min_prices: Prices | None = None,
        payer: str | None = None,
        timeout: float | None = None,
        receipt_key: KeyPair | None = None,
    ) -> AbstractAsyncContextManager[WorkerSession]:
        """Be paid for one generation (worker): see ton.paysessions."""
        return serve_session(
            self, session_id, min_prices=min_prices, payer=payer, timeout=timeout, receipt_key=receipt_key
        )

    def set_router(self, router: Router | None) -> None:
        """As a proxy: forward sessions the router names a worker for (None: serve them here)."""
        self.board.router = router

    def statistics(self) -> PaymentStats:
        return snapshot(self)

    def status_section(self) -> dict[str, object]:
        return self.statistics().status_section()

    def close_store(self) -> None:
        """Close the store (when the node stops); only for stores that can be closed."""
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
