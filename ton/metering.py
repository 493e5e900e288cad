"""Per-token metering, pure cores: what is owed, when to pay, when to pause.

Theory of operation. A session is bound to an offer's prices (nanoTON per prompt token and per
completion token). The prompt is prepaid when the session opens. Then:

- the worker (:class:`WorkerMeter`) counts completion tokens it streams, keeps a running hash
  over their ids (:func:`token_hash`: one hash of the id prefix, fed a chunk at a time) and signs
  a :class:`Receipt` every ``receipt_every`` tokens and at the end. It streams
  at most ``credit_window`` unpaid tokens: past it, it pauses (``may_send`` is False) and
  ``tick`` aborts the session after ``pause_timeout`` seconds without payment;
- the payer (:class:`PayerMeter`) counts tokens it actually received and pays (a
  :class:`PayFor` effect) every ``pay_every_tokens`` tokens or ``pay_every_seconds`` seconds,
  never for more tokens than it received. It checks receipts against its own count and hash
  chain and aborts when the worker claims noticeably more than arrived;
- a proxy (:class:`Forwarder`) pays the worker for what the client paid it, at the worker's
  prices, and keeps the difference (its fee). It never pays before it is paid.

Amounts are cumulative per session; the channel core turns them into channel states.
Cores take ``now`` and never read a clock.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import attrs

from overlay import wire
from overlay.errors import ChannelError

from .keys import KeyPair, verify
from .messages import Receipt, SessionPayment

__all__ = [
    "DEFAULT_PRICES",
    "Abort",
    "Forwarder",
    "MeterConfig",
    "MeteringError",
    "PayFor",
    "PayerMeter",
    "Prices",
    "SendReceipt",
    "WorkerMeter",
    "receipt_digest",
    "sign_receipt",
    "token_hash",
]

_TOKEN_TAG = b"cocoon-token-ids-v1"


class MeteringError(ChannelError):
    """A metering message that breaks the session's rules (forged, inflated, out of order)."""


@attrs.frozen
class Prices:
    prompt: int  # nanoTON per prompt token
    completion: int  # nanoTON per completion token

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return prompt_tokens * self.prompt + completion_tokens * self.completion


DEFAULT_PRICES = Prices(prompt=250, completion=1_000)  # nanoTON per token: 1 TON per 1M completion tokens


@attrs.frozen
class MeterConfig:
    receipt_every: int = 128  # completion tokens between worker receipts
    pay_every_tokens: int = 32  # the payer signs a new state every this many tokens...
    pay_every_seconds: float = 0.5  # ...or this often while tokens are unpaid
    credit_window: int = 128  # unpaid tokens the worker streams before pausing
    pause_timeout: float = 5.0  # seconds paused without payment before the worker aborts
    idle_timeout: float = 10.0  # seconds without a token before the payer aborts
    receipt_slack: int = 2  # a receipt may overtake its tokens by max(slack, 1 %, credit window)
    # Seconds a payer's shell waits to put the payments of several sessions on one channel into
    # one signed state (0: a state per payment). With it on, the time rule fires on a grid of
    # ``pay_every_seconds`` shared by every session, so their payments fall into one window.
    coalesce_window: float = 0.05


@attrs.frozen
class PayFor:
    """Pay ``amount`` more nanoTON now; afterwards the session has paid for ``tokens`` tokens."""

    tokens: int
    amount: int
    total: int  # cumulative session amount after this payment


@attrs.frozen
class SendReceipt:
    receipt: Receipt


@attrs.frozen
class Abort:
    reason: str


_U32 = struct.Struct(">I")


def _pack(token_ids: Sequence[int]) -> bytes:
    try:
        if len(token_ids) == 1:  # the common chunk: one token
            return _U32.pack(token_ids[0])
        return struct.pack(f">{len(token_ids)}I", *token_ids)
    except struct.error as e:
        raise MeteringError(f"token ids must be uint32: {e}") from e


def _hasher() -> hashlib.blake2b:
    return hashlib.blake2b(_TOKEN_TAG, digest_size=32)


def token_hash(token_ids: Sequence[int]) -> bytes:
    """What a receipt for these tokens carries: one hash of all their ids (uint32, in order)."""
    h = _hasher()
    h.update(_pack(token_ids))
    return h.digest()


def receipt_digest(r: Receipt) -> bytes:
    body = attrs.evolve(r, signature=b"")
    return hashlib.sha256(b"cocoon-receipt" + wire.encode(body)).digest()


def sign_receipt(key: KeyPair, r: Receipt) -> Receipt:
    return attrs.evolve(r, signature=key.sign(receipt_digest(r)))


