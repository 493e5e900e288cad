"""The market's trio shells for workers and proxies (names in :mod:`market.protocols`).

:class:`WorkerService` re-publishes its offer (every ``refresh`` seconds, at
once when its price moves by more than a step, never faster than validators
allow), serves its attestation report and heartbeats its proxies over direct
streams.  :class:`ProxyService` validates offers (the gossip validator *is*
the pure core, so only accepted offers are relayed), fetches and verifies the
reports of attested tiers through the injected
:class:`~market.verify.AttestationVerifier` (without one only tier ``none`` is
accepted), gossips its verdicts, answers match and statistics requests, takes
heartbeats and usage reports, and publishes market statistics.  Which proxies
exist comes from :class:`~market.directory.Directory`.

Records carry wall-clock times (``clock``, default ``time.time``) because they
cross machines; waits use trio's clock.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable

import attrs
import trio

from overlay import wire
from overlay.errors import DecodeError, NodeError
from overlay.gossip import Validation
from overlay.identity import Identity
from overlay.streams import FramedStream

from .core import ProxyCore, endorse
from .directory import Directory
from .pricing import OfferPublisher, PricingPolicy, WorkerProfile
from .protocols import (
    HEARTBEAT_PROTOCOL,
    MATCH_PROTOCOL,
    REPORT_PROTOCOL,
    STATS_PROTOCOL,
    STATS_TOPIC,
    USAGE_PROTOCOL,
    VERDICT_TOPIC,
    MarketOverlay,
    MarketSettings,
    drain,
    offer_topic,
    request,
    to_validation,
)
from .records import (
    ATTESTED_TIERS,
    HeartbeatAck,
    MatchRequest,
    ReportRequest,
    ReportResponse,
    SignedMarketStats,
    SignedOffer,
    SignedVerdict,
    StatsRequest,
    UsageReport,
    WorkerHeartbeat,
    sign_market_stats,
    sign_offer,
)
from .validation import OfferValidator, check_market_stats
from .verify import AttestationVerdict, AttestationVerifier

__all__ = ["ProxyService", "WorkerLoadSample", "WorkerService"]

log = logging.getLogger(__name__)


@attrs.frozen
class WorkerLoadSample:
    """What the worker's engine reports about its load (the shell polls a callable for it)."""

    active: int = 0  # requests running
    queue_tokens: int = 0  # tokens queued
    tok_s: float = 0.0  # current decode speed; 0 = use the offer's measured speed
    mean_duration: float = 0.0  # s per request


class WorkerService:
    """A worker's market presence: its offer on gossip, its attestation report, heartbeats to its proxies."""

    def __init__(
        self,
        overlay: MarketOverlay,
        identity: Identity,
        profile: WorkerProfile,
        policy: PricingPolicy,
        directory: Directory,
        *,
        load: Callable[[], WorkerLoadSample] = WorkerLoadSample,
        report: bytes | None = None,
        settings: MarketSettings | None = None,
        clock: Callable[[], float] = time.time,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.overlay = overlay
        self.identity = identity
        self.directory = directory
        self.ready = ready  # publish only once this holds (a worker behind NAT waits for a relay)
        self.settings = settings or MarketSettings()
        self.clock = clock
        self.load = load
        self.report = report
        self._old_reports: dict[bytes, bytes] = {}  # hash -> report, kept one rotation back
        if report is not None:
            profile = attrs.evolve(profile, attestation_hash=hashlib.sha256(report).digest())
        self.publisher = OfferPublisher(
            profile, policy, refresh=self.settings.refresh, lifetime=self.settings.lifetime
        )
        self.validator = OfferValidator()
        self.topic = offer_topic(profile.model_id)
        self.published = 0
        self.heartbeats_acked = 0
        self._acked = trio.Event()  # set (and replaced) at every acknowledged heartbeat
        self._rtt_ms: dict[str, float] = {}
        self._wake = trio.Event()

    def _validate(self, origin: str, data: bytes) -> Validation:
        try:
            rec = wire.decode_as(SignedOffer, data)
        except DecodeError:
            return Validation.REJECT
        return to_validation(self.validator.validate(rec, self.clock(), origin))

    async def _serve_report(self, stream: FramedStream) -> None:
        req = await stream.receive()
        if not isinstance(req, ReportRequest):
            await stream.send(wire.ErrorFrame("bad_request", "expected ReportRequest"))
            return
        report = self.report
        if report is None or hashlib.sha256(report).digest() != req.report_hash:
            report = self._old_reports.get(req.report_hash)
        if report is None:
            await stream.send(wire.ErrorFrame("not_found", "no report with that hash"))
            return
        await stream.send(ReportResponse(report))

    def set_report(self, report: bytes) -> None:
        """Serve a new attestation report (rotated keys) and re-publish the offer naming it at once.

        The previous report is still served, so clients holding an offer that names it can finish.
        """
        if self.report is not None:
            self._old_reports = {hashlib.sha256(self.report).digest(): self.report}
        self.report = report
        profile = attrs.evolve(self.publisher.profile, attestation_hash=hashlib.sha256(report).digest())
        self.publisher.update_profile(profile)
        self._wake.set()

    def set_addrs(self, addrs: tuple[str, ...]) -> None:
        """Offers name these addresses from now on (our reachability or relays changed)."""
        profile = self.publisher.profile
        if addrs != profile.addrs:
            self.publisher.update_profile(attrs.evolve(profile, addrs=addrs))
            self._wake.set()

    async def publish_now(self) -> bool:
        """Publish a fresh offer if one is due (refresh, price move); returns whether it did."""
        if not self.ready():
            return False
        sample = self.load()
        body = self.publisher.tick(self.clock(), active=sample.active, queue_tokens=sample.queue_tokens)
        if body is None:
            return False
        await self.overlay.publish(self.topic, wire.encode(sign_offer(self.identity, body)))
        self.published += 1
        log.debug("published offer seqno %d", body.seqno, extra={"peer_id": self.identity.peer_id})
        return True

    async def withdraw(self) -> None:
        """Publish a capacity-0 offer: proxies drop this worker at once."""
        body = self.publisher.withdraw(self.clock())
        await self.overlay.publish(self.topic, wire.encode(sign_offer(self.identity, body)))

    async def wait_heartbeats_acked(self, n: int = 1) -> None:
        """Wait until proxies acknowledged ``n`` heartbeats in all (bound it with trio.fail_after)."""
        while self.heartbeats_acked < n:
            await self._acked.wait()

    def nudge(self) -> None:
        """Check the price now (the engine's load changed a lot)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.overlay.set_stream_handler(REPORT_PROTOCOL, self._serve_report)
        sub = await self.overlay.subscribe(self.topic, self._validate)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, sub)
            nursery.start_soon(self._heartbeats)
            task_status.started()
            while True:
                await self.publish_now()
                with trio.move_on_after(self.settings.tick):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _heartbeats(self) -> None:
        """Keep one heartbeat stream to each of our proxies; re-pick them when the set changes.

        Around epoch boundaries that includes the outgoing and incoming proxies
        (:meth:`Directory.handover_proxies`), so the new ones know our load when their epoch begins.
        """
        running: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while True:
                changed = self.directory.changed
                wanted = {
                    p.peer_id: p
                    for p in self.directory.handover_proxies(
                        self.identity.peer_id, self.settings.proxies_per_node
                    )
                }
                for peer in [p for p in running if p not in wanted]:
                    running.pop(peer).cancel()
                for peer, ref in wanted.items():
                    if peer not in running:
                        scope = trio.CancelScope()
                        running[peer] = scope
                        nursery.start_soon(self._heartbeat_one, ref.peer_id, ref.addrs, scope, running)
                with trio.move_on_after(self.settings.tick):
                    await changed.wait()  # a new epoch or new candidacies: look again at once

    async def _heartbeat_one(
        self, peer: str, addrs: tuple[str, ...], scope: trio.CancelScope, running: dict[str, trio.CancelScope]
    ) -> None:
        with scope:
            try:
                stream = await self.overlay.open_stream(peer, HEARTBEAT_PROTOCOL, addrs=addrs)
                seqno = 0
                try:
                    while True:
                        seqno += 1
                        s = self.load()
                        hb = WorkerHeartbeat(
                            seqno, s.active, self.publisher.profile.capacity, s.queue_tokens, s.tok_s,
                            s.mean_duration, self._rtt_ms.get(peer, 0.0), self.clock(),
                        )  # fmt: skip
                        sent = trio.current_time()
                        ack = await stream.request(hb, HeartbeatAck, self.settings.request_timeout)
                        if ack.seqno == seqno:
                            self._rtt_ms[peer] = (trio.current_time() - sent) * 1000
                            self.heartbeats_acked += 1
                            self._acked.set()
                            self._acked = trio.Event()
                        await trio.sleep(self.settings.heartbeat)
                finally:
                    await stream.aclose()
            except NodeError as e:
                log.info("heartbeat to %s failed: %s", peer, e, extra={"peer_id": peer})
        if running.get(peer) is scope:
            del running[peer]  # picked again (or another proxy) at the next round


class ProxyService:
    """An elected (or candidate) proxy: offer book, verification, matching, statistics."""

    def __init__(
        self,
        overlay: MarketOverlay,
        identity: Identity,
        directory: Directory,
        *,
        models: tuple[str, ...] = (),
        verifier: AttestationVerifier | None = None,
        core: ProxyCore | None = None,
        settings: MarketSettings | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.overlay = overlay
        self.identity = identity
        self.directory = directory
        self.verifier = verifier
        self.core = core or ProxyCore(attested_tiers=verifier is not None)
        self.settings = settings or MarketSettings()
        self.clock = clock
        self.rng = rng or random.Random()
        self.models: set[str] = set()
        self._initial_models = models
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self.stats_seen: dict[tuple[str, str], SignedMarketStats] = {}  # (proxy, model) -> latest

    # ---- gossip validators (the cores decide; side effects happen once per message)

    def _validate_offer(self, origin: str, data: bytes) -> Validation:
        try:
            rec = wire.decode_as(SignedOffer, data)
        except DecodeError:
            return Validation.REJECT
        outcome = self.core.receive_offer(rec, self.clock(), origin)
        if outcome.accepted:
            self._notify()
        return to_validation(outcome)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checked after every accepted offer, verdict or heartbeat."""
        while not predicate():
            await self._changed.wait()

    def _validate_verdict(self, origin: str, data: bytes) -> Validation:
        try:
            rec = wire.decode_as(SignedVerdict, data)
        except DecodeError:
            return Validation.REJECT
        now = self.clock()
        peer = rec.body.proxy_peer_id
        trusted = peer == self.identity.peer_id or self.directory.is_active_proxy(peer, now)
        outcome = self.core.receive_verdict(rec, now, origin, trusted=trusted)
        if outcome.accepted:
            self._notify()
        return to_validation(outcome)

    def _validate_stats(self, origin: str, data: bytes) -> Validation:
        try:
            rec = wire.decode_as(SignedMarketStats, data)
        except DecodeError:
            return Validation.REJECT
        outcome = check_market_stats(rec, self.clock())
        if outcome.accepted:
            self.stats_seen[(rec.body.proxy_peer_id, rec.body.model_id)] = rec
        return to_validation(outcome)

    async def add_model(self, model_id: str) -> None:
        """Keep a book for ``model_id`` (subscribe to its offer topic)."""
        if model_id in self.models or self._nursery is None:
            return
        self.models.add(model_id)
        sub = await self.overlay.subscribe(offer_topic(model_id), self._validate_offer)
        self._nursery.start_soon(drain, sub)

    # ---- stream handlers

    async def _serve_match(self, stream: FramedStream) -> None:
        async for msg in stream:
            if isinstance(msg, MatchRequest):
                if msg.model_id not in self.models:
                    await self.add_model(msg.model_id)  # the book fills within one refresh period
                await stream.send(self.core.match(msg, self.clock(), self.rng))
            else:
                await stream.send(wire.ErrorFrame("bad_request", "expected MatchRequest"))
                return

    async def _serve_stats(self, stream: FramedStream) -> None:
        msg = await stream.receive()
        if not isinstance(msg, StatsRequest):
            await stream.send(wire.ErrorFrame("bad_request", "expected StatsRequest"))
            return
        await stream.send(self.stats(msg.model_id))

    async def _serve_heartbeats(self, stream: FramedStream) -> None:
        async for msg in stream:
            if not isinstance(msg, WorkerHeartbeat):
                await stream.send(wire.ErrorFrame("bad_request", "expected WorkerHeartbeat"))
                return
            self.core.heartbeat(stream.peer_id, msg, self.clock())
            self._notify()
            await stream.send(HeartbeatAck(msg.seqno))

    async def _serve_usage(self, stream: FramedStream) -> None:
        msg = await stream.receive()
        if isinstance(msg, UsageReport):
            self.core.usage(msg, self.clock())
            self._notify()

    # ---- periodic work

    def stats(self, model_id: str) -> SignedMarketStats:
        body = self.core.stats(
            model_id, self.clock(), proxy_peer_id=self.identity.peer_id, proxy_key=self.identity.public_key
        )
        return sign_market_stats(self.identity, body)

    async def verify_pending(self) -> int:
        """Fetch and verify the attestation reports of offers waiting for a verdict; returns how many."""
        done = 0
        for rec in self.core.pending_verifications():
            if self.verifier is None or rec.body.tier not in ATTESTED_TIERS:
                self.core.verified(rec)
                continue
            o = rec.body
            try:
                resp = await request(
                    self.overlay, o.peer_id, REPORT_PROTOCOL, ReportRequest(o.attestation_hash),
                    ReportResponse, addrs=o.addrs, timeout=self.settings.verify_timeout,
                )  # fmt: skip
            except NodeError as e:
                log.info("no attestation report from %s: %s", o.peer_id, e, extra={"peer_id": o.peer_id})
                continue  # retried at the next sweep while the offer lives
            now = self.clock()
            if hashlib.sha256(resp.report).digest() != o.attestation_hash:
                result = _hash_mismatch(now)
            else:
                result = self.verifier.verify(resp.report, now=now, peer_id=o.peer_id)
            verdict = endorse(self.identity, o, result, now)
            if self.directory.is_active_proxy(self.identity.peer_id, now):
                # Before keeping it ourselves: our own validator sees our publish (a known
                # verdict would be IGNOREd as a duplicate and never sent).
                await self.overlay.publish(VERDICT_TOPIC, wire.encode(verdict))
            self.core.receive_verdict(verdict, now, None, trusted=True)
            self.core.verified(rec)
            self._notify()
            done += 1
        return done

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for proto, handler in (
            (MATCH_PROTOCOL, self._serve_match),
            (STATS_PROTOCOL, self._serve_stats),
            (HEARTBEAT_PROTOCOL, self._serve_heartbeats),
            (USAGE_PROTOCOL, self._serve_usage),
        ):
            self.overlay.set_stream_handler(proto, handler)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for topic, validator in (
                (VERDICT_TOPIC, self._validate_verdict),
                (STATS_TOPIC, self._validate_stats),
            ):
                nursery.start_soon(drain, await self.overlay.subscribe(topic, validator))
            for m in self._initial_models:
                await self.add_model(m)
            task_status.started()
            next_stats = trio.current_time() + self.settings.stats_every
            while True:
                if self.core.tick(self.clock()):
                    self._notify()
                await self.verify_pending()
                if trio.current_time() >= next_stats:
                    next_stats += self.settings.stats_every
                    if self.directory.is_active_proxy(self.identity.peer_id, self.clock()):
                        for m in sorted(self.models):
                            await self.overlay.publish(STATS_TOPIC, wire.encode(self.stats(m)))
                await trio.sleep(self.settings.tick)


def _hash_mismatch(now: float) -> AttestationVerdict:
    return AttestationVerdict(
        report_hash=b"", ok=False, reason="report_hash_mismatch", detail="the worker served another report",
        tier="none", peer_id="", status="", measurement=b"", model_hash=b"", epoch=-1,
        verified_at=now, expires_at=now + 60.0,
    )  # fmt: skip
