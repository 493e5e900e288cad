"""Names and plumbing the market's trio shells share: topics, protocol ids, the overlay they need.

Topics (gossipsub; validators are the pure cores, so only ACCEPTed records are relayed)::

    /cocoon/offers/1/<model_id>   SignedOffer        workers publish; proxies and that model's workers relay
    /cocoon/proxies/1             SignedCandidacy    proxy candidates publish; every node listens
    /cocoon/verdicts/1            SignedVerdict      elected proxies publish attestation verdicts
    /cocoon/market-stats/1        SignedMarketStats  elected proxies publish per-model statistics

Protocols (direct streams, one wire message per frame)::

    /cocoon/market/match/1        MatchRequest -> MatchResponse           client -> proxy
    /cocoon/market/stats/1        StatsRequest -> SignedMarketStats       client -> proxy
    /cocoon/market/heartbeat/1    WorkerHeartbeat -> HeartbeatAck, ...    worker -> its 3 proxies
    /cocoon/market/usage/1        UsageReport (one way)                   client -> proxy
    /cocoon/market/report/1       ReportRequest -> ReportResponse         proxy or client -> worker

DHT: candidacies under ``/cocoon-cand/<epoch>/<peer id>``, their candidates as
providers of ``cocoon-proxies/<epoch>``, so a node that joins late finds them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import attrs
import trio

from overlay.errors import TimeoutError_
from overlay.gossip import Validation
from overlay.streams import FramedStream

from .validation import Decision, Outcome

__all__ = [
    "CANDIDACY_NAMESPACE",
    "CANDIDACY_TOPIC",
    "HEARTBEAT_PROTOCOL",
    "MATCH_PROTOCOL",
    "REPORT_PROTOCOL",
    "STATS_PROTOCOL",
    "STATS_TOPIC",
    "USAGE_PROTOCOL",
    "VERDICT_TOPIC",
    "DhtLike",
    "GossipMessageLike",
    "MarketOverlay",
    "MarketSettings",
    "ProviderLike",
    "candidacy_key",
    "drain",
    "offer_topic",
    "providers_key",
    "request",
    "to_validation",
]

_M = TypeVar("_M")
StreamHandler = Callable[[FramedStream], Awaitable[None]]

MATCH_PROTOCOL = "/cocoon/market/match/1"
STATS_PROTOCOL = "/cocoon/market/stats/1"
HEARTBEAT_PROTOCOL = "/cocoon/market/heartbeat/1"
USAGE_PROTOCOL = "/cocoon/market/usage/1"
REPORT_PROTOCOL = "/cocoon/market/report/1"
CANDIDACY_TOPIC = "/cocoon/proxies/1"
VERDICT_TOPIC = "/cocoon/verdicts/1"
STATS_TOPIC = "/cocoon/market-stats/1"
CANDIDACY_NAMESPACE = "cocoon-cand"


def offer_topic(model_id: str) -> str:
    return f"/cocoon/offers/1/{model_id}"


def candidacy_key(epoch: int, peer_id: str) -> str:
    return f"/{CANDIDACY_NAMESPACE}/{epoch}/{peer_id}"


def providers_key(epoch: int) -> str:
    return f"cocoon-proxies/{epoch}"


class GossipMessageLike(Protocol):
    @property
    def data(self) -> bytes: ...


class ProviderLike(Protocol):
    @property
    def peer_id(self) -> str: ...

    @property
    def addrs(self) -> tuple[str, ...]: ...


class DhtLike(Protocol):
    """What the market needs from :class:`overlay.dht.DhtFacade`."""

    def register_namespace(
        self,
        namespace: str,
        check: Callable[[str, bytes], bool],
        select: Callable[[str, list[bytes]], int] | None = None,
    ) -> None: ...

    async def put(self, key: str, value: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def provide(self, key: str) -> bool: ...

    async def find_providers(self, key: str, count: int = 20) -> Sequence[ProviderLike]: ...


class MarketOverlay(Protocol):
    """What the market's shells need from :class:`overlay.host.Overlay`."""

    peer_id: str

    def listen_addrs(self) -> list[str]: ...

    def set_stream_handler(
        self, protocol: str, handler: Callable[[FramedStream], Awaitable[None]]
    ) -> None: ...

    async def open_stream(
        self, peer_id: str, protocol: str, *, addrs: tuple[str, ...] = ()
    ) -> FramedStream: ...

    async def subscribe(
        self, topic: str, validator: Callable[[str, bytes], Validation] | None = None
    ) -> AsyncIterator[GossipMessageLike]: ...

    async def publish(self, topic: str, data: bytes) -> None: ...


@attrs.frozen
class MarketSettings:
    """Timings of the market shells.  Units in the comments."""

    refresh: float = 120.0  # s between routine offer re-publishes
    lifetime: float = 600.0  # s an offer lives
    tick: float = 5.0  # s between a worker's price checks and a proxy's sweeps
    heartbeat: float = 1.5  # s between worker heartbeats to each proxy
    stats_every: float = 60.0  # s between a proxy's market statistics
    announce_every: float = 600.0  # s between a candidate's candidacy announcements
    request_timeout: float = 10.0  # s for one request/response
    verify_timeout: float = 10.0  # s to fetch a worker's attestation report
    proxies_per_node: int = 3  # proxies a worker heartbeats and a client asks, in order


def to_validation(outcome: Outcome) -> Validation:
    return {
        Decision.ACCEPT: Validation.ACCEPT,
        Decision.REJECT: Validation.REJECT,
        Decision.IGNORE: Validation.IGNORE,
    }[outcome.decision]


async def drain(sub: AsyncIterator[GossipMessageLike]) -> None:
    """Empty a subscription: the validators already acted on every accepted message (bug B3)."""
    async for _ in sub:
        pass


async def request(
    overlay: MarketOverlay,
    peer_id: str,
    protocol: str,
    msg: object,
    response: type[_M],
    *,
    addrs: tuple[str, ...] = (),
    timeout: float = 10.0,
) -> _M:
    """One request and its typed response on a fresh stream; TimeoutError_ after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        stream = await overlay.open_stream(peer_id, protocol, addrs=addrs)
        try:
            return await stream.request(msg, response, timeout)
        finally:
            await stream.aclose()
    raise TimeoutError_(f"{protocol} to {peer_id} timed out after {timeout} s")
