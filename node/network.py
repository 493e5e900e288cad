"""What every role needs from the chain and the market: epochs, seeds, stakes, the directory.

- :func:`open_chain` connects the configured chain backend (the local chain over
  loopback, or TON through lite servers).
- :class:`EpochSeeds` keeps the chain's epoch seeds the proxy election needs
  (seed of epoch ``E`` = the chain's seed of ``E - 3``: the market looks up
  to two epochs ahead, so every node holds a seed one epoch before anyone asks
  for it) and serves them synchronously to the market core.
- :class:`ChainStakes` is the market's stake oracle: a wallet address is
  controlled by a key when it is that key's standard wallet (v4r2 or v5r1), and
  its stake is the balance the chain reports, snapshotted once per epoch.
- :func:`make_directory` builds the market's view of the elected proxies.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from market.core import ElectionView
from market.directory import Candidate, Directory, ProxyRef
from market.election import ElectionParams, EpochClock
from market.protocols import MarketSettings
from overlay.errors import ChainError, ConfigError, MarketError, NodeError
from overlay.host import Overlay
from overlay.identity import Identity
from ton.chain import ChainClient, normalize_address
from ton.keys import KeyPair
from ton.wallets import Wallet, WalletVersion

from .config import NodeConfig

__all__ = [
    "ChainStakes",
    "EpochSeeds",
    "NetworkTimings",
    "make_directory",
    "open_chain",
    "wallet_addresses",
]

log = logging.getLogger(__name__)


@attrs.frozen
class NetworkTimings:
    """Epoch and market timings of a network (short on a devnet, long on a real one)."""

    epoch_seconds: int = 3600  # s per epoch (election, attestation key rotation)
    lead: float = 1800.0  # s before an epoch by which its candidacies must be issued
    overlap: float = 300.0  # s the previous epoch's proxies stay usable
    k: int = 32  # proxies elected per epoch
    market: MarketSettings = attrs.field(factory=MarketSettings)

    def clock(self) -> EpochClock:
        return EpochClock(genesis=0.0, length=float(self.epoch_seconds), lead=self.lead, overlap=self.overlap)


DEVNET_TIMINGS = NetworkTimings(
    epoch_seconds=60,
    lead=30.0,
    overlap=20.0,
    k=3,
    market=MarketSettings(
        refresh=30.0, lifetime=150.0, tick=1.0, heartbeat=1.0, stats_every=10.0, announce_every=5.0
    ),
)


def timings_for(cfg: NodeConfig) -> NetworkTimings:
    return DEVNET_TIMINGS if cfg.node.network == "devnet" else NetworkTimings()


@asynccontextmanager
async def open_chain(cfg: NodeConfig) -> AsyncIterator[ChainClient]:
    """The configured chain backend, connected; ChainError with what to do when it is not there."""
    if cfg.chain.backend == "local":
        from ton.rpc import LocalChainClient

        host, _, port = cfg.chain.localchain.rpartition(":")
        try:
            client = LocalChainClient(host or "127.0.0.1", int(port))
        except ValueError as e:
            raise ConfigError(f"chain.localchain must be host:port, not {cfg.chain.localchain!r}") from e
        try:
            with trio.fail_after(10):
                await client.now()
        except (OSError, NodeError, trio.TooSlowError) as e:
            raise ChainError(
                f"no local chain answers at {cfg.chain.localchain}; start one with `cocoon-node localchain` "
                f"(or run `cocoon-node devnet`), or set chain.localchain"
            ) from e
        yield client
        return
    if cfg.chain.backend in ("ton", "lite"):
        from ton.lite import open_lite_chain

        if not cfg.chain.global_config:
            raise ConfigError("chain.backend = 'ton' needs chain.global_config (a TON global config JSON)")
        path = Path(os.path.expanduser(cfg.chain.global_config))  # noqa: ASYNC240 - no I/O: a name
        async with open_lite_chain(path) as chain:
            yield chain
        return
    raise ConfigError(f"unknown chain.backend {cfg.chain.backend!r}: use 'local' or 'ton'")


def wallet_addresses(public_key: bytes) -> set[str]:
    """The standard wallet addresses (v4r2, v5r1, mainnet id) of an Ed25519 public key."""
    keys = KeyPair(bytes(32), public_key, b"")  # public part only: addresses need no secret
    return {Wallet(keys, v).address() for v in (WalletVersion.V4R2, WalletVersion.V5R1)}


class EpochSeeds:
    """Epoch seeds from the chain, fetched ahead and served synchronously."""

    def __init__(
        self,
        chain: ChainClient,
        clock: EpochClock,
        *,
        lookback: int = 3,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.chain = chain
        self.clock = clock
        self.wall = wall  # the node's wall clock (seconds): which epoch it is
        self.lookback = lookback
        self._seeds: dict[int, bytes] = {}

    def seed(self, epoch: int) -> bytes:
        """The election seed of ``epoch``; MarketError if it was not fetched (it always is, ahead)."""
        s = self._seeds.get(epoch)
        if s is None:
            raise MarketError(f"no chain seed for epoch {epoch} yet")
        return s

    def beacon(self, epoch: int) -> bytes:
        """The attestation beacon of ``epoch`` (the same chain value as its election seed)."""
        return self.seed(epoch)

    def beacons(self) -> dict[int, bytes]:
        return dict(self._seeds)

    async def refresh(self, now: float) -> None:
        current = self.clock.epoch_of(now)
        for epoch in range(current - 2, current + self.lookback + 1):
            if epoch in self._seeds:
                continue
            source = epoch - self.lookback
            self._seeds[epoch] = await self.chain.epoch_seed(source, epoch_seconds=int(self.clock.length))
        for old in [e for e in self._seeds if e < current - 4]:
            del self._seeds[old]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.refresh(self.wall())
        task_status.started()
        while True:
            await trio.sleep(max(1.0, self.clock.length / 4))
            try:
                await self.refresh(self.wall())
            except NodeError as e:
                log.warning("could not refresh epoch seeds: %s", e)


class ChainStakes:
    """The market's stake oracle backed by the chain (see the module docstring)."""

    def __init__(self, chain: ChainClient) -> None:
        self.chain = chain
        self._stakes: dict[tuple[str, int], int] = {}
        self._wanted: set[tuple[str, int]] = set()
        self._wake = trio.Event()

    def controls(self, address: str, public_key: bytes) -> bool:
        try:
            return normalize_address(address) in wallet_addresses(public_key)
        except (ValueError, NodeError):
            return False

    def stake_of(self, address: str, epoch: int) -> int | None:
        try:
            key = (normalize_address(address), epoch)
        except (ValueError, NodeError):
            return None
        value = self._stakes.get(key)
        if value is None and key not in self._wanted:
            self._wanted.add(key)
            self._wake.set()
        return value

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            for key in sorted(self._wanted):
                try:
                    balance = await self.chain.get_balance(key[0])
                except NodeError as e:
                    log.info("stake of %s unknown: %s", key[0], e)
                    continue
                self._stakes[key] = balance
                self._wanted.discard(key)


def make_directory(
    overlay: Overlay,
    identity: Identity,
    timings: NetworkTimings,
    seeds: EpochSeeds,
    stakes: ChainStakes,
    *,
    bootstrap_proxies: tuple[ProxyRef, ...] = (),
    candidate: Candidate | None = None,
) -> Directory:
    view = ElectionView(timings.clock(), seeds.seed, stakes, params=ElectionParams(k=timings.k))
    return Directory(
        overlay,
        identity,
        view,
        dht=overlay.dht,
        bootstrap=bootstrap_proxies,
        candidate=candidate,
        settings=timings.market,
        clock=seeds.wall,
    )


def stake_identity(wallet: Wallet) -> Identity:
    """The wallet's key as an overlay Identity (candidacies are signed with it)."""
    return Identity.from_seed(wallet.keys.seed)
