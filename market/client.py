"""The client's side of the market: ask a proxy for workers, check what it returns, report back.

:meth:`MarketClient.match` asks the node's proxies in rendezvous order (the
next one when a proxy fails or times out) and never trusts the answer: every
returned offer must carry a valid signature from the worker it names, be for
the model asked, under both price caps, unexpired, and (for attested tiers)
come with an ``ok`` verdict; the client still verifies the worker's report
itself before encrypting to it (the confidential-compute layer does that).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import attrs

from overlay.errors import MarketError, NodeError

from .directory import Directory
from .protocols import MATCH_PROTOCOL, STATS_PROTOCOL, USAGE_PROTOCOL, MarketOverlay, MarketSettings, request
from .records import (
    ATTESTED_TIERS,
    MatchRequest,
    MatchResponse,
    SignedMarketStats,
    SignedOffer,
    SignedVerdict,
    StatsRequest,
    UsageReport,
    peer_id_matches,
    signature_valid,
    tier_rank,
)
from .validation import check_market_stats, check_verdict

__all__ = ["Match", "MarketClient", "NoMatch"]

log = logging.getLogger(__name__)


class NoMatch(MarketError):
    """No proxy returned a usable offer; ``price_hint`` is the cheapest completion price seen, if any."""

    def __init__(self, message: str, price_hint: int | None = None) -> None:
        super().__init__(message)
        self.price_hint = price_hint


@attrs.frozen
class Match:
    proxy: str  # peer id of the proxy that answered
    offers: tuple[SignedOffer, ...]  # checked, best first
    verdicts: tuple[SignedVerdict, ...]


class MarketClient:
    def __init__(
        self,
        overlay: MarketOverlay,
        directory: Directory,
        *,
        settings: MarketSettings | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.overlay = overlay
        self.directory = directory
        self.settings = settings or MarketSettings()
        self.clock = clock
        self.rng = rng or random.Random()

    def usable(self, req: MatchRequest, resp: MatchResponse, now: float) -> tuple[SignedOffer, ...]:
        """The offers of ``resp`` that pass the client's own checks, in the proxy's order."""
        ok_reports = {
            (v.body.worker_peer_id, v.body.report_hash, v.body.tier)
            for v in resp.verdicts
            if v.body.status == "ok" and check_verdict(v, now).accepted
        }
        out = []
        for rec in resp.offers:
            o = rec.body
            if not (signature_valid(rec) and peer_id_matches(rec)):
                continue
            if o.model_id != req.model_id or o.expires_at <= now or o.capacity <= 0:
                continue
            if o.price_prompt > req.max_price_prompt or o.price_completion > req.max_price_completion:
                continue
            if tier_rank(o.tier) < tier_rank(req.min_tier) or o.peer_id in req.exclude:
                continue
            if o.tier in ATTESTED_TIERS and (o.peer_id, o.attestation_hash, o.tier) not in ok_reports:
                continue
            out.append(rec)
        return tuple(out)

    async def match(
        self,
        model_id: str,
        *,
        max_price_prompt: int,
        max_price_completion: int,
        min_tier: str = "none",
        count: int = 3,
        exclude: tuple[str, ...] = (),
    ) -> Match:
        """Checked offers for ``model_id`` from the first proxy that has some; NoMatch otherwise."""
        req = MatchRequest(
            self.rng.getrandbits(63),
            model_id,
            max_price_prompt,
            max_price_completion,
            min_tier,
            count,
            exclude,
        )
        proxies = self.directory.proxies_for(self.overlay.peer_id)
        if not proxies:
            raise NoMatch("no proxy known: no elected set and no bootstrap proxies")
        hints: list[int] = []
        reasons: list[str] = []
        for proxy in proxies:
            try:
                resp = await request(
                    self.overlay, proxy.peer_id, MATCH_PROTOCOL, req, MatchResponse,
                    addrs=proxy.addrs, timeout=self.settings.request_timeout,
                )  # fmt: skip
            except NodeError as e:
                log.info("match via %s failed: %s", proxy.peer_id, e, extra={"peer_id": proxy.peer_id})
                reasons.append(f"{proxy.peer_id[-8:]}: {e}")
                continue
            offers = self.usable(req, resp, self.clock())
            if offers:
                return Match(proxy.peer_id, offers, resp.verdicts)
            if resp.price_hint is not None:
                hints.append(resp.price_hint)
            reasons.append(f"{proxy.peer_id[-8:]}: {resp.reason or 'no usable offer'}")
        raise NoMatch("; ".join(reasons), min(hints) if hints else None)

    async def stats(self, model_id: str) -> SignedMarketStats:
        """Statistics for ``model_id`` from the first proxy that answers (for ``cocoon-node offers``)."""
        last: NodeError | None = None
        for proxy in self.directory.proxies_for(self.overlay.peer_id):
            try:
                rec = await request(
                    self.overlay, proxy.peer_id, STATS_PROTOCOL, StatsRequest(model_id), SignedMarketStats,
                    addrs=proxy.addrs, timeout=self.settings.request_timeout,
                )  # fmt: skip
            except NodeError as e:
                last = e
                continue
            if check_market_stats(rec, self.clock()).accepted and rec.body.proxy_peer_id == proxy.peer_id:
                return rec
        raise MarketError(f"no proxy answered with statistics for {model_id!r}: {last}")

    async def report(self, proxy: str, usage: UsageReport) -> None:
        """Tell the proxy how a session with a worker went (feeds its reputation and suspensions)."""
        addrs = next(
            (p.addrs for p in self.directory.proxies_for(self.overlay.peer_id) if p.peer_id == proxy), ()
        )
        stream = await self.overlay.open_stream(proxy, USAGE_PROTOCOL, addrs=addrs)
        try:
            await stream.send(usage)
        finally:
            await stream.aclose()
