"""Wiring: which components a node runs for its roles, and the shared network context.

:class:`NetworkContext` is the first component of every node that trades: it
connects the chain backend, funds the wallet on a devnet, keeps the epoch
seeds and stake snapshots, and runs the payment manager.  The role components
(worker, proxy, client) start after it and use what it holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack

import trio

from market.directory import ProxyRef
from overlay.errors import ChainError, ConfigError, NodeError
from ton.chain import ChainClient
from ton.manager import PaymentManager
from ton.wallets import WalletVersion, wallet_from_data_dir

from .config import NodeConfig
from .network import ChainStakes, EpochSeeds, NetworkTimings, open_chain, timings_for
from .networks import Network

__all__ = ["DEVNET_FUNDING", "NetworkContext", "bootstrap_proxy_refs"]

log = logging.getLogger(__name__)
TON = 1_000_000_000
DEVNET_FUNDING = 50 * TON  # nanoTON each devnet wallet gets from the local chain's faucet
BALANCE_EVERY = 30.0  # seconds between wallet balance reads


def bootstrap_proxy_refs(network: Network) -> tuple[ProxyRef, ...]:
    """The network's bootstrap nodes, the permissioned fallback proxies until an election."""
    refs = []
    for addr in network.bootstrap:
        transport, _, pid = addr.rpartition("/p2p/")
        refs.append(ProxyRef(pid, (transport,)))
    return tuple(refs)


class NetworkContext:
    """Chain, epochs, stakes and payments for the role components (a component itself)."""

    name = "network"

    def __init__(
        self, cfg: NodeConfig, timings: NetworkTimings | None = None, *, wall: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.timings = timings or timings_for(cfg)
        self.wall = wall  # the node's wall clock (seconds): epochs, market records, settlement
        self._chain: ChainClient | None = None
        self._seeds: EpochSeeds | None = None
        self._stakes: ChainStakes | None = None
        self._payments: PaymentManager | None = None
        self.wallet_balance = 0  # nanoTON on chain, refreshed every half minute

    @property
    def chain(self) -> ChainClient:
        assert self._chain is not None, "the network context has not started"
        return self._chain

    @property
    def seeds(self) -> EpochSeeds:
        assert self._seeds is not None, "the network context has not started"
        return self._seeds

    @property
    def stakes(self) -> ChainStakes:
        assert self._stakes is not None, "the network context has not started"
        return self._stakes

    @property
    def payments(self) -> PaymentManager:
        assert self._payments is not None, "the network context has not started"
        return self._payments

    async def _fund_devnet_wallet(self) -> None:
        pm = self.payments
        if self.cfg.chain.backend != "local" or self.cfg.node.network != "devnet":
            return
        balance = await self.chain.get_balance(pm.address)
        if balance >= DEVNET_FUNDING // 2:
            return
        fund = getattr(self.chain, "fund", None)
        if fund is None:
            return
        log.info(
            "funding devnet wallet %s with %d TON from the local chain", pm.address, DEVNET_FUNDING // TON
        )
        await fund(pm.address, DEVNET_FUNDING, pm.wallet.state_init())

    async def run(
        self, app: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from .app import NodeApp

        assert isinstance(app, NodeApp)
        async with AsyncExitStack() as stack:
            log.info("connecting to the %s chain ...", self.cfg.chain.backend)
            self._chain = await stack.enter_async_context(open_chain(self.cfg))
            self._seeds = EpochSeeds(self._chain, self.timings.clock(), wall=self.wall)
            self._stakes = ChainStakes(self._chain)
            c = self.cfg.chain
            try:
                version = WalletVersion(c.wallet_version)
            except ValueError as e:
                raise ConfigError(
                    f"chain.wallet_version must be v5r1 or v4r2, not {c.wallet_version!r}"
                ) from e
            wallet = wallet_from_data_dir(self.cfg.data_dir, version, c.network_id)
            self._payments = PaymentManager.from_data_dir(
                app.overlay, self._chain, self.cfg.data_dir, wallet=wallet, clock=self.wall
            )
            stack.callback(self._payments.close_store)
            payments = self._payments
            app.metrics.collector(
                "cocoon_payments", "gauge", "payment channels, balances, earnings (nanoTON)",
                lambda: payments.statistics().samples(),
            )  # fmt: skip
            await self._fund_devnet_wallet()
            balance = await self._chain.get_balance(self._payments.address)
            self.wallet_balance = balance
            log.info("wallet %s holds %.3f TON", self._payments.address, balance / TON)
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(30):
                        await nursery.start(self._seeds.run)
                except trio.TooSlowError as e:
                    raise ChainError("the chain did not give the epoch seeds within 30 s") from e
                await nursery.start(self._stakes.run)
                await nursery.start(self._payments.run)
                nursery.start_soon(self._watch_balance)
                task_status.started()

    async def _watch_balance(self) -> None:
        """Re-read the wallet balance every BALANCE_EVERY seconds. A chain that does not answer
        is a WARNING once (the last figure is kept), and an INFO line when it answers again."""
        failing = False
        while True:
            await trio.sleep(BALANCE_EVERY)
            try:
                self.wallet_balance = await self.chain.get_balance(self.payments.address)
            except (NodeError, OSError) as e:
                if not failing:
                    log.warning("cannot read the wallet balance from the chain (keeping the last one): %s", e)
                failing = True
                continue
            if failing:
                log.info("the chain answers again: wallet balance %.3f TON", self.wallet_balance / TON)
            failing = False

    async def action(self, name: str) -> str | None:
        """``settle``: close every payment channel cooperatively and report the payouts."""
        if name != "settle" or self._payments is None:
            return None
        pm = self.payments
        peers = sorted({c.peer_id for c in pm.statistics().channels if c.status in ("open", "closing")})
        lines = []
        for peer in peers:
            log.info("settling channels with %s ...", peer, extra={"peer_id": peer})
            n = await pm.close(peer)
            lines.append(f"closed {n} channel(s) with {peer}")
        balance = await self.chain.get_balance(pm.address)
        self.wallet_balance = balance
        lines.append(f"wallet {pm.address} now holds {balance / TON:.6f} TON on chain")
        return "\n".join(lines)

    def status_section(self) -> dict[str, object]:
        if self._payments is None:
            return {"chain": self.cfg.chain.backend, "state": "starting"}
        section: dict[str, object] = {
            "chain": self.cfg.chain.backend,
            "epoch": self.timings.clock().epoch_of(self.wall()),
            "wallet": self._payments.address,
            "wallet_balance_ton": round(self.wallet_balance / TON, 6),
        }
        section.update(self._payments.status_section())
        return section
