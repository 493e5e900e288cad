"""Logging set-up: every line names the peer (and channel, when there is one).

Modules log with ``extra={"peer_id": ..., "channel_id": ...}``; the filter
fills in this node's own (shortened) peer id where a record names none, so a
devnet's interleaved output stays readable.
"""

from __future__ import annotations

import logging
import os

__all__ = ["ContextFilter", "setup_logging", "short_id"]


def short_id(peer_id: str) -> str:
    """The last 8 characters of a peer id (enough to tell a devnet's nodes apart)."""
    return peer_id[-8:] if peer_id else "-"


class ContextFilter(logging.Filter):
    def __init__(self, own_peer_id: str) -> None:
        super().__init__()
        self.own = short_id(own_peer_id)

    def filter(self, record: logging.LogRecord) -> bool:
        peer = getattr(record, "peer_id", None)
        record.peer = short_id(str(peer)) if peer else self.own
        chan = getattr(record, "channel_id", None)
        record.chan = f" ch={str(chan)[:10]}" if chan else ""
        return True


def setup_logging(level: str, own_peer_id: str) -> None:
    """Log to stderr with peer ids; py-libp2p's own noise stays at CRITICAL unless LIBP2P_DEBUG."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter(own_peer_id))
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(peer)s%(chan)s] %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if not os.environ.get("LIBP2P_DEBUG"):
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
