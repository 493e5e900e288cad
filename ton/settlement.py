"""The settlement driver of a :class:`~ton.manager.PaymentManager` (trio).

- :func:`settle`: propose -> co-sign (the counterparty, over ``/cocoon/pay/1``) -> submit the
  cooperative commit or close as an external message -> wait for the contract's transaction ->
  adopt the chain's state -> ask the counterparty to re-read it;
- :func:`close`: cooperative close of every channel with a peer; with ``force`` an uncooperative
  close when the peer does not co-sign (the watcher finishes it after the quarantine);
- :func:`tick_once`: every open channel's settlement policy (threshold, timer, deposit share,
  idle close); channels that ask are settled concurrently, failures back off exponentially;
- :func:`watch_once`: every live channel read on chain through its Watcher (adopt commits,
  challenge a stale close, finish after the quarantine, submit a co-signed close), unconfirmed
  opens adopted or expired;
- :func:`drive`: both, forever (``PaymentManager.run`` starts it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from overlay.errors import ChainError, NodeError
from overlay.streams import MessageStream

from . import contract as C
from .channel import Phase, Send, Settle, Submit
from .messages import ChannelCheck, ChannelChecked, CommitSignature
from .opening import PROTOCOL, ChannelClosed

if TYPE_CHECKING:
    from .manager import ManagedChannel, PaymentManager

__all__ = [
    "close",
    "close_entry",
    "drive",
    "settle",
    "tick_once",
    "uncooperative_close",
    "watch_once",
    "watch_period",
]

log = logging.getLogger(__name__)
TON = 10**9
LIVE = ("open", "closing", "disputed")


def _ton(n: int) -> str:
    return f"{n / TON:.4f} TON"


# ------------------------------------------------------------------ settling


async def settle(
    pm: PaymentManager, entry: ManagedChannel, kind: str = "commit", reason: str = "requested"
) -> None:
    """Propose a cooperative commit (or close), get it co-signed, submit it, adopt the result;
    then (outside the channel's lock: the peer may be settling too) ask the peer to re-read it."""
    stream: MessageStream | None = None
    try:
        async with entry.op_lock:
            try:
                stream = await pm.host.open_stream(entry.meta.peer_id, PROTOCOL)
                await _settle_locked(pm, entry, kind, reason, stream)
            except BaseException:
                entry.core.settle_failed()
                raise
        with trio.move_on_after(pm.cfg.request_timeout):
            try:
                await pm._request(stream, ChannelCheck(entry.cid), ChannelChecked, pm.cfg.request_timeout)
            except NodeError as e:
                log.info("peer did not re-read channel %s: %s", entry.cid.hex(), e, extra=entry.log_extra)
    finally:
        if stream is not None:
            await stream.aclose()


async def _settle_locked(
    pm: PaymentManager, entry: ManagedChannel, kind: str, reason: str, stream: MessageStream
) -> None:
    close = kind == "close"
    log.info("%s of channel %s (%s): asking %s to co-sign", kind, entry.cid.hex(), reason,
             entry.meta.peer_id, extra=entry.log_extra)  # fmt: skip
    await pm._sync(entry)  # propose from the chain's latest view (withdrawals, committed seqnos)
    if not close and not entry.core.has_news():  # e.g. an earlier try landed, unheard of
        log.info(
            "channel %s: the chain already holds our latest states", entry.cid.hex(), extra=entry.log_extra
        )
        return
    (send,) = await entry.shell.run(lambda: entry.core.propose(close=close))
    assert isinstance(send, Send)
    if close:
        await pm._save_meta(entry, status="closing")
    sig = await pm._request(stream, send.msg, CommitSignature, pm.cfg.request_timeout)
    (submit,) = await entry.shell.run(lambda: entry.core.receive_signature(sig))
    assert isinstance(submit, Submit)
    withdrawn = entry.core.r.withdrawn_a if entry.meta.me == C.PARTY_A else entry.core.r.withdrawn_b
    tx = await entry.ops.submit(submit.body)
    pm.counters["fees"] += tx.total_fees
    if not tx.success:
        raise ChainError(f"the contract refused the {kind} with exit code {tx.exit_code}")
    await pm._sync(entry)
    pm.counters["closes" if close else "commits"] += 1
    now_withdrawn = entry.core.r.withdrawn_a if entry.meta.me == C.PARTY_A else entry.core.r.withdrawn_b
    log.info("%s of channel %s landed on chain (withdrew %s)", kind, entry.cid.hex(),
             _ton(now_withdrawn - withdrawn), extra=entry.log_extra)  # fmt: skip


async def close(pm: PaymentManager, peer_id: str, *, force: bool = False) -> int:
    """Close every live channel with ``peer_id`` cooperatively; with ``force``, fall back to an
    uncooperative close (finished by the watcher after the quarantine). Returns how many."""
    n = 0
    for entry in pm.channels_with(peer_id):
        if entry.meta.status in ("open", "closing"):
            await close_entry(pm, entry, force=force)
            n += 1
    return n


async def close_entry(pm: PaymentManager, entry: ManagedChannel, *, force: bool = False) -> None:
    try:
        if entry.core.phase is Phase.OPEN:
            await settle(pm, entry, "close")
        else:
            raise ChannelClosed("a close proposal is already pending")
    except NodeError as e:
        if not force:
            raise
        log.warning("cooperative close of %s failed (%s): closing unilaterally", entry.cid.hex(), e,
                    extra=entry.log_extra)  # fmt: skip
        await uncooperative_close(pm, entry)


async def uncooperative_close(pm: PaymentManager, entry: ManagedChannel) -> None:
    async with entry.op_lock:
        tx = await entry.ops.start_uncooperative_close(pm.key, *entry.core.signed_state_cells())
        pm.counters["fees"] += tx.total_fees
        if not tx.success:
            raise ChainError(f"the contract refused the uncooperative close with exit code {tx.exit_code}")
        pm.counters["uncooperative"] += 1
        await pm._sync(entry)


# ------------------------------------------------------------------ the driver


async def drive(pm: PaymentManager) -> None:
    """Tick the policies every tick_interval seconds and watch the chain every watch_period."""
    next_watch = 0.0
    while True:
        await tick_once(pm)
        if trio.current_time() >= next_watch:
            await watch_once(pm)
            next_watch = trio.current_time() + watch_period(pm)
        await trio.sleep(pm.cfg.tick_interval)


def watch_period(pm: PaymentManager) -> float:
    quarantines = [e.params.quarantine / 4 for e in pm.entries.values() if e.meta.status in LIVE]
    return max(1.0, min([pm.cfg.watch_interval, *quarantines]))


async def tick_once(pm: PaymentManager) -> None:
    """Apply every open channel's settlement policy; settle those that ask (concurrently)."""
    now = pm.clock()
    due: list[tuple[ManagedChannel, Settle]] = []
    for entry in list(pm.entries.values()):
        if entry.meta.status != "open" or now < entry.retry_at or entry.core.frozen:
            continue
        due += [(entry, e) for e in entry.core.tick(now) if isinstance(e, Settle)]
    async with trio.open_nursery() as nursery:
        for entry, s in due:
            nursery.start_soon(_settle_logged, pm, entry, s)


async def _settle_logged(pm: PaymentManager, entry: ManagedChannel, s: Settle) -> None:
    try:
        await settle(pm, entry, s.kind, s.reason)
        entry.backoff = 0.0
        entry.failing_since = 0.0
        return
    except NodeError as e:
        pm.counters["settle_failures"] += 1
        now = pm.clock()
        entry.failing_since = entry.failing_since or now
        entry.backoff = min(pm.cfg.retry_max, max(pm.cfg.tick_interval, entry.backoff * 2))
        entry.retry_at = now + entry.backoff
        log.warning("%s of channel %s failed: %s (retry in %.0f s)", s.kind, entry.cid.hex(), e,
                    entry.backoff, extra=entry.log_extra)  # fmt: skip
        pm._notify()
    # An idle close that the peer will not co-sign, or value we cannot get committed for too long:
    # settle without the peer (the watcher finishes it after the quarantine).
    stuck = entry.core.phase is Phase.CLOSING or now - entry.failing_since >= pm.cfg.force_close_after
    if stuck and entry.meta.status in ("open", "closing"):
        try:
            await uncooperative_close(pm, entry)
        except NodeError as e:
            log.error("cannot close channel %s: %s", entry.cid.hex(), e, extra=entry.log_extra)


async def watch_once(pm: PaymentManager) -> None:
    """Read every live channel on chain: adopt it, challenge or finish closes (the watcher)."""
    for entry in list(pm.entries.values()):
        try:
            await _watch(pm, entry)
        except NodeError as e:
            log.warning("watching channel %s: %s", entry.cid.hex(), e, extra=entry.log_extra)


async def _watch(pm: PaymentManager, entry: ManagedChannel) -> None:
    status = entry.meta.status
    if status in ("closed", "failed"):
        return
    if status in ("proposed", "deploying"):
        if (await pm.chain.get_account(entry.ops.address)).status == "active":
            async with entry.op_lock:
                await pm._sync(entry)
        elif pm.clock() - entry.meta.created_at > pm.cfg.proposal_ttl:
            await pm._save_meta(entry, status="failed")
        return
    async with entry.op_lock:
        action = await entry.watcher.check_once()
        if action is not None:
            pm.counters["challenges" if action.kind == "challenge" else "closes"] += 1
        data = await pm._sync(entry)
    if data.status is C.Status.CLOSED:
        log.info("channel %s is closed on chain", entry.cid.hex(), extra=entry.log_extra)
