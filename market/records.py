"""Market wire messages (tags 200-299) and their signatures.

Signed records are a body struct plus the issuer's Ed25519 signature over
``wire.encode(body)``, the canonical encoding (which starts with the body's tag,
so a signature over one record type never verifies as another)::

    SignedOffer      = Offer      + signature by the worker's key
    SignedCandidacy  = Candidacy  + signature by the candidate's key
                                  + stake_signature by the TON stake address's key
    SignedVerdict    = Verdict    + signature by the verifying proxy's key
    SignedMarketStats= MarketStats+ signature by the publishing proxy's key

Every body carries the raw 32-byte public key of its issuer and the peer id it
claims; :func:`peer_id_matches` checks the two agree.  Unsigned messages
(heartbeats, match requests) travel only over direct, Noise-authenticated
streams, where the stream's peer id names the sender.

Units: prices are nanoTON per token; times are seconds (unix time in a real
node, virtual time in simulations); token rates are tokens per second.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import TypeAlias

import attrs
import nacl.bindings
import nacl.exceptions

from overlay import wire
from overlay.identity import Identity, peer_id_from_public_key

__all__ = [
    "ATTESTED_TIERS",
    "TIER_RANK",
    "TIERS",
    "Candidacy",
    "HeartbeatAck",
    "MarketStats",
    "MatchRequest",
    "MatchResponse",
    "Offer",
    "ReportRequest",
    "ReportResponse",
    "SignedCandidacy",
    "SignedMarketStats",
    "SignedOffer",
    "SignedRecord",
    "SignedVerdict",
    "StatsRequest",
    "UsageReport",
    "Verdict",
    "SignatureCheck",
    "Verify",
    "WorkerHeartbeat",
    "issuer_key",
    "peer_id_matches",
    "record_id",
    "sign_candidacy",
    "sign_market_stats",
    "sign_offer",
    "sign_verdict",
    "signature_valid",
    "tier_rank",
    "verify_signature",
]

#: Confidentiality tiers, weakest first; a client's minimum tier admits every tier of equal or higher rank.
TIERS = ("none", "sev-snp", "tdx")
TIER_RANK = {"none": 0, "sev-snp": 1, "tdx": 1}
#: Tiers whose claim must be backed by a verified attestation report.
ATTESTED_TIERS = frozenset({"sev-snp", "tdx"})

_KEY = 32  # bytes: raw Ed25519 public key
_SIG = 64  # bytes: Ed25519 signature
_HASH = 32  # bytes: SHA-256 digest
_PEER = 64  # characters: base58 peer id (52 for Ed25519 keys)
_ADDR = 256  # characters: one multiaddr
_ADDRS = 8  # multiaddrs per record
_MODEL = 128  # characters: model id
_TON_ADDR = 96  # characters: a TON address in any textual form
_MAX_RESULTS = 8  # offers per match response


def _w(*, max_len: int | None = None, max_items: int | None = None) -> dict[str, dict[str, int]]:
    """Wire limits as attrs metadata (``attrs.field(metadata=_w(...))`` keeps mypy's attrs plugin exact)."""
    meta = {}
    if max_len is not None:
        meta["max_len"] = max_len
    if max_items is not None:
        meta["max_items"] = max_items
    return {"wire": meta}


@functools.lru_cache(maxsize=65536)
def _peer_id_of(public_key: bytes) -> str | None:
    try:
        return peer_id_from_public_key(public_key)
    except Exception:  # wrong length or not a curve point
        return None


def tier_rank(tier: str) -> int:
    """The rank of a tier; unknown tiers rank below ``none`` (-1) so they never satisfy a minimum."""
    return TIER_RANK.get(tier, -1)


# --------------------------------------------------------------------------- offers


@wire.message(200)
@attrs.frozen
class Offer:
    """A worker's standing offer to serve one model at a price (the signed body)."""

    worker_key: bytes = attrs.field(metadata=_w(max_len=_KEY))  # raw Ed25519 public key of the worker
    # the worker's libp2p peer id (derived from worker_key)
    peer_id: str = attrs.field(metadata=_w(max_len=_PEER))
    addrs: tuple[str, ...] = attrs.field(metadata=_w(max_items=_ADDRS, max_len=_ADDR))  # multiaddrs to dial
    model_id: str = attrs.field(metadata=_w(max_len=_MODEL))  # model name, e.g. "smollm2-135m-instruct-q4_1"
    # SHA-256 of weights + tokenizer + chat template
    model_hash: bytes = attrs.field(metadata=_w(max_len=_HASH))
    price_prompt: int  # nanoTON per prompt token
    price_completion: int  # nanoTON per completion token
    capacity: int  # concurrent requests; 0 withdraws the offer
    max_context: int  # tokens
    decode_tok_s: float  # measured decode speed, tokens/s
    tier: str = attrs.field(metadata=_w(max_len=16))  # one of TIERS
    # SHA-256 of the attestation report (b"" or a tier-none report carrying the sealing keys)
    attestation_hash: bytes = attrs.field(metadata=_w(max_len=_HASH))
    seqno: int  # strictly increasing per worker (a millisecond timestamp survives restarts)
    issued_at: float  # seconds
    expires_at: float  # seconds
    # the engine serving it: cpu | cuda | exllamav2 | exllamav3 ("" from workers before it was added;
    # last and defaulted, so those offers still decode and verify)
    engine: str = attrs.field(default="", metadata=_w(max_len=16))


@wire.message(201)
@attrs.frozen
class SignedOffer:
    body: Offer
    signature: bytes = attrs.field(metadata=_w(max_len=_SIG))


# --------------------------------------------------------------------------- candidacies


@wire.message(202)
@attrs.frozen
class Candidacy:
    """A node's bid to be elected proxy for one epoch (the signed body)."""

    candidate_key: bytes = attrs.field(metadata=_w(max_len=_KEY))  # raw Ed25519 public key of the candidate
    peer_id: str = attrs.field(metadata=_w(max_len=_PEER))
    addrs: tuple[str, ...] = attrs.field(metadata=_w(max_items=_ADDRS, max_len=_ADDR))
    # who runs it (payout address); at most 2 elected each
    operator: str = attrs.field(metadata=_w(max_len=_TON_ADDR))
    stake_address: str = attrs.field(metadata=_w(max_len=_TON_ADDR))  # TON address holding the stake
    stake_key: bytes = attrs.field(metadata=_w(max_len=_KEY))  # Ed25519 key controlling stake_address
    stake_amount: int  # nanoTON, as the chain backend reports it for this epoch
    epoch: int
    issued_at: float  # seconds
    expires_at: float  # seconds


@wire.message(203)
@attrs.frozen
class SignedCandidacy:
    body: Candidacy
    signature: bytes = attrs.field(metadata=_w(max_len=_SIG))  # by candidate_key
    # by stake_key: proves control of stake_address
    stake_signature: bytes = attrs.field(metadata=_w(max_len=_SIG))


# --------------------------------------------------------------------------- verdicts


@wire.message(204)
@attrs.frozen
class Verdict:
    """A proxy's result of verifying a worker's attestation report (the signed body)."""

    proxy_key: bytes = attrs.field(metadata=_w(max_len=_KEY))
    proxy_peer_id: str = attrs.field(metadata=_w(max_len=_PEER))
    worker_peer_id: str = attrs.field(metadata=_w(max_len=_PEER))
    # SHA-256 of the report (= Offer.attestation_hash)
    report_hash: bytes = attrs.field(metadata=_w(max_len=_HASH))
    tier: str = attrs.field(metadata=_w(max_len=16))
    status: str = attrs.field(metadata=_w(max_len=16))  # "ok" or "rejected"
    # e.g. SHA-384 image measurement; b"" if rejected
    measurement: bytes = attrs.field(metadata=_w(max_len=64))
    reason: str = attrs.field(metadata=_w(max_len=128))  # AttestationError.reason when rejected
    verified_at: float  # seconds
    expires_at: float  # seconds


@wire.message(205)
@attrs.frozen
class SignedVerdict:
    body: Verdict
    signature: bytes = attrs.field(metadata=_w(max_len=_SIG))


# --------------------------------------------------------------------------- market statistics


@wire.message(206)
@attrs.frozen
class MarketStats:
    """Per-model market figures a proxy publishes (the signed body); prices in nanoTON per token."""

    proxy_key: bytes = attrs.field(metadata=_w(max_len=_KEY))
    proxy_peer_id: str = attrs.field(metadata=_w(max_len=_PEER))
    model_id: str = attrs.field(metadata=_w(max_len=_MODEL))
    live_offers: int
    capacity: int  # sum of live offers' capacity
    prompt_median: int
    completion_p10: int
    completion_median: int
    completion_p90: int
    fills: int  # matches served in the last window_s
    window_s: float
    at: float  # seconds


@wire.message(207)
@attrs.frozen
class SignedMarketStats:
    body: MarketStats
    signature: bytes = attrs.field(metadata=_w(max_len=_SIG))


# --------------------------------------------------------------------------- direct-stream messages


@wire.message(208)
@attrs.frozen
class WorkerHeartbeat:
    """Worker -> its proxies, every 1-2 s over a direct stream (the stream's peer id names the worker)."""

    seqno: int
    active: int  # requests running now
    max_active: int  # concurrent requests it accepts
    queue_tokens: int  # tokens queued ahead of a new request
    tok_s: float  # current decode speed, tokens/s
    mean_duration: float  # mean request duration, seconds
    rtt_ms: float  # last heartbeat round trip to this proxy, milliseconds
    sent_at: float  # seconds


@wire.message(209)
@attrs.frozen
class HeartbeatAck:
    seqno: int


@wire.message(210)
@attrs.frozen
class MatchRequest:
    """Client -> proxy: find workers for a model under a price cap (nanoTON per token)."""

    request_id: int
    model_id: str = attrs.field(metadata=_w(max_len=_MODEL))
    max_price_prompt: int
    max_price_completion: int
    min_tier: str = attrs.field(metadata=_w(max_len=16))
    count: int  # offers wanted, 1..8
    # workers to skip (failover)
    exclude: tuple[str, ...] = attrs.field(metadata=_w(max_items=32, max_len=_PEER))


@wire.message(211)
@attrs.frozen
class MatchResponse:
    """Proxy -> client: the ranked offers with the proxy's verdicts on their attestation reports."""

    request_id: int
    offers: tuple[SignedOffer, ...] = attrs.field(metadata=_w(max_items=_MAX_RESULTS))
    verdicts: tuple[SignedVerdict, ...] = attrs.field(metadata=_w(max_items=_MAX_RESULTS))
    price_hint: int | None  # cheapest completion price that would have matched, when none did
    reason: str = attrs.field(metadata=_w(max_len=256))


@wire.message(212)
@attrs.frozen
class UsageReport:
    """Client -> proxy after a session: what the worker delivered (feeds reputation)."""

    worker_peer_id: str = attrs.field(metadata=_w(max_len=_PEER))
    completed: bool  # False: the stream failed mid-way
    tokens_received: int
    tokens_receipted: int  # tokens the worker's signed receipts claim


@wire.message(213)
@attrs.frozen
class ReportRequest:
    """Proxy or client -> worker: send the attestation report with this hash."""

    report_hash: bytes = attrs.field(metadata=_w(max_len=_HASH))


@wire.message(214)
@attrs.frozen
class ReportResponse:
    report: bytes = attrs.field(metadata=_w(max_len=60_000))


@wire.message(215)
@attrs.frozen
class StatsRequest:
    """Client -> proxy: the proxy's current statistics for a model (answered with SignedMarketStats)."""

    model_id: str = attrs.field(metadata=_w(max_len=_MODEL))


# --------------------------------------------------------------------------- signing

SignedRecord: TypeAlias = SignedOffer | SignedCandidacy | SignedVerdict | SignedMarketStats


def sign_offer(identity: Identity, body: Offer) -> SignedOffer:
    return SignedOffer(body=body, signature=identity.sign(wire.encode(body)))


def sign_candidacy(identity: Identity, stake: Identity, body: Candidacy) -> SignedCandidacy:
    """Sign with the candidate's identity and with the key that controls the stake address."""
    data = wire.encode(body)
    return SignedCandidacy(body=body, signature=identity.sign(data), stake_signature=stake.sign(data))


def sign_verdict(identity: Identity, body: Verdict) -> SignedVerdict:
    return SignedVerdict(body=body, signature=identity.sign(wire.encode(body)))


def sign_market_stats(identity: Identity, body: MarketStats) -> SignedMarketStats:
    return SignedMarketStats(body=body, signature=identity.sign(wire.encode(body)))


def issuer_key(record: SignedRecord) -> bytes:
    """The raw public key the record's signature must verify under."""
    if isinstance(record, SignedOffer):
        return record.body.worker_key
    if isinstance(record, SignedCandidacy):
        return record.body.candidate_key
    return record.body.proxy_key


def _claimed_peer_id(record: SignedRecord) -> str:
    if isinstance(record, SignedOffer | SignedCandidacy):
        return record.body.peer_id
    return record.body.proxy_peer_id


#: ``verify(public_key, signature, data) -> bool`` (the order of ``overlay.identity.verify_signature``).
Verify = Callable[[bytes, bytes, bytes], bool]


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Ed25519 verification through libsodium (about 2.5x faster here than OpenSSL's).

    Every node checks market records with this one function, so all nodes agree on
    edge cases (libsodium refuses small-order keys and non-canonical signatures),
    which matters for the election: nodes must accept exactly the same candidacies.
    """
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + data, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


#: ``check(record) -> bool``: do a record's signatures verify (``signature_valid``, or a memo of it).
SignatureCheck = Callable[["SignedRecord"], bool]


def signature_valid(record: SignedRecord, verify: Verify = verify_signature) -> bool:
    """The issuer's signature (and, for a candidacy, the stake key's) verifies over the body.

    ``verify`` is injectable so a simulation can memoize it.
    """
    data = wire.encode(record.body)
    if not verify(issuer_key(record), record.signature, data):
        return False
    if isinstance(record, SignedCandidacy):
        return verify(record.body.stake_key, record.stake_signature, data)
    return True


def peer_id_matches(record: SignedRecord) -> bool:
    """The peer id the record claims is the one its issuer key derives."""
    key = issuer_key(record)
    return len(key) == _KEY and _peer_id_of(key) == _claimed_peer_id(record)


def record_id(record: SignedRecord) -> bytes:
    """A stable id for dedup: SHA-256 of the canonical encoding of the whole signed record."""
    return hashlib.sha256(wire.encode(record)).digest()
