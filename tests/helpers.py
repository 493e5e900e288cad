"""Helpers shared by the test tiers: start real overlay nodes on loopback."""

from __future__ import annotations

from contextlib import AsyncExitStack

from overlay.host import Overlay, OverlaySettings, open_overlay
from overlay.identity import Identity


async def start_bootstrap(stack: AsyncExitStack, identity: Identity | None = None) -> Overlay:
    """A bootstrap node on 127.0.0.1 (any port)."""
    return await stack.enter_async_context(open_overlay(identity or Identity.generate(), OverlaySettings()))


async def start_nodes(
    stack: AsyncExitStack,
    n: int,
    bootstrap: Overlay,
    *,
    gossip: bool = True,
    dht_mode: str = "server",
) -> list[Overlay]:
    """``n`` nodes that joined through ``bootstrap``.

    Each start is bounded by the overlay's own dial timeout and bootstrap attempts (a
    ``fail_after`` around ``enter_async_context`` would wrap the node's nurseries and
    corrupt trio's cancel-scope stack when it exits first).
    """
    settings = OverlaySettings(
        bootstrap=(bootstrap.listen_addrs()[0],),
        gossip=gossip,
        dht_mode=dht_mode,
        dial_timeout_s=5.0,
        bootstrap_attempts=2,
    )
    nodes = []
    for _ in range(n):
        nodes.append(await stack.enter_async_context(open_overlay(Identity.generate(), settings)))
    return nodes
