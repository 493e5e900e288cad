"""The watcher: sees an uncooperative close on chain, challenges a stale one, finishes it.

:func:`decide` is the pure part: given the contract's data, our side of the channel and the
chain time, it says what to do (nothing, challenge, finish). :class:`Watcher` is the trio shell:
``check_once`` reads the chain, syncs the channel core and acts; ``run`` does it every
``interval`` seconds (default: a quarter of the quarantine, as the contract's window demands).
"""

from __future__ import annotations

import logging

import attrs
import trio

from overlay.errors import ChainError

from . import contract as C
from .chain import ChainClient, TxInfo
from .channel import Channel
from .onchain import ChannelOps
from .session import ChannelShell

__all__ = ["Action", "Watcher", "decide"]

log = logging.getLogger(__name__)


@attrs.frozen
class Action:
    kind: str  # "challenge" | "finish"
    reason: str


def decide(data: C.ChannelData, ch: Channel, now: int) -> Action | None:
    """What our side should do about the channel's on-chain state."""
    q = data.quarantine
    if data.status is not C.Status.QUARANTINE or q is None:
        return None
    ends = q.started_at + data.quarantine_duration
    if now >= ends:
        return Action("finish", "quarantine over")
    by_me = q.by_a == (ch.me == C.PARTY_A)
    if by_me or q.challenged:
        return None
    peer = ch.latest_peer_state()
    quarantined_seqno = q.seqno_a if ch.peer == C.PARTY_A else q.seqno_b
    if peer is not None and peer.seqno > quarantined_seqno:
        return Action("challenge", f"initiator used seqno {quarantined_seqno}, we hold {peer.seqno}")
    return None


class Watcher:
    """Watches one channel for our side."""

    def __init__(self, chain: ChainClient, ops: ChannelOps, shell: ChannelShell) -> None:
        self.chain = chain
        self.ops = ops
        self.shell = shell
        self.actions: list[tuple[Action, TxInfo]] = []

    async def check_once(self) -> Action | None:
        data = await self.chain.get_channel_state(self.ops.address)
        if data is None:
            return None
        now = await self.chain.now()
        ch = self.shell.core
        seen = data
        await self.shell.run(lambda: ch.sync_onchain(seen, float(now)))
        action = decide(data, self.shell.core, now)
        if action is None:
            return None
        log.warning(
            "channel %s: %s (%s)",
            ch.cid.hex(),
            action.kind,
            action.reason,
            extra={"channel_id": ch.cid.hex()},
        )
        if action.kind == "challenge":
            tx = await self.ops.challenge(self.shell.core.key, *self.shell.core.signed_state_cells())
        else:
            tx = await self.ops.finish()
        if tx.exit_code != 0:
            raise ChainError(f"{action.kind} refused by the contract with exit code {tx.exit_code}")
        self.actions.append((action, tx))
        after = await self.chain.get_channel_state(self.ops.address)
        if after is not None:
            core = self.shell.core
            await self.shell.run(lambda: core.sync_onchain(after, float(now)))
        return action

    async def run(self, interval: float | None = None) -> None:
        """Check forever, every ``interval`` seconds (default quarantine / 4)."""
        period = interval if interval is not None else max(1.0, self.ops.params.quarantine / 4)
        while True:
            try:
                await self.check_once()
            except ChainError as e:
                log.warning("watcher check failed: %s", e, extra={"channel_id": self.shell.core.cid.hex()})
            await trio.sleep(period)
