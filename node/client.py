"""The client role: the OpenAI-compatible API backed by the network.

For each completion (:meth:`NetworkBackend.complete`)::

    match (proxy, rendezvous order) -> offers, best first
    for an offer: fetch the worker's attestation report, verify it ourselves,
        seal the request to its attested key, read its prompt-token quote,
        open a payment session (through the proxy, which keeps its fee),
        stream tokens, paying for each one received
    worker dies mid-stream -> the next offer, replaying the prompt and the
        tokens received so far; each worker is paid only for what it delivered

The API stream never breaks on a failover: the deltas simply continue.
"""

from __future__ import annotations

import logging
import secrets
import time

import attrs
import trio

from inference.messages import FinalChunk, GenerateRequest
from inference.service import ChunkValidator
from market.client import MarketClient, Match, NoMatch
from market.directory import Directory, ProxyRef
from market.protocols import REPORT_PROTOCOL, request
from market.records import ReportRequest, ReportResponse, SignedOffer, UsageReport
from node.tee import ClientPolicy, NoneVerifier, ReportChecker, SealedStream, VerifiedReport, Verifier
from overlay import wire
from overlay.errors import (
    AttestationError,
    BadRequest,
    MarketError,
    NodeError,
    RemoteError,
    RemoteProtocolError,
    SealError,
    TransportError,
)
from overlay.host import Overlay
from overlay.streams import FramedStream, expect
from ton.manager import PaymentManager
from ton.metering import Prices

from .api import (
    ApiSettings,
    Completed,
    CompletionRequest,
    EventSender,
    ModelCard,
    OpenAIApp,
    TextDelta,
    WorkerUse,
    serve_api,
)
from .metrics import Metrics
from .network import EpochSeeds, NetworkTimings, make_directory
from .protocol import GENERATE_SEALED, PromptQuote, prompt_token_bound
from .proxy import client_prices
from .roles import NetworkContext

__all__ = ["API_ADDR_FILE", "ClientRole", "ClientSettings", "NetworkBackend"]

API_ADDR_FILE = "api.url"  # in the data dir: where `cocoon-node ask` finds the running client's API

log = logging.getLogger(__name__)

# Errors a worker (not the request) is to blame for: try the next worker.
_WORKER_FAULTS = (TransportError, SealError, AttestationError, RemoteProtocolError)
# Error frames that mean the request itself is bad: no other worker will do better.
_REQUEST_ERRORS = {"context_length_exceeded", "max_tokens_too_large", "invalid_sampling", "bad_request"}


class ProxyFault(MarketError):
    """The proxy (not the worker) failed: its payment hub could not be reached."""

    def __init__(self, proxy: str, message: str) -> None:
        super().__init__(f"{proxy[-8:]}: {message}")
        self.proxy = proxy


@attrs.frozen
class ClientSettings:
    models: tuple[str, ...] = ("smollm2-135m-instruct",)  # what /v1/models lists
    max_price_prompt: int = 500  # nanoTON per prompt token (before the proxy fee)
    max_price_completion: int = 2000  # nanoTON per completion token (before the proxy fee)
    min_tier: str = "none"
    fee_ppm: int = 20_000  # the proxies' fee, parts per million
    max_attempts: int = 4  # workers tried for one completion
    first_token_timeout: float = 60.0  # s to wait for a worker's first token
    token_timeout: float = 20.0  # s between tokens before the worker counts as dead
    match_ttl: float = 3.0  # s a proxy's match is reused (kept fresh in the background)
    warm_streams: int = 2  # streams kept open ahead of time to the best matched workers
    warm_ttl: float = 20.0  # s a pre-opened stream is used before it is replaced


@attrs.define
class _Progress:
    """What a completion has received so far, across workers."""

    text: list[str] = attrs.field(factory=list)
    token_ids: list[int] = attrs.field(factory=list)
    workers: list[WorkerUse] = attrs.field(factory=list)
    prompt_tokens: int = 0  # of the first worker (the user's prompt)
    cost: int = 0
    ttft: float = 0.0
    marks: list[tuple[str, float]] = attrs.field(factory=list)  # (phase, perf_counter) up to the first token

    def mark(self, phase: str) -> None:
        if not self.ttft:
            self.marks.append((phase, time.perf_counter()))

    def phases(self, started: float) -> str:
        out, prev = [], started
        for name, at in self.marks:
            out.append(f"{name} {(at - prev) * 1000:.1f}")
            prev = at
        return ", ".join(out) + " ms"


class NetworkBackend:
    """The client node's CompletionBackend (see the module docstring)."""

    def __init__(
        self,
        overlay: Overlay,
        directory: Directory,
        payments: PaymentManager,
        seeds: EpochSeeds,
        timings: NetworkTimings,
        settings: ClientSettings,
    ) -> None:
        self.overlay = overlay
        self.directory = directory
        self.market = MarketClient(overlay, directory, settings=timings.market)
        self.payments = payments
        self.seeds = seeds
        self.timings = timings
        self.settings = settings
        self.checker = ReportChecker(Verifier(none=NoneVerifier()), ClientPolicy(min_tier=settings.min_tier))
        self._cards: dict[str, ModelCard] = {m: ModelCard(id=m) for m in settings.models}
        self._reports: dict[tuple[str, bytes], VerifiedReport] = {}
        self._matches: dict[tuple[str, int, str], tuple[float, Match]] = {}
        self._recent: dict[tuple[str, int, str], float] = {}
        self._turn = 0
        self._warm: dict[str, tuple[FramedStream, float]] = {}  # worker -> (stream, opened at)
        self.counters = dict.fromkeys(("completions", "failovers", "failed", "tokens", "spent"), 0)

    # ------------------------------------------------------------------ models

    def models(self) -> list[ModelCard]:
        return list(self._cards.values())

    async def refresh_models(self) -> None:
        for m in list(self._cards):
            try:
                st = await self.market.stats(m)
            except NodeError as e:
                log.debug("no statistics for %s: %s", m, e)
                continue
            b = st.body
            self._cards[m] = ModelCard(
                id=m,
                workers=b.live_offers,
                min_price_completion=b.completion_p10,
                median_price_completion=b.completion_median,
                p90_price_completion=b.completion_p90,
                capacity=b.capacity,
                fills=b.fills,
            )

    async def run_model_refresh(self) -> None:
        while True:
            await self.refresh_models()
            await trio.sleep(self.timings.market.stats_every)

    # ------------------------------------------------------------------ completions

    async def complete(self, req: CompletionRequest, events: EventSender) -> None:
        progress = _Progress()
        failed: list[str] = []
        started = time.perf_counter()
        for _attempt in range(self.settings.max_attempts):
            remaining = req.max_tokens - len(progress.token_ids)
            max_pc = req.max_price_completion or self.settings.max_price_completion
            progress.mark("start")
            try:
                match = await self._match(req, max_pc, tuple(failed))
            except NoMatch as e:
                if progress.token_ids:
                    raise MarketError(f"no other worker to finish the answer: {e}") from e
                hint = f" (cheapest completion price seen: {e.price_hint} nanoTON)" if e.price_hint else ""
                if "no usable offer" in str(e) or "no proxy" in str(e) or e.price_hint is not None:
                    raise MarketError(f"no worker serves {req.model!r} within your limits{hint}: {e}") from e
                raise
            progress.mark("match")
            for rec in match.offers:
                worker = rec.body.peer_id
                try:
                    await self._run_on(rec, match.proxy, req, progress, remaining, started, events)
                    self.counters["completions"] += 1
                    await self._report(match.proxy, worker, True, progress)
                    return
                except ProxyFault as e:
                    log.warning("proxy %s failed: %s; asking another", e.proxy, e, extra={"peer_id": e.proxy})
                    self._matches.clear()
                    self.counters["failovers"] += 1
                    break  # a fresh match from the next proxy; the worker is not to blame
                except RemoteError as e:
                    if e.code in _REQUEST_ERRORS or e.code == "unknown_model":
                        raise BadRequest(e.message) from e
                    log.info("worker %s refused: %s", worker, e, extra={"peer_id": worker})
                except _WORKER_FAULTS as e:
                    log.warning("worker %s failed: %s; trying another", worker, e, extra={"peer_id": worker})
                    await self._report(match.proxy, worker, False, progress)
                except NodeError as e:
                    if isinstance(e, BadRequest):
                        raise
                    log.warning("session with %s failed: %s", worker, e, extra={"peer_id": worker})
                failed.append(worker)
                self._matches.clear()
                self.counters["failovers"] += 1
                break  # ask the proxy again: its view (and ours) changed
        self.counters["failed"] += 1
        raise MarketError(f"no worker could complete the request after {len(failed)} attempts")

    async def _report(self, proxy: str, worker: str, ok: bool, progress: _Progress) -> None:
        mine = next((w for w in reversed(progress.workers) if w.peer_id == worker), None)
        n = mine.completion_tokens if mine else 0
        with trio.move_on_after(3):
            try:
                await self.market.report(proxy, UsageReport(worker, ok, n, n))
            except NodeError as e:
                log.debug("usage report to %s failed: %s", proxy, e)

    async def _verified_claims(self, rec: SignedOffer) -> object:
        """The worker's attested claims, verified by us (a verified report is reused until it expires)."""
        o = rec.body
        now = time.time()
        epoch = self.timings.clock().epoch_of(now)
        key = (o.peer_id, o.attestation_hash)
        cached = self._reports.get(key)
        if cached is not None and cached.expires_at > now:
            self.checker.policy.admit(cached, epoch=epoch, beacons=self.seeds.beacons())
            return cached.claims
        resp = await request(
            self.overlay, o.peer_id, REPORT_PROTOCOL, ReportRequest(o.attestation_hash), ReportResponse,
            addrs=o.addrs, timeout=self.timings.market.request_timeout,
        )  # fmt: skip
        verified = self.checker.check(
            resp.report, peer_id=o.peer_id, now=now, epoch=epoch, beacons=self.seeds.beacons()
        )
        if len(self._reports) > 1024:
            self._reports.clear()
        self._reports[key] = verified
        return verified.claims

    async def _match(self, req: CompletionRequest, max_pc: int, exclude: tuple[str, ...]) -> Match:
        """Offers for ``req``: a match at most ``match_ttl`` old (refreshed in the background), else live."""
        key = (req.model, max_pc, req.min_tier or self.settings.min_tier)
        self._recent[key] = time.monotonic()
        if not exclude:
            hit = self._matches.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.settings.match_ttl:
                # Spread concurrent requests over the matched workers (the proxy ranked them at once).
                self._turn += 1
                offers = hit[1].offers
                k = self._turn % len(offers)
                return attrs.evolve(hit[1], offers=offers[k:] + offers[:k])
        match = await self.market.match(
            req.model,
            max_price_prompt=self.settings.max_price_prompt,
            max_price_completion=max_pc,
            min_tier=key[2],
            count=3,
            exclude=exclude,
        )
        if not exclude:
            self._matches[key] = (time.monotonic(), match)
        return match

    async def _worker_stream(self, worker: str, addrs: tuple[str, ...]) -> FramedStream:
        """A stream to ``worker``: one opened ahead of time if fresh, else a new one."""
        warm = self._warm.pop(worker, None)
        if warm is not None:
            fresh = time.monotonic() - warm[1] < self.settings.warm_ttl
            if fresh and not self.overlay.superseded(warm[0]):
                return warm[0]
            await warm[0].reset()
        return await self.overlay.open_stream(worker, GENERATE_SEALED, addrs=addrs)

    async def _prewarm(self, match: Match) -> None:
        """Open streams ahead of time to the best workers (a request then skips the stream set-up)."""
        now = time.monotonic()
        for worker, (stream, opened) in list(self._warm.items()):
            if now - opened >= self.settings.warm_ttl:
                del self._warm[worker]
                await stream.reset()
        for rec in match.offers[: self.settings.warm_streams]:
            o = rec.body
            if o.peer_id in self._warm:
                continue
            try:
                stream = await self.overlay.open_stream(o.peer_id, GENERATE_SEALED, addrs=o.addrs)
            except NodeError as e:
                log.debug("could not pre-open a stream to %s: %s", o.peer_id, e)
                continue
            self._warm[o.peer_id] = (stream, time.monotonic())

    async def run_match_refresh(self) -> None:
        """Keep the matches of recently used models fresh, so a request rarely waits for a proxy."""
        while True:
            await trio.sleep(self.settings.match_ttl / 2)
            now = time.monotonic()
            for key, used in list(self._recent.items()):
                if now - used > 60:
                    del self._recent[key]
                    self._matches.pop(key, None)
                    continue
                try:
                    match = await self.market.match(
                        key[0],
                        max_price_prompt=self.settings.max_price_prompt,
                        max_price_completion=key[1],
                        min_tier=key[2],
                        count=3,
                    )
                except NodeError as e:
                    log.debug("background match for %s failed: %s", key[0], e)
                    self._matches.pop(key, None)
                    continue
                self._matches[key] = (time.monotonic(), match)
                await self._prewarm(match)

    async def _run_on(
        self,
        rec: SignedOffer,
        proxy: str,
        req: CompletionRequest,
        progress: _Progress,
        remaining: int,
        started: float,
        events: EventSender,
    ) -> None:
        o = rec.body
        claims = await self._verified_claims(rec)
        progress.mark("attestation")
        session_id = secrets.token_bytes(32)
        continuation = tuple(progress.token_ids)
        gen = GenerateRequest(
            request_id=session_id.hex(),
            model=req.model,
            max_tokens=remaining,
            prompt=req.prompt,
            messages=req.messages,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop,
            continuation=continuation,
        )
        framed = await self._worker_stream(o.peer_id, o.addrs)
        sealed = SealedStream.client(framed, claims)  # type: ignore[arg-type]
        progress.mark("stream")
        delivered = 0
        final: FinalChunk | None = None
        try:
            await sealed.send(gen)
            with trio.fail_after(self.settings.first_token_timeout):
                quote = expect(PromptQuote, await sealed.receive())
            progress.mark("quote")
            bound = prompt_token_bound(req.prompt, tuple((m.role, m.content) for m in req.messages))
            bound += len(continuation)
            if not 0 < quote.prompt_tokens <= bound:
                raise RemoteProtocolError(
                    f"worker quoted {quote.prompt_tokens} prompt tokens, at most {bound} possible"
                )
            prices = client_prices(Prices(o.price_prompt, o.price_completion), self.settings.fee_ppm)
            paying = False
            try:
                async with self.payments.pay_session(
                    proxy,
                    session_id=session_id,
                    offer_id=o.worker_key,
                    prices=prices,
                    prompt_tokens=quote.prompt_tokens,
                    max_tokens=remaining,
                    worker_key=o.worker_key,
                ) as pay:
                    paying = True
                    progress.mark("payment")
                    validator = ChunkValidator(gen)
                    info = self.overlay.connection_info(framed)
                    path = "relayed" if info is not None and info.relayed else "direct"
                    use = WorkerUse(o.peer_id, o.tier, 0, prices.cost(quote.prompt_tokens, 0), path)
                    progress.workers.append(use)
                    if not progress.prompt_tokens:
                        progress.prompt_tokens = quote.prompt_tokens
                    timeout = self.settings.first_token_timeout
                    while True:
                        with trio.fail_after(timeout):
                            msg = await sealed.receive()
                        timeout = self.settings.token_timeout
                        if msg is None:
                            raise TransportError(f"{o.peer_id} ended the stream before the final chunk")
                        if isinstance(msg, wire.ErrorFrame):
                            raise RemoteError(msg.code, msg.message)
                        chunk = validator.check(msg)
                        ids = list(chunk.token_ids)
                        if ids:
                            await pay.received(ids)
                            delivered += len(ids)
                            progress.token_ids += ids
                            if not progress.ttft:
                                progress.mark("first token")
                                progress.ttft = time.perf_counter() - started

                        use = attrs.evolve(
                            use,
                            completion_tokens=delivered,
                            cost_nanoton=prices.cost(quote.prompt_tokens, delivered),
                        )
                        progress.workers[-1] = use
                        if chunk.text or ids:
                            progress.text.append(chunk.text)
                            await events.send(TextDelta(chunk.text, len(ids)))
                        if isinstance(chunk, FinalChunk):
                            final = chunk
                            break
            except TransportError as e:
                if not paying:  # the payment session never opened: the proxy is at fault, not the worker
                    raise ProxyFault(proxy, str(e)) from e
                raise
            self.counters["tokens"] += delivered
            log.info(
                "completion: %d tokens from %s, first token after %.0f ms (%s)",
                delivered,
                o.peer_id[-10:],
                progress.ttft * 1000,
                progress.phases(started),
                extra={"peer_id": o.peer_id},
            )
            cost = sum(w.cost_nanoton for w in progress.workers)
            self.counters["spent"] += cost
            assert final is not None
            await events.send(
                Completed(
                    finish_reason=final.finish_reason,
                    prompt_tokens=progress.prompt_tokens,
                    completion_tokens=len(progress.token_ids),
                    cost_nanoton=cost,
                    workers=tuple(progress.workers),
                    ttft_s=progress.ttft,
                    worker_decode_tok_s=final.decode_tok_per_s,
                    worker_ttft_s=final.ttft_s,
                )
            )
            with trio.move_on_after(2):
                await sealed.receive()  # the worker's end of stream (and its transcript signature)
        except trio.TooSlowError as e:
            raise TransportError(f"{o.peer_id} stopped sending tokens") from e
        finally:
            if final is not None:
                await sealed.aclose()
            else:
                await sealed.reset()


class ClientRole:
    """A component of :class:`node.app.NodeApp`: the API on loopback, backed by the network."""

    name = "client"

    def __init__(
        self,
        ctx: NetworkContext,
        settings: ClientSettings,
        api: ApiSettings,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        bootstrap_proxies: tuple[ProxyRef, ...] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.api = api
        self.host = host
        self.port = port
        self.bootstrap_proxies = bootstrap_proxies
        self.metrics = metrics or Metrics()
        self.backend: NetworkBackend | None = None
        self.bound: tuple[str, int] | None = None

    @property
    def base_url(self) -> str:
        assert self.bound is not None, "the API is not serving yet"
        return f"http://{self.bound[0]}:{self.bound[1]}"

    async def run(
        self, app: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from .app import NodeApp

        assert isinstance(app, NodeApp)
        ov = app.overlay
        self.metrics = app.metrics  # one registry per node: /metrics shows every role's figures
        directory = make_directory(
            ov, app.identity, self.ctx.timings, self.ctx.seeds, self.ctx.stakes,
            bootstrap_proxies=self.bootstrap_proxies,
        )  # fmt: skip
        self.backend = NetworkBackend(
            ov, directory, self.ctx.payments, self.ctx.seeds, self.ctx.timings, self.settings
        )
        backend = self.backend
        self.metrics.collector(
            "cocoon_client_events_total",
            "counter",
            "client completions, failovers, failures, tokens and nanoTON spent",
            lambda: [
                ("cocoon_client_events_total", {"kind": k}, float(v)) for k, v in backend.counters.items()
            ],
        )
        app_ = OpenAIApp(self.backend, self.api, self.metrics)
        async with trio.open_nursery() as nursery:
            await nursery.start(directory.run)
            nursery.start_soon(self.backend.run_model_refresh)
            nursery.start_soon(self.backend.run_match_refresh)
            self.bound = await nursery.start(serve_api, app_, self.host, self.port)
            await trio.Path(app.cfg.data_dir / API_ADDR_FILE).write_text(self.base_url + "\n")
            log.info("OpenAI-compatible API on %s/v1", self.base_url)
            task_status.started()

    def status_section(self) -> dict[str, object]:
        b = self.backend
        d = b.directory if b else None
        return {
            "api": self.base_url + "/v1" if self.bound else "starting",
            "proxies": [p.peer_id for p in d.proxies_for(d.overlay.peer_id)] if d else [],
            "min_tier": self.settings.min_tier,
            **(b.counters if b else {}),
        }