class WorkerMeter:
    """The payee's meter for one session."""

    def __init__(
        self,
        session_id: bytes,
        prices: Prices,
        prompt_tokens: int,
        key: KeyPair,
        cfg: MeterConfig,
        now: float,
    ) -> None:
        self.session_id = session_id
        self.prices = prices
        self.prompt_tokens = prompt_tokens
        self.key = key
        self.cfg = cfg
        self.sent = 0  # completion tokens streamed
        self.paid_tokens = 0
        self.paid_amount = 0
        self._ids = _hasher()  # running hash of the ids streamed so far
        self.last_receipt_at = 0
        self.paused_since: float | None = None
        self.last_payment_at = now
        self.aborted = ""
        self._prompt_cost = prices.cost(prompt_tokens, 0)
        self._window = cfg.credit_window
        self._receipt_every = cfg.receipt_every

    @property
    def prompt_paid(self) -> bool:
        return self.paid_amount >= self._prompt_cost

    def may_send(self) -> int:
        """How many more tokens may be streamed now (0: paused)."""
        if self.aborted or self.paid_amount < self._prompt_cost:
            return 0
        return max(0, self.paid_tokens + self._window - self.sent)

    def on_generated(self, token_ids: list[int], now: float) -> list[SendReceipt]:
        if self.aborted:
            raise MeteringError(f"session aborted: {self.aborted}")
        n = len(token_ids)
        left = self.may_send()
        if n > left:
            raise MeteringError("streaming past the credit window")
        self._ids.update(_pack(token_ids))
        self.sent += n
        if n == left and self.paused_since is None:
            self.paused_since = now
        if self.sent - self.last_receipt_at >= self._receipt_every:
            return [SendReceipt(self._receipt(final=False))]
        return []

    def finish(self) -> SendReceipt:
        return SendReceipt(self._receipt(final=True))

    def _receipt(self, *, final: bool) -> Receipt:
        self.last_receipt_at = self.sent
        digest = self._ids.copy().digest()
        return sign_receipt(self.key, Receipt(self.session_id, self.sent, digest, final, b""))

    def check_payment(self, p: SessionPayment) -> int:
        """Validate a payment without changing anything; returns the nanoTON it adds."""
        if p.session_id != self.session_id:
            raise MeteringError("payment for another session")
        if p.tokens < self.paid_tokens or p.tokens > self.sent:
            raise MeteringError(
                f"payment claims {p.tokens} tokens; {self.sent} sent, {self.paid_tokens} paid"
            )
        if p.amount != self.prices.cost(self.prompt_tokens, p.tokens):
            raise MeteringError("payment amount does not match the session's prices")
        if p.amount < self.paid_amount:
            raise MeteringError("session amount went down")
        return p.amount - self.paid_amount

    def on_payment(self, p: SessionPayment, received: int, now: float) -> None:
        """``received`` is what the channel credited to this session for ``p`` (nanoTON)."""
        self.check_payment(p)
        if received != p.amount - self.paid_amount:
            raise MeteringError(f"channel credited {received}, session says {p.amount - self.paid_amount}")
        self.paid_tokens, self.paid_amount = p.tokens, p.amount
        self.last_payment_at = now
        if self.may_send() > 0:
            self.paused_since = None

    def tick(self, now: float) -> list[Abort]:
        if self.aborted:
            return []
        if self.paused_since is not None and now - self.paused_since >= self.cfg.pause_timeout:
            self.aborted = "unpaid"
            return [Abort("unpaid: credit window exhausted")]
        return []


