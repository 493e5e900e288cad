"""The proxy role: the market's offer book and matching, plus the payment hub.

A proxy candidate announces a candidacy staked with its wallet every epoch; when
elected it keeps the offer book of the models it serves, verifies workers'
attestation reports (the same verifier clients use), answers match requests,
and forwards per-token payments: clients pay the proxy on their channel, the
proxy pays the worker on its own and keeps ``fee_ppm`` (parts per million).
A bootstrap node runs the same role without a candidacy: it is the network's
permissioned fallback proxy until an election has produced a set.

Sessions name their worker by the worker's public key (``SessionOpen.offer_id``);
the router forwards at the worker's current offer prices and refuses a client
whose prices do not cover them plus the fee.
"""

from __future__ import annotations

import logging
import math

import trio

from market.directory import Candidate, Directory, ProxyRef
from market.service import ProxyService
from node.tee import NoneVerifier, Verifier
from overlay.identity import peer_id_from_public_key
from ton.messages import SessionOpen
from ton.metering import Prices
from ton.paysessions import Route

from .nat import relay_policy
from .network import make_directory, stake_identity
from .roles import NetworkContext

__all__ = ["ProxyRole", "client_prices"]

log = logging.getLogger(__name__)


def client_prices(worker: Prices, fee_ppm: int) -> Prices:
    """What a client pays a proxy for a worker's prices: the worker's plus the proxy fee."""
    return Prices(
        math.ceil(worker.prompt * (1_000_000 + fee_ppm) / 1_000_000),
        math.ceil(worker.completion * (1_000_000 + fee_ppm) / 1_000_000),
    )


class ProxyRole:
    """A component of :class:`node.app.NodeApp` (see the module docstring)."""

    name = "proxy"

    def __init__(
        self,
        ctx: NetworkContext,
        *,
        models: tuple[str, ...],
        candidate: bool = True,
        operator: str = "",
        fee_ppm: int = 20_000,
        bootstrap_proxies: tuple[ProxyRef, ...] = (),
    ) -> None:
        self.ctx = ctx
        self.timings = ctx.timings
        self.models = models
        self.candidate = candidate
        self.operator = operator
        self.fee_ppm = fee_ppm
        self.bootstrap_proxies = bootstrap_proxies
        self.service: ProxyService | None = None
        self.directory: Directory | None = None
        self.routed = 0
        self.refused = 0
        self._stake_cache: dict[int, int] = {}

    def _stake_amount(self, epoch: int) -> int:
        """The candidate's claimed stake: its wallet balance as last read (refreshed in the background)."""
        return self._stake_cache.get(epoch, self._stake_cache.get(max(self._stake_cache, default=0), 0))

    async def _refresh_stake(self) -> None:
        clock = self.timings.clock()
        while True:
            try:
                balance = await self.ctx.payments.chain.get_balance(self.ctx.payments.address)
                e = clock.epoch_of(self.ctx.wall())
                for epoch in range(e - 1, e + 3):
                    self._stake_cache[epoch] = balance
            except Exception as e:  # the chain is down: keep the last value, say so
                log.warning("cannot read our stake from the chain: %s", e)
            await trio.sleep(max(5.0, self.timings.epoch_seconds / 6))

    async def _route(self, open_msg: SessionOpen, payer: str) -> Route | None:
        assert self.service is not None
        try:
            worker = peer_id_from_public_key(open_msg.offer_id)
        except ValueError:
            self.refused += 1
            return None
        rec = self.service.core.book.get(worker)
        if rec is None or rec.body.capacity <= 0:
            self.refused += 1
            log.info("no live offer of %s to route a session to", worker, extra={"peer_id": payer})
            return None
        offer = rec.body
        worker_prices = Prices(offer.price_prompt, offer.price_completion)
        need = client_prices(worker_prices, self.fee_ppm)
        if open_msg.price_prompt < need.prompt or open_msg.price_completion < need.completion:
            self.refused += 1
            log.info(
                "session prices %d/%d below %d/%d (worker + fee)",
                open_msg.price_prompt,
                open_msg.price_completion,
                need.prompt,
                need.completion,
                extra={"peer_id": payer},
            )
            return None
        self.routed += 1
        return Route(worker, worker_prices)

    async def run(
        self, app: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from .app import NodeApp

        assert isinstance(app, NodeApp)
        ov = app.overlay
        cand = None
        async with trio.open_nursery() as nursery:
            if self.candidate:
                nursery.start_soon(self._refresh_stake)
                wallet = self.ctx.payments.wallet
                cand = Candidate(
                    stake_identity(wallet),
                    wallet.address(),
                    self.operator or app.peer_id,
                    self._stake_amount,
                )
            self.directory = make_directory(
                ov,
                app.identity,
                self.timings,
                self.ctx.seeds,
                self.ctx.stakes,
                bootstrap_proxies=self.bootstrap_proxies,
                candidate=cand,
            )
            verifier = Verifier(none=NoneVerifier())
            self.service = ProxyService(
                ov,
                app.identity,
                self.directory,
                models=self.models,
                verifier=verifier,
                settings=self.timings.market,
                clock=self.ctx.wall,
            )
            self.ctx.payments.set_router(self._route)
            if ov.nat.hop is not None:
                ov.nat.hop.policy = relay_policy(ov, self.directory, lambda: self.service)
            app.metrics.collector("cocoon_proxy", "gauge", "proxy offers and routed sessions", self._samples)
            await nursery.start(self.directory.run)
            await nursery.start(self.service.run)
            log.info(
                "proxy ready (%s), models %s, fee %.2f %%",
                "candidate" if self.candidate else "bootstrap fallback",
                ", ".join(self.models) or "-",
                self.fee_ppm / 10_000,
            )
            task_status.started()

    def _samples(self) -> list[tuple[str, dict[str, str], float]]:
        out = [
            ("cocoon_proxy", {"figure": "sessions_routed"}, float(self.routed)),
            ("cocoon_proxy", {"figure": "sessions_refused"}, float(self.refused)),
        ]
        if self.service is not None:
            now = self.ctx.wall()
            for m in sorted(self.service.models):
                n = len(self.service.core.book.offers(m, now))
                out.append(("cocoon_proxy", {"figure": "live_offers", "model": m}, float(n)))
        return out

    def status_section(self) -> dict[str, object]:
        svc = self.service
        elected = [p.peer_id for p in self.directory.elected()] if self.directory else []
        offers = {}
        if svc is not None:
            now = self.ctx.wall()
            offers = {m: len(svc.core.book.offers(m, now)) for m in sorted(svc.models)}
        return {
            "mode": "candidate" if self.candidate else "bootstrap fallback",
            "elected_proxies": elected,
            "offers": offers,
            "sessions_routed": self.routed,
            "sessions_refused": self.refused,
            "fee_ppm": self.fee_ppm,
        }
