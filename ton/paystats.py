"""Statistics of a payment manager: frozen snapshots for ``cocoon-node status`` and Prometheus.

:func:`snapshot` reads the channel cores (no I/O); :meth:`PaymentStats.status_section` is the
JSON-able dict the status command prints; :meth:`PaymentStats.samples` the Prometheus samples
``(name, labels, value)`` that ``node.metrics`` collectors return. Amounts are nanoTON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from . import contract as C

if TYPE_CHECKING:
    from .manager import PaymentManager

__all__ = ["ChannelStats", "PaymentStats", "snapshot"]

Sample = tuple[str, dict[str, str], float]
LIVE = ("open", "closing", "disputed")


@attrs.frozen
class ChannelStats:
    channel_id: str  # hex
    peer_id: str
    role: str  # "payer" (we are A) | "payee" (we are B)
    status: str  # proposed | deploying | open | closing | disputed | closed | failed
    address: str  # the contract, raw "0:<hex>"
    deposit: int  # our deposit on chain
    peer_deposit: int
    available: int  # what we may still send
    spent: int  # cumulative: what we signed over to the peer
    earned: int  # cumulative: what the peer signed over to us
    unsettled: int  # earned but not yet recorded on chain
    withdrawn: int  # what we took out while open
    seqno: int  # our latest seqno


@attrs.frozen
class PaymentStats:
    wallet: str
    channels: tuple[ChannelStats, ...]
    live_channels: int
    deposits: int  # our deposits in live channels
    balance: int  # what we may still spend in live channels
    unsettled: int  # earned in live channels, not yet on chain
    earned: int  # over every channel ever
    spent: int
    forward_fees: int  # kept as a proxy (this process)
    counters: tuple[tuple[str, int], ...]  # opened, top_ups, commits, closes, ... (this process)

    def status_section(self) -> dict[str, object]:
        return {
            "wallet": self.wallet,
            "live_channels": self.live_channels,
            "deposits_nanoton": self.deposits,
            "balance_nanoton": self.balance,
            "unsettled_nanoton": self.unsettled,
            "earned_nanoton": self.earned,
            "spent_nanoton": self.spent,
            "forward_fees_nanoton": self.forward_fees,
            **dict(self.counters),
            "channels": [attrs.asdict(c) for c in self.channels],
        }

    def samples(self) -> list[Sample]:
        out: list[Sample] = [
            ("cocoon_channels_live", {}, float(self.live_channels)),
            ("cocoon_channel_deposits_nanoton", {}, float(self.deposits)),
            ("cocoon_channel_balance_nanoton", {}, float(self.balance)),
            ("cocoon_channel_unsettled_nanoton", {}, float(self.unsettled)),
            ("cocoon_earned_nanoton_total", {}, float(self.earned)),
            ("cocoon_channel_spent_nanoton_total", {}, float(self.spent)),
            ("cocoon_forward_fees_nanoton_total", {}, float(self.forward_fees)),
        ]
        out += [(f"cocoon_payments_{k}_total", {}, float(v)) for k, v in self.counters]
        for c in self.channels:
            if c.status in LIVE:
                labels = {"peer": c.peer_id, "role": c.role}
                out.append(("cocoon_channel_available_nanoton", labels, float(c.available)))
        return out


def snapshot(pm: PaymentManager) -> PaymentStats:
    rows = []
    for e in pm.entries.values():
        core, m = e.core, e.meta
        r = core.r
        mine_a = m.me == C.PARTY_A
        rows.append(
            ChannelStats(
                channel_id=m.channel_id.hex(),
                peer_id=m.peer_id,
                role="payer" if mine_a else "payee",
                status=m.status,
                address=e.ops.address,
                deposit=r.deposit_a if mine_a else r.deposit_b,
                peer_deposit=r.deposit_b if mine_a else r.deposit_a,
                available=core.available(),
                spent=r.own_sent,
                earned=r.peer_sent,
                unsettled=max(0, core.unsettled()),
                withdrawn=r.withdrawn_a if mine_a else r.withdrawn_b,
                seqno=r.own_seqno,
            )
        )
    rows.sort(key=lambda c: (c.status not in LIVE, c.peer_id, c.channel_id))
    live = [c for c in rows if c.status in LIVE]
    return PaymentStats(
        wallet=pm.address,
        channels=tuple(rows),
        live_channels=len(live),
        deposits=sum(c.deposit for c in live),
        balance=sum(c.available for c in live),
        unsettled=sum(c.unsettled for c in live),
        earned=sum(c.earned for c in rows),
        spent=sum(c.spent for c in rows),
        forward_fees=pm.board.forward_fees,
        counters=tuple(sorted(pm.counters.items())),
    )
