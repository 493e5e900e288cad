"""The worker role: sells generation from a local engine, sealed end to end and paid per token.

Start-up, with progress a GPU owner can follow::

    loading model ... (engine, weights, load time)
    measuring decode speed ...
    attestation tier none|tdx, report for epoch N
    offer published (price, capacity)

Then, per generation (see :mod:`node.protocol`): accept the sealed stream
with this epoch's keys, read the request, quote the prompt's token count, wait
for the payment session keyed by the request id, and run the generation
service with every chunk waiting for credit first (``_MeteredStream``).  An
unpaid client gets at most the credit window of tokens, then a pause, then an
abort.  Attestation keys rotate every epoch and the offer re-publishes with the
new report.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import trio

from inference.engine import Engine, ModelInfo, error_code
from inference.messages import FinalChunk, GenerateRequest, TokenChunk
from inference.select import select_engine
from inference.service import GenerationService
from market.directory import Directory, ProxyRef
from market.pricing import PricingPolicy, WorkerProfile
from market.service import WorkerLoadSample, WorkerService
from node.tee import ReplayGuard, ReportProvider, SealedStream
from overlay import wire
from overlay.errors import ChannelError, InferenceError, NodeError, SealError, StreamBroken, TransportError
from overlay.streams import FramedStream, MessageStream
from ton.keys import KeyPair
from ton.metering import Prices
from ton.session import WorkerSession

from .config import NodeConfig
from .nat import WorkerAddresses
from .network import make_directory
from .protocol import GENERATE_SEALED, PromptQuote
from .roles import NetworkContext

__all__ = ["WorkerRole", "engine_status", "model_hash"]

log = logging.getLogger(__name__)


def engine_status(info: ModelInfo, device_lost: str = "") -> dict[str, object]:
    """The engine lines of ``cocoon-node status``: weights, batch (= offer capacity), device, memory."""
    out: dict[str, object] = {
        "weights": info.weights,
        "batch": info.max_batch,
        "context": info.context_length,
    }
    if info.device == "cpu":
        out["device"] = "cpu"
    else:
        free = info.gpu_memory_free
        try:  # live figure; the load-time one if the device cannot answer
            from inference.device import describe_device

            free = describe_device(info.device).memory_free
        except Exception:
            pass
        out["device"] = f"{info.device} {info.gpu_name}"
        out["gpu_memory"] = f"{free / 2**30:.1f} of {info.gpu_memory_total / 2**30:.1f} GiB free"
        out["kv_cache"] = f"{info.kv_cache_bytes / 2**30:.2f} GiB"
    if device_lost:
        out["device_lost"] = f"{device_lost} (offers withdrawn)"
    return out


def model_hash(path: Path) -> bytes:
    """SHA-256 over the model's files (a GGUF file, or a directory's weights and tokenizer)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.digest()


class _Replay:
    """A MessageStream that hands out one already-read message first."""

    def __init__(self, inner: MessageStream, first: object) -> None:
        self.inner = inner
        self.peer_id = inner.peer_id
        self._first: object | None = first

    async def send(self, msg: object) -> None:
        await self.inner.send(msg)

    async def receive(self) -> object | None:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self.inner.receive()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def reset(self) -> None:
        await self.inner.reset()


class _MeteredStream(_Replay):
    """Every chunk waits for payment credit before it goes out (the worker's half of metering).

    The payment session is attached when the payer's session arrives; until
    then chunks wait (prefill runs meanwhile, so payment set-up costs no time).
    """

    def __init__(self, inner: MessageStream, first: object, *, worker: str = "") -> None:
        super().__init__(inner, first)
        self.worker = worker  # our own peer id (for logs)
        self.session: WorkerSession | None = None
        self._attached = trio.Event()
        self.tokens = 0
        self.t_start = time.perf_counter()
        self.t_attached = 0.0  # the payment session arrived
        self.t_first_ready = 0.0  # the engine had the first token
        self.t_first_sent = 0.0  # ... and credit allowed sending it

    def attach(self, session: WorkerSession) -> None:
        self.session = session
        self.t_attached = time.perf_counter()
        self._attached.set()

    def timings(self) -> str:
        def ms(t: float) -> str:
            return f"{(t - self.t_start) * 1000:.0f}" if t else "-"

        return (
            f"payment session at {ms(self.t_attached)} ms, first token ready at {ms(self.t_first_ready)} ms, "
            f"sent at {ms(self.t_first_sent)} ms"
        )

    async def send(self, msg: object) -> None:
        if isinstance(msg, TokenChunk | FinalChunk) and msg.token_ids:
            if not self.t_first_ready:
                self.t_first_ready = time.perf_counter()
            await self._attached.wait()
            assert self.session is not None
            try:
                await self.session.produced(list(msg.token_ids))
            except ChannelError as e:
                raise StreamBroken(f"payment stopped: {e}") from e
            self.tokens += len(msg.token_ids)
            if not self.t_first_sent:
                self.t_first_sent = time.perf_counter()
        await self.inner.send(msg)


class WorkerRole:
    """A component of :class:`node.app.NodeApp` (see the module docstring)."""

    name = "worker"

    def __init__(
        self,
        cfg: NodeConfig,
        ctx: NetworkContext,
        *,
        engine: Engine | None = None,
        bootstrap_proxies: tuple[ProxyRef, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.bootstrap_proxies = bootstrap_proxies  # the fallback proxies (and relays) until an election
        self.addresses: WorkerAddresses | None = None
        self.timings = ctx.timings
        self.engine = engine
        self.info: ModelInfo | None = None
        self.generation: GenerationService | None = None
        self.provider: ReportProvider | None = None
        self.market: WorkerService | None = None
        self.replay = ReplayGuard()
        w = cfg.worker
        self.pricing = PricingPolicy(w.price_prompt, w.price_completion)
        self.floor = Prices(w.price_prompt, w.price_completion)
        self.counters = dict.fromkeys(("served", "refused", "aborted", "tokens"), 0)
        self.peer_id = ""
        self.idle_stream_s = 60.0  # s an opened stream may wait for its request
        self.directory: Directory | None = None
        self.decode_tok_s = 0.0
        self.device_lost = ""  # why the engine's GPU is gone (then our offers are withdrawn)

    # ------------------------------------------------------------------ start-up

    async def _load(self) -> ModelInfo:
        w = self.cfg.worker
        if self.engine is None:
            self.engine = select_engine(
                w.engine,
                w.model,
                threads=w.threads,
                max_batch=w.max_batch,
                context=w.max_context,
            )
        log.info("loading model %s (engine %s) ...", w.model, w.engine)
        t0 = time.perf_counter()
        info = await self.engine.load()
        log.info(
            "model %s loaded: %s, %s weights, %.1f M parameters, context %d, in %.1f s",
            info.model_id,
            info.engine,
            info.weights,
            info.n_params / 1e6,
            info.context_length,
            time.perf_counter() - t0,
        )
        return info

    async def _measure(self, info: ModelInfo) -> float:
        """Decode tok/s of one short greedy generation (what the offer advertises)."""
        assert self.engine is not None
        log.info("measuring decode speed ...")
        req = GenerateRequest("warmup", info.model_id, 24, prompt="Hello", temperature=0.0, ignore_eos=True)
        speed = 0.0
        async for chunk in self.engine.generate_stream(req):
            if isinstance(chunk, FinalChunk):
                speed = chunk.decode_tok_per_s
        log.info("decode speed %.1f tokens/s", speed)
        return speed

    def _load_sample(self) -> WorkerLoadSample:
        assert self.engine is not None
        st = self.engine.stats()
        return WorkerLoadSample(active=st.running + st.waiting, queue_tokens=0, tok_s=self.decode_tok_s)

    async def _rotate(self, epoch: int) -> bytes:
        assert self.provider is not None
        report = await self.provider.rotate(
            epoch=epoch,
            beacon=self.ctx.seeds.beacon(epoch),
            now=int(time.time()),
            lifetime=int(self.timings.epoch_seconds * 2 + 60),
        )
        log.info("attestation report for epoch %d (tier %s)", epoch, self.provider.tier)
        return report.raw

    async def _rotation_loop(self) -> None:
        clock = self.timings.clock()
        while True:
            now = time.time()
            nxt = clock.epoch_of(now) + 1
            await trio.sleep(max(0.0, clock.start(nxt) - now))
            try:
                raw = await self._rotate(nxt)
            except NodeError as e:
                log.warning("attestation rotation for epoch %d failed: %s", nxt, e)
                continue
            if self.market is not None:
                self.market.set_report(raw)

    async def run(
        self, app: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from .app import NodeApp

        assert isinstance(app, NodeApp)
        ov = app.overlay
        self.peer_id = app.peer_id
        info = self.info = await self._load()
        assert self.engine is not None
        self.generation = GenerationService({info.model_id: self.engine})
        self.decode_tok_s = await self._measure(info)
        digest = await trio.to_thread.run_sync(model_hash, Path(info.path))
        self.provider = ReportProvider.detect(
            peer_id=app.peer_id, sign=app.identity.sign, model_id=info.model_id, model_hash=digest
        )
        clock = self.timings.clock()
        raw = await self._rotate(clock.epoch_of(time.time()))
        directory = self.directory = make_directory(
            ov,
            app.identity,
            self.timings,
            self.ctx.seeds,
            self.ctx.stakes,
            bootstrap_proxies=self.bootstrap_proxies,
        )
        self.addresses = WorkerAddresses(ov, directory)
        profile = WorkerProfile(
            app.peer_id,
            app.identity.public_key,
            (),  # set by self.addresses before the first offer
            info.model_id,
            digest,
            capacity=info.max_batch,
            max_context=info.context_length,
            decode_tok_s=max(self.decode_tok_s, 0.1),
            tier=self.provider.tier,
            engine=info.engine,
        )
        self.market = WorkerService(
            ov,
            app.identity,
            profile,
            self.pricing,
            directory,
            load=self._load_sample,
            report=raw,
            settings=self.timings.market,
            ready=self.addresses.ready,
        )
        self._receipt_key = KeyPair.from_seed(app.identity.seed())
        app.metrics.collector(
            "cocoon_worker", "gauge", "worker sessions, tokens and engine load", self._samples
        )
        ov.set_stream_handler(GENERATE_SEALED, self.handle)
        async with trio.open_nursery() as nursery:
            await nursery.start(directory.run)
            await nursery.start(self.addresses.run, self.market)
            await nursery.start(self.market.run)
            nursery.start_soon(self._rotation_loop)
            nursery.start_soon(self._watch_device)
            log.info(
                "worker ready: %s at %d/%d nanoTON per prompt/completion token (floor), tier %s",
                info.model_id,
                self.floor.prompt,
                self.floor.completion,
                self.provider.tier,
            )
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await self.market.withdraw()
                await self.engine.close()

    async def _watch_device(self) -> None:
        """When the engine loses its GPU for good, withdraw our offers (new requests are refused)."""
        wait = getattr(self.engine, "wait_device_lost", None)
        if wait is None:
            return
        reason = str(await wait())
        self.device_lost = reason
        log.critical("the engine lost its device (%s); withdrawing our offers", reason)
        if self.market is not None:
            with trio.move_on_after(10):
                await self.market.withdraw()

    # ------------------------------------------------------------------ one generation

    async def handle(self, framed: FramedStream) -> None:
        assert self.provider is not None
        assert self.generation is not None
        assert self.engine is not None
        try:
            # Clients open streams ahead of time; one that stays silent this long is dropped.
            with trio.fail_after(self.idle_stream_s):
                sealed = await SealedStream.accept(framed, self.provider.keys_for, replay=self.replay)
        except trio.TooSlowError:
            await framed.reset()
            return
        except (SealError, TransportError) as e:
            self.counters["refused"] += 1
            log.info("refused a stream: %s", e, extra={"peer_id": framed.peer_id})
            return
        try:
            with trio.fail_after(30):
                req = await sealed.receive()
            if not isinstance(req, GenerateRequest):
                await self._refuse(sealed, "bad_request", "expected a GenerateRequest")
                return
            try:
                session_id = bytes.fromhex(req.request_id)
                if len(session_id) != 32:
                    raise ValueError("length")
            except ValueError:
                await self._refuse(
                    sealed, "bad_request", "request_id must be the 64-hex-digit payment session id"
                )
                return
            try:
                prompt_tokens = self.count_prompt_tokens(req)
            except InferenceError as e:
                await self._refuse(sealed, error_code(e), str(e))
                return
            await sealed.send(PromptQuote(req.request_id, prompt_tokens))
            metered = _MeteredStream(sealed, req, worker=self.peer_id)
            done = trio.Event()
            failure: list[NodeError] = []
            async with trio.open_nursery() as nursery:

                async def paid() -> None:
                    try:
                        async with self.ctx.payments.serve_session(
                            session_id, min_prices=self.floor, receipt_key=self._receipt_key
                        ) as session:
                            assert session.meter is not None
                            if session.meter.prompt_tokens < prompt_tokens:
                                raise ChannelError(
                                    f"the session prepays fewer than {prompt_tokens} prompt tokens"
                                )
                            metered.attach(session)
                            await done.wait()
                    except NodeError as e:
                        failure.append(e)
                        nursery.cancel_scope.cancel()  # no payment, no tokens

                nursery.start_soon(paid)
                try:
                    await self.generation.handle(metered)  # prefill runs while the payment session opens
                finally:
                    done.set()
            self.counters["tokens"] += metered.tokens
            if failure:
                raise failure[0]
            self.counters["served"] += 1
            log.info(
                "served %d tokens (%s)", metered.tokens, metered.timings(), extra={"peer_id": framed.peer_id}
            )
        except (NodeError, trio.TooSlowError) as e:
            self.counters["aborted"] += 1
            log.info("generation ended early: %s", e, extra={"peer_id": framed.peer_id})
            await sealed.reset()

    def count_prompt_tokens(self, req: GenerateRequest) -> int:
        assert self.engine is not None
        count = getattr(self.engine, "count_prompt_tokens", None)
        if count is None:
            raise InferenceError("this engine cannot count prompt tokens")
        return int(count(req))

    async def _refuse(self, stream: MessageStream, code: str, message: str) -> None:
        self.counters["refused"] += 1
        try:
            with trio.move_on_after(5):
                await stream.send(wire.ErrorFrame(code, message[:1000]))
            await stream.aclose()
        except TransportError:
            await stream.reset()

    def _samples(self) -> list[tuple[str, dict[str, str], float]]:
        out = [("cocoon_worker", {"figure": k}, float(v)) for k, v in self.counters.items()]
        if self.engine is not None:
            st = self.engine.stats()
            for k in ("running", "waiting", "completed", "completion_tokens", "prompt_tokens"):
                out.append(("cocoon_worker", {"figure": f"engine_{k}"}, float(getattr(st, k))))
        out.append(("cocoon_worker", {"figure": "decode_tok_s"}, self.decode_tok_s))
        return out

    def status_section(self) -> dict[str, object]:
        info = self.info
        return {
            "model": info.model_id if info else "loading",
            "engine": info.engine if info else "",
            **(engine_status(info, self.device_lost) if info else {}),
            "tier": self.provider.tier if self.provider else "",
            "decode_tok_s": round(self.decode_tok_s, 1),
            "price_floor": f"{self.floor.prompt}/{self.floor.completion} nanoTON per prompt/completion token",
            "offers_published": self.market.published if self.market else 0,
            "proxies": [p.peer_id for p in self.directory.proxies_for(self.peer_id)]
            if self.directory
            else [],
            **self.counters,
        }
