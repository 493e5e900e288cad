"""Worker reputation kept by each proxy, the pure core.

A proxy records what it observes about each worker: sessions completed,
sessions that failed mid-stream, and the tokens the worker's signed receipts
claimed against the tokens the client reports receiving (and paid for).  Every
counter decays exponentially with a half-life (default one hour), so old
behaviour fades and a reformed worker recovers.

    success = (completed + a) / (completed + failed + a + b)     (a, b: prior, default 1, 1)
    honesty = 1 - 2 x disputed_tokens / (receipted_tokens + t0)    (t0: prior token mass, 1000; >= 0)
    score   = success x honesty                                    in [0, 1]

A worker never seen scores ``a / (a + b)`` (0.5 by default).  The book's
ranking uses ``1 - score``.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["Reputation", "ReputationEntry"]

_LN2 = math.log(2.0)


@attrs.define
class ReputationEntry:
    completed: float = 0.0
    failed: float = 0.0
    receipted: float = 0.0  # tokens the worker's receipts claimed
    disputed: float = 0.0  # |receipted - received| summed over sessions
    at: float = 0.0  # s: when the counters were last decayed


class Reputation:
    """Decaying per-worker counters and the score derived from them."""

    def __init__(
        self,
        *,
        half_life: float = 3600.0,  # s
        prior_success: float = 1.0,  # pseudo-sessions completed
        prior_failure: float = 1.0,  # pseudo-sessions failed
        prior_tokens: float = 1000.0,  # pseudo-tokens receipted honestly
    ) -> None:
        if half_life <= 0:
            raise ValueError("half_life must be positive")
        self.half_life = half_life
        self.prior_success = prior_success
        self.prior_failure = prior_failure
        self.prior_tokens = prior_tokens
        self._entries: dict[str, ReputationEntry] = {}

    def _entry(self, peer_id: str, now: float) -> ReputationEntry:
        e = self._entries.get(peer_id)
        if e is None:
            e = self._entries[peer_id] = ReputationEntry(at=now)
            return e
        if now > e.at:
            f = math.exp(-_LN2 * (now - e.at) / self.half_life)
            e.completed *= f
            e.failed *= f
            e.receipted *= f
            e.disputed *= f
            e.at = now
        return e

    def record_completed(self, peer_id: str, now: float) -> None:
        self._entry(peer_id, now).completed += 1.0

    def record_failed(self, peer_id: str, now: float) -> None:
        """A session failed mid-stream (the worker vanished, timed out or aborted)."""
        self._entry(peer_id, now).failed += 1.0

    def record_receipts(self, peer_id: str, receipted: int, received: int, now: float) -> None:
        """A session's receipts claimed ``receipted`` tokens; the client received (and paid) ``received``."""
        e = self._entry(peer_id, now)
        e.receipted += max(receipted, 0)
        e.disputed += abs(max(receipted, 0) - max(received, 0))

    def score(self, peer_id: str, now: float) -> float:
        """The worker's reputation in [0, 1] (does not mutate the counters)."""
        e = self._entries.get(peer_id)
        a, b = self.prior_success, self.prior_failure
        if e is None:
            return a / (a + b)
        f = math.exp(-_LN2 * max(0.0, now - e.at) / self.half_life)
        completed, failed = e.completed * f, e.failed * f
        success = (completed + a) / (completed + failed + a + b)
        disputed, receipted = e.disputed * f, e.receipted * f
        honesty = max(0.0, 1.0 - 2.0 * disputed / (receipted + self.prior_tokens))
        return max(0.0, min(1.0, success * honesty))

    def entry(self, peer_id: str) -> ReputationEntry | None:
        return self._entries.get(peer_id)

    def prune(self, now: float, below: float = 0.01) -> int:
        """Forget workers whose every counter decayed below ``below``."""
        gone = []
        for peer, e in self._entries.items():
            f = math.exp(-_LN2 * max(0.0, now - e.at) / self.half_life)
            if max(e.completed, e.failed, e.receipted / self.prior_tokens, e.disputed) * f < below:
                gone.append(peer)
        for peer in gone:
            del self._entries[peer]
        return len(gone)

    def __len__(self) -> int:
        return len(self._entries)
