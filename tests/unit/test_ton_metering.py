"""Metering cores: pay only for what arrived, credit window, receipts, forwarding fees."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay import wire
from overlay.errors import DecodeError
from ton.keys import KeyPair
from ton.messages import PayState, Receipt, SessionPayment
from ton.metering import (
    Abort,
    Forwarder,
    MeterConfig,
    MeteringError,
    PayerMeter,
    PayFor,
    Prices,
    WorkerMeter,
    sign_receipt,
    token_hash,
)

WK = KeyPair.from_seed(b"w" * 32)
PRICES = Prices(prompt=10, completion=100)
SID = b"s" * 16
DUMMY = PayState(b"\0" * 16, 0, 1, 1, b"\0" * 64)


def payment(tokens: int, prompt: int = 5) -> SessionPayment:
    return SessionPayment(SID, tokens, PRICES.cost(prompt, tokens), DUMMY)


@given(st.lists(st.integers(1, 40), max_size=40), st.lists(st.floats(0, 2), max_size=40))
def test_payer_never_pays_for_tokens_not_received(chunks: list[int], gaps: list[float]) -> None:
    m = PayerMeter(SID, PRICES, 5, WK.public, MeterConfig(), 0.0)
    paid = m.open().amount
    now, received = 0.0, 0
    for i, n in enumerate(chunks):
        now += gaps[i] if i < len(gaps) else 0.1
        received += n
        for e in m.on_tokens(list(range(n)), now) + m.tick(now):
            if isinstance(e, PayFor):
                paid += e.amount
                assert e.tokens <= received
        assert paid <= PRICES.cost(5, received)
        assert received - m.paid_tokens < 32 or now - m.last_pay_at < 0.5
    for e in m.close(now + 1):
        assert isinstance(e, PayFor)
        paid += e.amount
    assert paid == PRICES.cost(5, received)


@given(st.floats(0, 1e7), st.floats(0, 1e7), st.sampled_from([0.0, 0.05]))
def test_time_rule_never_waits_longer_than_pay_every_seconds(t0: float, t1: float, window: float) -> None:
    """Coalesced, the time rule fires on a grid shared by every session (so their payments meet
    in one window); never later than ``pay_every_seconds`` after the last payment."""
    cfg = MeterConfig(pay_every_seconds=0.5, coalesce_window=window)
    a = PayerMeter(SID, PRICES, 5, WK.public, cfg, t0)
    b = PayerMeter(SID, PRICES, 5, WK.public, cfg, t1)
    for m, t in ((a, t0), (b, t1)):
        assert t < m.time_due() <= t + 0.5 + 1e-6 * max(1.0, t)
    if window and abs(t0 - t1) < 0.5 and int(t0 / 0.5) == int(t1 / 0.5):
        assert a.time_due() == b.time_due()  # same grid cell: due together


def test_worker_pauses_at_credit_window_and_aborts_after_timeout() -> None:
    w = WorkerMeter(SID, PRICES, 5, WK, MeterConfig(credit_window=128, receipt_every=64), 0.0)
    assert w.may_send() == 0  # prompt not prepaid yet
    w.on_payment(payment(0), PRICES.cost(5, 0), 0.0)
    receipts = w.on_generated(list(range(128)), 1.0)
    assert [r.receipt.tokens for r in receipts] == [128]
    assert w.may_send() == 0
    with pytest.raises(MeteringError):
        w.on_generated([1], 1.0)
    assert w.tick(5.9) == []
    w.on_payment(payment(64), 64 * 100, 2.0)  # resumes
    assert w.may_send() == 64
    w.on_generated(list(range(64)), 3.0)
    assert w.tick(7.9) == []
    assert w.tick(8.0) == [Abort("unpaid: credit window exhausted")]
    with pytest.raises(MeteringError):
        w.on_generated([1], 9.0)


def test_worker_refuses_payments_that_do_not_add_up() -> None:
    w = WorkerMeter(SID, PRICES, 5, WK, MeterConfig(), 0.0)
    w.on_payment(payment(0), 50, 0.0)
    w.on_generated([1, 2, 3], 0.0)
    with pytest.raises(MeteringError):
        w.on_payment(payment(4), 400, 0.0)  # more tokens than sent
    with pytest.raises(MeteringError):
        w.on_payment(attrs.evolve(payment(3), amount=1), 1, 0.0)  # wrong price
    with pytest.raises(MeteringError):
        w.on_payment(payment(3), 299, 0.0)  # channel credited less than claimed
    with pytest.raises(MeteringError):
        w.on_payment(attrs.evolve(payment(3), session_id=b"x" * 16), 300, 0.0)
    w.on_payment(payment(3), 300, 0.0)
    assert w.paid_amount == PRICES.cost(5, 3)


def test_receipts_checked_against_tokens_received() -> None:
    m = PayerMeter(SID, PRICES, 5, WK.public, MeterConfig(receipt_slack=2), 0.0)
    m.on_tokens([7, 8, 9], 0.1)
    good = sign_receipt(WK, Receipt(SID, 3, token_hash([7, 8, 9]), False, b""))
    assert m.on_receipt(good) == []
    with pytest.raises(MeteringError):
        m.on_receipt(attrs.evolve(good, tokens=2))  # signature no longer matches
    with pytest.raises(MeteringError):
        m.on_receipt(sign_receipt(KeyPair.from_seed(b"x" * 32), good))  # not the worker
    with pytest.raises(MeteringError):
        m.on_receipt(attrs.evolve(good, session_id=b"o" * 16))
    wrong_hash = sign_receipt(WK, Receipt(SID, 3, b"\1" * 32, False, b""))
    assert m.on_receipt(wrong_hash) == [Abort("receipt hash chain does not match the tokens received")]
    m2 = PayerMeter(SID, PRICES, 5, WK.public, MeterConfig(receipt_slack=2), 0.0)
    m2.on_tokens([1], 0.1)
    far = sign_receipt(WK, Receipt(SID, 200, b"\0" * 32, False, b""))
    assert m2.on_receipt(far) == [Abort("receipt claims 200 tokens, 1 arrived")]
    m3 = PayerMeter(SID, PRICES, 5, WK.public, MeterConfig(), 0.0)
    m3.on_tokens([1], 0.1)
    ahead = sign_receipt(WK, Receipt(SID, 3, token_hash([1, 2, 3]), False, b""))
    assert m3.on_receipt(ahead) == []  # overtook its tokens: judged when they arrive
    assert m3.on_tokens([2, 3], 0.2) == []
    m3.on_receipt(sign_receipt(WK, Receipt(SID, 5, b"\0" * 32, False, b"")))
    assert m3.close(1.0) == [Abort("receipt claims 5 tokens, 3 arrived")]  # never arrived


@given(st.binary(max_size=300))
def test_malformed_receipt_bytes_raise_decode_error_only(data: bytes) -> None:
    try:
        wire.decode_as(Receipt, data)
    except DecodeError:
        pass


def test_receipt_with_oversized_fields_is_refused() -> None:
    raw = wire.encode(Receipt(SID, 1, b"\0" * 32, False, b"\0" * 64))
    assert wire.decode_as(Receipt, raw).tokens == 1
    import msgpack

    bad = msgpack.packb([wire.WIRE_VERSION, Receipt.TAG, [SID, 1, b"\0" * 33, False, b"\0" * 64]])
    with pytest.raises(DecodeError):
        wire.decode_as(Receipt, bad)
    bad = msgpack.packb([wire.WIRE_VERSION, Receipt.TAG, [SID, "1", b"\0" * 32, False, b"\0" * 64]])
    with pytest.raises(DecodeError):
        wire.decode_as(Receipt, bad)


def test_forwarder_keeps_its_fee_and_never_fronts() -> None:
    client = Prices(12, 110)
    f = Forwarder(client, PRICES, 5)
    first = f.on_client_payment(SessionPayment(SID, 0, client.cost(5, 0), DUMMY), 60)
    assert first == PayFor(0, 50, 50)
    out = f.on_client_payment(SessionPayment(SID, 32, client.cost(5, 32), DUMMY), 32 * 110)
    assert out == PayFor(32, 3200, 3250)
    assert f.fee == client.cost(5, 32) - PRICES.cost(5, 32)
    with pytest.raises(MeteringError):
        f.on_client_payment(SessionPayment(SID, 40, client.cost(5, 40), DUMMY), 1)
    with pytest.raises(MeteringError):
        Forwarder(Prices(1, 1), PRICES, 5)


def test_payments_are_checked_before_anything_changes() -> None:
    w = WorkerMeter(SID, PRICES, 5, WK, MeterConfig(), 0.0)
    assert w.check_payment(payment(0)) == PRICES.cost(5, 0)
    assert w.paid_amount == 0  # checking changes nothing
    w.on_payment(payment(0), PRICES.cost(5, 0), 0.0)
    w.on_generated([1, 2], 0.0)
    assert w.check_payment(payment(2)) == 2 * PRICES.completion
    w.on_payment(payment(2), 2 * PRICES.completion, 0.0)
    with pytest.raises(MeteringError):
        w.check_payment(payment(1))  # fewer tokens than already paid
    f = Forwarder(Prices(12, 110), PRICES, 5)
    assert f.check_client_payment(SessionPayment(SID, 0, Prices(12, 110).cost(5, 0), DUMMY)) == 60
    assert f.client_paid == 0


def test_receipts_are_judged_on_any_prefix_of_what_arrived() -> None:
    w = WorkerMeter(SID, PRICES, 5, WK, MeterConfig(receipt_every=4), 0.0)
    w.on_payment(payment(0), PRICES.cost(5, 0), 0.0)
    m = PayerMeter(SID, PRICES, 5, WK.public, MeterConfig(), 0.0)
    (r,) = w.on_generated([5, 6, 7, 8], 0.0)
    assert r.receipt.token_hash == token_hash([5, 6, 7, 8])
    m.on_tokens([5, 6, 7, 8, 9, 10], 0.1)  # two more arrived before the receipt did
    assert m.on_receipt(r.receipt) == []
    with pytest.raises(MeteringError):
        m.on_tokens([-1], 0.2)
    with pytest.raises(MeteringError):
        w.on_generated([2**32], 0.2)
