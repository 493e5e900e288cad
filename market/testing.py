"""Deterministic builders for market records: used by tests, the simulator and the benchmark.

Everything here is real: real Ed25519 keys (derived from small integers so runs
repeat), real signatures, real encodings.  :class:`MemoSignatures` memoizes
signature checks so the thousand nodes of a simulation do not verify the same
record a thousand times; it returns exactly what the real check returns.
"""

from __future__ import annotations

import functools
import hashlib

from overlay.identity import Identity

from .records import (
    Candidacy,
    Offer,
    SignedCandidacy,
    SignedOffer,
    SignedRecord,
    sign_candidacy,
    sign_offer,
    signature_valid,
)
from .validation import StakeTable

__all__ = [
    "MODEL_HASH",
    "MemoSignatures",
    "fixed_epoch_seed",
    "make_candidacy",
    "make_offer",
    "offer_body",
    "seeded_identity",
    "ton_address",
]

MODEL_HASH = hashlib.sha256(b"tiny-model").digest()


@functools.lru_cache(maxsize=8192)
def seeded_identity(n: int, domain: str = "node") -> Identity:
    """The ``n``-th deterministic identity of a domain ("node", "stake", ...)."""
    return Identity.from_seed(hashlib.sha256(f"cocoon-market-test/{domain}/{n}".encode()).digest())


def fixed_epoch_seed(epoch: int) -> bytes:
    """The epoch seed used in tests (a real node asks its chain backend)."""
    return hashlib.sha256(b"cocoon-test-epoch-seed" + epoch.to_bytes(8, "big", signed=True)).digest()


def ton_address(key: bytes) -> str:
    """A stand-in textual TON address for a stake key (the real one comes from the chain backend)."""
    return "0:" + hashlib.sha256(b"wallet" + key).hexdigest()


def offer_body(
    ident: Identity,
    *,
    now: float,
    model_id: str = "tiny",
    price_prompt: int = 100,
    price_completion: int = 400,
    capacity: int = 4,
    seqno: int = 1,
    lifetime: float = 600.0,
    tier: str = "none",
    attestation_hash: bytes = b"",
    decode_tok_s: float = 50.0,
    max_context: int = 2048,
    addrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/4001",),
) -> Offer:
    return Offer(
        worker_key=ident.public_key,
        peer_id=ident.peer_id,
        addrs=addrs,
        model_id=model_id,
        model_hash=MODEL_HASH,
        price_prompt=price_prompt,
        price_completion=price_completion,
        capacity=capacity,
        max_context=max_context,
        decode_tok_s=decode_tok_s,
        tier=tier,
        attestation_hash=attestation_hash,
        seqno=seqno,
        issued_at=now,
        expires_at=now + lifetime,
    )


def make_offer(ident: Identity, **kwargs: object) -> SignedOffer:
    """``sign_offer(ident, offer_body(ident, **kwargs))``."""
    return sign_offer(ident, offer_body(ident, **kwargs))  # type: ignore[arg-type]


def make_candidacy(
    ident: Identity,
    stake: Identity,
    *,
    epoch: int,
    now: float,
    amount: int = 1000,
    operator: str | None = None,
    stakes: StakeTable | None = None,
    lifetime: float = 900.0,
    report_stake: int | None = None,
    addrs: tuple[str, ...] | None = None,
) -> SignedCandidacy:
    """A signed candidacy; registers the stake key and ``report_stake`` (default ``amount``) in ``stakes``."""
    address = ton_address(stake.public_key)
    if stakes is not None:
        stakes.set_key(address, stake.public_key)
        stakes.set_stake(address, epoch, amount if report_stake is None else report_stake)
    body = Candidacy(
        candidate_key=ident.public_key,
        peer_id=ident.peer_id,
        addrs=addrs if addrs is not None else (f"/ip4/127.0.0.1/tcp/{4000 + ident.public_key[0]}",),
        operator=operator if operator is not None else address,
        stake_address=address,
        stake_key=stake.public_key,
        stake_amount=amount,
        epoch=epoch,
        issued_at=now,
        expires_at=now + lifetime,
    )
    return sign_candidacy(ident, stake, body)


class MemoSignatures:
    """``signature_valid`` with a cache keyed by the record itself (same answers, each record checked once).

    Records are frozen and hashable, and a forgery differs from the genuine record
    in some field, so it gets its own entry and its own (failing) check.
    """

    def __init__(self, maxsize: int = 1 << 18) -> None:
        self.maxsize = maxsize
        self._cache: dict[SignedRecord, bool] = {}
        self.calls = 0
        self.checked = 0

    def __call__(self, record: SignedRecord) -> bool:
        self.calls += 1
        hit = self._cache.get(record)
        if hit is not None:
            return hit
        self.checked += 1
        ok = signature_valid(record)
        if len(self._cache) >= self.maxsize:
            self._cache.clear()
        self._cache[record] = ok
        return ok