class PayerMeter:
    """The payer's meter for one session: pays only for tokens that arrived."""

    def __init__(
        self,
        session_id: bytes,
        prices: Prices,
        prompt_tokens: int,
        worker_key: bytes,
        cfg: MeterConfig,
        now: float,
    ) -> None:
        self.session_id = session_id
        self.prices = prices
        self.prompt_tokens = prompt_tokens
        self.worker_key = worker_key
        self.cfg = cfg
        self.received = 0
        self.paid_tokens = 0
        self.paid_amount = 0
        self._ids = bytearray()  # the ids received so far, packed (4 bytes each)
        self._running = _hasher()  # their hash, kept up to date
        self.last_pay_at = now
        self._due = self.time_due()  # when the time rule next pays (moves with each payment)
        self.last_token_at = now
        self.aborted = ""
        self.ahead: Receipt | None = None  # a receipt for tokens not arrived yet (other stream)

    def open(self) -> PayFor:
        """The prompt, prepaid before prefill."""
        total = self.prices.cost(self.prompt_tokens, 0)
        self.paid_amount = total
        return PayFor(0, total, total)

    def _pay(self, now: float) -> list[PayFor | Abort]:
        if self.received == self.paid_tokens:
            return []
        total = self.prices.cost(self.prompt_tokens, self.received)
        delta = total - self.paid_amount
        self.paid_tokens, self.paid_amount, self.last_pay_at = self.received, total, now
        self._due = self.time_due()
        return [PayFor(self.received, delta, total)]

    def on_tokens(self, token_ids: list[int], now: float) -> list[PayFor | Abort]:
        if self.aborted:
            return []
        packed = _pack(token_ids)
        self._ids += packed
        self._running.update(packed)
        self.received += len(token_ids)
        self.last_token_at = now
        out: list[PayFor | Abort] = []
        if self.ahead is not None and self.ahead.tokens <= self.received:
            r, self.ahead = self.ahead, None
            out += self._judge(r)
            if out:  # the receipt did not match: aborted
                return out
        unpaid = self.received - self.paid_tokens
        if unpaid >= self.cfg.pay_every_tokens or now >= self._due:
            out += self._pay(now)
        return out

    def time_due(self) -> float:
        """When the time rule next pays: ``pay_every_seconds`` after the last payment, or, when
        payments are coalesced, the first grid point (multiple of ``pay_every_seconds``) after
        it: never later, and every session of a shell reaches it together."""
        every = self.cfg.pay_every_seconds
        if self.cfg.coalesce_window > 0 and every > 0:
            return (math.floor(self.last_pay_at / every) + 1) * every
        return self.last_pay_at + every

    def next_deadline(self) -> float:
        """When :meth:`tick` may next have something to do (a shell sleeps until then): paying
        what is pending once tokens stopped for ``pay_every_seconds``, or the idle abort."""
        idle = self.last_token_at + self.cfg.idle_timeout
        if self.aborted:
            return float("inf")
        if self.received > self.paid_tokens:
            return min(idle, max(self.last_pay_at, self.last_token_at) + self.cfg.pay_every_seconds)
        return idle

    def tick(self, now: float) -> list[PayFor | Abort]:
        if self.aborted:
            return []
        if now - self.last_token_at >= self.cfg.idle_timeout:
            self.aborted = "idle"
            return [Abort("no token for too long")]
        if now >= self._due:
            return self._pay(now)
        return []

    def close(self, now: float) -> list[PayFor | Abort]:
        """Pay for everything received (end of stream)."""
        if self.ahead is not None:
            r, self.ahead = self.ahead, None
            self.aborted = "inflated receipt"
            return [Abort(f"receipt claims {r.tokens} tokens, {self.received} arrived")]
        return self._pay(now)

    def on_receipt(self, r: Receipt) -> list[PayFor | Abort]:
        if r.session_id != self.session_id:
            raise MeteringError("receipt for another session")
        if not verify(self.worker_key, receipt_digest(r), r.signature):
            raise MeteringError("receipt signature does not verify")
        if r.tokens > self.received:
            # Tokens and receipts travel on different streams: a receipt may overtake its
            # tokens a little. Judge it when they arrive; far ahead (or never caught up): abort.
            slack = max(self.cfg.receipt_slack, self.received // 100, self.cfg.credit_window)
            if r.tokens > self.received + slack:
                self.aborted = "inflated receipt"
                return [Abort(f"receipt claims {r.tokens} tokens, {self.received} arrived")]
            self.ahead = r
            return []
        return self._judge(r)

    def _judge(self, r: Receipt) -> list[PayFor | Abort]:
        if r.tokens == self.received:
            digest = self._running.copy().digest()
        else:  # the receipt counts fewer tokens than arrived since: hash that prefix
            h = _hasher()
            h.update(memoryview(self._ids)[: 4 * r.tokens])
            digest = h.digest()
        if r.token_hash != digest:
            self.aborted = "receipt hash"
            return [Abort("receipt hash chain does not match the tokens received")]
        return []


class Forwarder:
    """A proxy's forwarding for one session: client pays at ``client_prices``, the worker is
    paid at ``worker_prices`` for the same tokens; the difference is the proxy's fee."""

    def __init__(self, client_prices: Prices, worker_prices: Prices, prompt_tokens: int) -> None:
        if client_prices.prompt < worker_prices.prompt or client_prices.completion < worker_prices.completion:
            raise MeteringError("the proxy would pay the worker more than the client pays it")
        self.client_prices = client_prices
        self.worker_prices = worker_prices
        self.prompt_tokens = prompt_tokens
        self.client_paid = 0
        self.worker_paid = 0
        self.tokens = -1

    def check_client_payment(self, p: SessionPayment) -> int:
        """Validate a client payment without changing anything; returns the nanoTON it adds."""
        expected = self.client_prices.cost(self.prompt_tokens, p.tokens)
        if p.amount != expected or p.tokens < self.tokens or p.amount < self.client_paid:
            raise MeteringError("client payment does not match the session's prices")
        return p.amount - self.client_paid

    def on_client_payment(self, p: SessionPayment, received: int) -> PayFor:
        """``received`` is what the client's channel credited to this session for ``p``."""
        if received != self.check_client_payment(p):
            raise MeteringError("client payment does not match what the channel credited")
        self.client_paid = p.amount
        self.tokens = p.tokens
        total = self.worker_prices.cost(self.prompt_tokens, p.tokens)
        delta = total - self.worker_paid
        self.worker_paid = total
        return PayFor(p.tokens, delta, total)

    @property
    def fee(self) -> int:
        return self.client_paid - self.worker_paid
