"""Market records: canonical encoding, signatures, peer ids, decoder robustness."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market import records
from market.records import (
    SignedCandidacy,
    SignedOffer,
    peer_id_matches,
    record_id,
    sign_offer,
    signature_valid,
)
from market.testing import fixed_epoch_seed, make_candidacy, make_offer, offer_body, seeded_identity
from overlay import wire
from overlay.errors import DecodeError, LocalProtocolError

ALICE = seeded_identity(1)
BOB = seeded_identity(2)


def test_market_tags_stay_in_range() -> None:
    mine = {tag: cls for tag, cls in wire.registered().items() if cls.__module__ == "market.records"}
    assert mine, "market records are registered"
    assert all(200 <= tag <= 299 for tag in mine)
    assert set(records.__all__) >= {cls.__name__ for cls in mine.values()}


def test_signed_offer_round_trip_and_verifies() -> None:
    rec = make_offer(ALICE, now=1000.0)
    data = wire.encode(rec)
    back = wire.decode_as(SignedOffer, data)
    assert back == rec
    assert signature_valid(back)
    assert peer_id_matches(back)
    assert record_id(back) == record_id(rec)


def test_tampered_field_breaks_the_signature() -> None:
    rec = make_offer(ALICE, now=1000.0, price_completion=400)
    cheaper = attrs.evolve(rec, body=attrs.evolve(rec.body, price_completion=1))
    assert not signature_valid(cheaper)


def test_offer_signed_by_someone_else_for_alice() -> None:
    # Bob signs an offer claiming Alice's peer id and key: the signature fails.
    body = offer_body(ALICE, now=0.0)
    forged = SignedOffer(body=body, signature=BOB.sign(wire.encode(body)))
    assert not signature_valid(forged)
    # Bob signs with his key but claims Alice's peer id: the peer id check fails.
    body2 = attrs.evolve(offer_body(BOB, now=0.0), peer_id=ALICE.peer_id)
    assert signature_valid(sign_offer(BOB, body2))
    assert not peer_id_matches(sign_offer(BOB, body2))


def test_signature_does_not_transfer_between_record_types() -> None:
    cand = make_candidacy(ALICE, seeded_identity(1, "stake"), epoch=3, now=0.0)
    assert signature_valid(cand)
    # The same signature bytes on an offer body never verify (the tag is inside the signed bytes).
    offer = SignedOffer(body=offer_body(ALICE, now=0.0), signature=cand.signature)
    assert not signature_valid(offer)


def test_candidacy_needs_both_signatures() -> None:
    stake = seeded_identity(1, "stake")
    cand = make_candidacy(ALICE, stake, epoch=3, now=0.0)
    assert signature_valid(cand)
    wrong_stake = attrs.evolve(cand, stake_signature=BOB.sign(wire.encode(cand.body)))
    assert not signature_valid(wrong_stake)
    assert fixed_epoch_seed(3) != fixed_epoch_seed(4)


def test_oversized_fields_cannot_be_encoded() -> None:
    body = attrs.evolve(offer_body(ALICE, now=0.0), addrs=tuple(f"/ip4/1.1.1.{i}/tcp/1" for i in range(9)))
    with pytest.raises(LocalProtocolError):
        wire.encode(body)
    body = attrs.evolve(offer_body(ALICE, now=0.0), model_id="m" * 129)
    with pytest.raises(LocalProtocolError):
        wire.encode(body)


def test_peer_id_check_survives_garbage_keys() -> None:
    body = attrs.evolve(offer_body(ALICE, now=0.0), worker_key=b"\x00" * 31)
    assert not peer_id_matches(SignedOffer(body=body, signature=b"\x00" * 64))
    body = attrs.evolve(offer_body(ALICE, now=0.0), worker_key=b"\xff" * 32)
    assert not peer_id_matches(SignedOffer(body=body, signature=b"\x00" * 64))
    assert not signature_valid(SignedOffer(body=body, signature=b"\x00" * 64))


@settings(max_examples=60, deadline=None)
@given(
    price_prompt=st.integers(0, 10**12),
    price_completion=st.integers(0, 10**12),
    capacity=st.integers(0, 4096),
    seqno=st.integers(0, 2**63),
    now=st.floats(0, 2e9, allow_nan=False),
    model=st.text(min_size=1, max_size=128),
    tok_s=st.floats(0.1, 1e5, allow_nan=False),
)
def test_offer_round_trip_property(
    price_prompt: int, price_completion: int, capacity: int, seqno: int, now: float, model: str, tok_s: float
) -> None:
    rec = make_offer(
        ALICE,
        now=now,
        model_id=model,
        price_prompt=price_prompt,
        price_completion=price_completion,
        capacity=capacity,
        seqno=seqno,
        decode_tok_s=tok_s,
    )
    back = wire.decode(wire.encode(rec))
    assert back == rec
    assert isinstance(back, SignedOffer)
    assert signature_valid(back)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_signed_records_decode_or_fail_cleanly(data: st.DataObject) -> None:
    rec = data.draw(
        st.sampled_from([make_offer(ALICE, now=5.0), make_candidacy(ALICE, BOB, epoch=1, now=5.0)])
    )
    raw = bytearray(wire.encode(rec))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        back = wire.decode(bytes(raw))
    except DecodeError:
        return
    if isinstance(back, SignedOffer | SignedCandidacy) and back != rec:
        # A mutation that still decodes is never accepted as authentic.
        assert not (signature_valid(back) and peer_id_matches(back))


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300), flip=st.integers(0, 64 * 8 - 1), mutate=st.booleans())
def test_libsodium_verification_agrees_with_openssl(data: bytes, flip: int, mutate: bool) -> None:
    from market.records import verify_signature
    from overlay.identity import verify_signature as openssl_verify

    sig = bytearray(ALICE.sign(data))
    if mutate:
        sig[flip // 8] ^= 1 << (flip % 8)
    expected = openssl_verify(ALICE.public_key, bytes(sig), data)
    assert verify_signature(ALICE.public_key, bytes(sig), data) == expected
    assert expected == (not mutate)
    assert not verify_signature(ALICE.public_key[:31], bytes(sig), data)
    assert not verify_signature(b"\x00" * 32, bytes(sig), data)  # a small-order key never verifies
