"""The network context's background jobs, in virtual time (trio's autojump clock)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from node.config import NodeConfig
from node.network import EpochSeeds
from node.roles import BALANCE_EVERY, NetworkContext
from overlay.errors import ChainError
from ton.chain import ChainClient
from ton.manager import PaymentManager


class _FlakyChain:
    """get_balance fails ``failures`` times, then answers ``balance``."""

    def __init__(self, failures: int, balance: int) -> None:
        self.failures = failures
        self.balance = balance
        self.calls = 0

    async def get_balance(self, address: str) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise ChainError("connection refused")
        return self.balance


class _Payments:
    address = "0:" + "ab" * 32

    def status_section(self) -> dict[str, object]:
        return {}


async def test_a_chain_that_stops_answering_is_a_warning_once_then_a_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    ctx = NetworkContext(NodeConfig(data_dir=tmp_path))
    chain = _FlakyChain(failures=3, balance=7 * 10**9)
    ctx._chain = cast(ChainClient, cast(Any, chain))
    ctx._payments = cast(PaymentManager, cast(Any, _Payments()))
    ctx.wallet_balance = 5
    caplog.set_level(logging.INFO, logger="node.roles")
    with trio.move_on_after(BALANCE_EVERY * 4.5):
        await ctx._watch_balance()
    assert chain.calls == 4
    assert ctx.wallet_balance == 7 * 10**9
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # three failures in a row: one line
    assert "connection refused" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


class _Seeds:
    def __init__(self) -> None:
        self.asked: list[int] = []

    async def epoch_seed(self, epoch: int, *, epoch_seconds: int = 3600) -> bytes:
        self.asked.append(epoch)
        return epoch.to_bytes(32, "big")


async def test_epoch_seeds_and_status_follow_the_injected_wall_clock(tmp_path: Path) -> None:
    """The node's shells read one injected wall clock: here, 40 days after genesis, whatever
    time.time() says."""
    wall = [40 * 86400.0 + 5]
    ctx = NetworkContext(NodeConfig(data_dir=tmp_path), wall=lambda: wall[0])
    chain = _Seeds()
    seeds = EpochSeeds(cast(ChainClient, cast(Any, chain)), ctx.timings.clock(), wall=ctx.wall)
    epoch = ctx.timings.clock().epoch_of(wall[0])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(seeds.run)
            nursery.cancel_scope.cancel()
    assert seeds.seed(epoch) == (epoch - 3).to_bytes(32, "big")  # seed of E = chain's seed of E - 3
    assert min(chain.asked) == epoch - 5
    ctx._payments = cast(PaymentManager, cast(Any, _Payments()))
    assert ctx.status_section()["epoch"] == epoch
