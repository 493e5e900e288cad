"""Gossip policy, the pure core: validation verdicts, peer penalties, publish pacing.

py-libp2p's topic validators return a bool and its peer scoring is off by
default, so the decisions that gossipsub v1.1 calls ACCEPT / REJECT / IGNORE
and the penalties of peers that forward invalid messages live here.  A REJECT
costs the forwarder a penalty point; at ``ban_after`` points the shell
blacklists it.  :class:`PublishPacer` is a token bucket that keeps our own
publishes under the rate at which py-libp2p's per-peer queues (32 deep) start
dropping silently (bug B3).
"""

from __future__ import annotations

import enum

__all__ = ["PeerPenalties", "PublishPacer", "Validation"]


class Validation(enum.Enum):
    """What an application validator decides about one gossip message."""

    ACCEPT = "accept"  # deliver and forward
    REJECT = "reject"  # drop; the forwarding peer is penalised (invalid signature, schema)
    IGNORE = "ignore"  # drop quietly (stale, duplicate, rate-limited): not the peer's fault


class PeerPenalties:
    """Counts REJECTs per forwarding peer; decays one point per ``decay_s`` seconds."""

    def __init__(self, ban_after: int = 20, decay_s: float = 60.0) -> None:
        self.ban_after = ban_after
        self.decay_s = decay_s
        self._points: dict[str, tuple[float, float]] = {}  # peer -> (points, at)

    def _current(self, peer: str, now: float) -> float:
        points, at = self._points.get(peer, (0.0, now))
        return max(0.0, points - (now - at) / self.decay_s)

    def penalise(self, peer: str, now: float, points: float = 1.0) -> bool:
        """Add ``points``; True when the peer just crossed the ban threshold."""
        before = self._current(peer, now)
        after = before + points
        self._points[peer] = (after, now)
        return before < self.ban_after <= after

    def score(self, peer: str, now: float) -> float:
        """Penalty points now (0 is a clean peer)."""
        return self._current(peer, now)

    def banned(self, peer: str, now: float) -> bool:
        return self._current(peer, now) >= self.ban_after


class PublishPacer:
    """Token bucket: ``rate`` publishes per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next publish (0 = now); takes the token."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate
