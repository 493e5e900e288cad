"""The watcher: sees an uncooperative close on chain, challenges a stale one, finishes it.

:func:`decide` is the pure part: given the contract's data, our side of the channel and the
chain time, it says what to do (nothing, challenge, finish, or submit a cooperative close we
co-signed but the proposer never sent: done on the second check that still sees it).
:class:`Watcher` is the trio shell: ``check_once`` reads the chain, syncs the channel core
and acts; ``run`` does it every ``interval`` seconds (default: a quarter of the quarantine, as
the contract's window demands).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from overlay.errors import ChainError

from . import contract as C
from .chain import ChainClient, TxInfo
from .channel import Channel, Phase
from .messages import CommitProposal
from .onchain import ChannelOps
from .session import ChannelShell

__all__ = ["Action", "Watcher", "decide"]

log = logging.getLogger(__name__)


@attrs.frozen
class Action:
    kind: str  # "challenge" | "finish" | "submit_close"
    reason: str


def decide(data: C.ChannelData, ch: Channel, now: int) -> Action | None:
    """What our side should do about the channel's on-chain state."""
    cosigned = ch.r.cosigned
    if data.status is C.Status.OPEN and ch.phase is Phase.CLOSING and cosigned is not None and cosigned.close:
        return Action("submit_close", "the proposer did not submit the close we co-signed")
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

    def __init__(
        self,
        chain: ChainClient,
        ops: ChannelOps,
        shell: ChannelShell,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.chain = chain
        self.ops = ops
        self.shell = shell
        self.clock = clock  # the time settlement policies run on (default: the chain's)
        self.actions: list[tuple[Action, TxInfo]] = []
        self._cosigned_seen: CommitProposal | None = None

    async def check_once(self) -> Action | None:
        data = await self.chain.get_channel_state(self.ops.address)
        if data is None:
            return None
        now = await self.chain.now()
        t = self.clock() if self.clock is not None else float(now)
        ch = self.shell.core
        seen = data
        await self.shell.run(lambda: ch.sync_onchain(seen, t))
        action = decide(data, self.shell.core, now)
        if action is None:
            self._cosigned_seen = None
            return None
        if action.kind == "submit_close":
            cosigned = self.shell.core.r.cosigned
            if self._cosigned_seen != cosigned:  # give the proposer until the next check
                self._cosigned_seen = cosigned
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
        elif action.kind == "submit_close":
            submit = self.shell.core.cosigned_close()
            assert submit is not None
            tx = await self.ops.submit(submit.body)
        else:
            tx = await self.ops.finish()
        if tx.exit_code != 0:
            raise ChainError(f"{action.kind} refused by the contract with exit code {tx.exit_code}")
        self.actions.append((action, tx))
        after = await self.chain.get_channel_state(self.ops.address)
        if after is not None:
            core = self.shell.core
            await self.shell.run(lambda: core.sync_onchain(after, t))
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
