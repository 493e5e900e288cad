"""The torch CPU engine: the trio shell around :mod:`inference.scheduler` and :mod:`inference.llama`.

There is no background task and no thread of our own.  Whoever is waiting
for tokens drives the model: a ``generate_stream`` consumer with nothing to
read either runs the next forward pass (``plan`` -> ``trio.to_thread.run_sync``
under a one-slot ``CapacityLimiter`` -> ``apply``) or, when another consumer
is already running one, waits for it to finish.  Every forward pass serves the
whole batch, so concurrent requests are decoded together.

Only the model thread touches the weights and the KV cache; only the trio
thread touches the scheduler.  A consumer that leaves its iterator (break,
cancellation, closed stream) cancels its request and frees its cache slot at
once.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import torch
import trio

from overlay.errors import InferenceError

from .engine import EngineStats, ModelInfo
from .llama import LlamaModel
from .loader import LoadedModel, load_model
from .messages import Chunk, FinalChunk, GenerateRequest
from .sampling import sample
from .scheduler import Plan, Scheduler

__all__ = ["TorchEngine"]

log = logging.getLogger(__name__)


class TorchEngine:
    """Llama-family models on the CPU with continuous batching."""

    def __init__(
        self,
        path: str | Path,
        *,
        model_id: str | None = None,
        weights: str = "int8",
        slots: int = 8,
        context: int | None = None,
        max_tokens: int | None = None,
        threads: int | None = None,
        prefill_chunk: int = 256,
        max_buffered: int = 64,
        seed: int | None = None,
    ) -> None:
        if weights not in ("int8", "fp32"):
            raise ValueError(f"weights must be 'int8' or 'fp32', not {weights!r}")
        self.path = Path(path)
        self.model_id = model_id or self.path.stem
        self.weights = weights
        self.slots = slots
        self.context = context
        self.max_tokens = max_tokens
        self.threads = threads
        self.prefill_chunk = prefill_chunk
        self.max_buffered = max_buffered
        self._rng = random.Random(seed)
        self._limiter = trio.CapacityLimiter(1)
        self._loaded: LoadedModel | None = None
        self._model: LlamaModel | None = None
        self._sched: Scheduler | None = None
        self._info: ModelInfo | None = None
        self._busy = False
        self._closed = False
        self._changed = trio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def load(self) -> ModelInfo:
        if self._info is not None:
            return self._info
        t0 = time.perf_counter()
        if self.threads:
            torch.set_num_threads(self.threads)
        loaded = await trio.to_thread.run_sync(
            functools.partial(load_model, self.path, weights=self.weights), limiter=self._limiter
        )
        cfg = loaded.config
        context = min(self.context or min(cfg.max_position, 2048), cfg.max_position)
        max_tokens = min(self.max_tokens or context, context - 1)
        self._model = LlamaModel(cfg, loaded.weights, slots=self.slots, context=context)
        self._loaded = loaded
        self._sched = Scheduler(
            loaded.tokenizer,
            vocab_size=cfg.vocab_size,
            slots=self.slots,
            context=context,
            max_tokens=max_tokens,
            rng=self._rng,
            prefill_chunk=self.prefill_chunk,
            max_buffered=self.max_buffered,
        )
        self._info = ModelInfo(
            model_id=self.model_id,
            engine="cpu",
            path=str(self.path),
            format=loaded.format,
            n_params=loaded.n_params,
            vocab_size=cfg.vocab_size,
            context_length=context,
            max_tokens=max_tokens,
            max_batch=self.slots,
            chat=loaded.tokenizer.chat_template is not None,
            weights=self.weights,
            load_s=time.perf_counter() - t0,
        )
        log.info(
            "loaded %s (%s, %d params) in %.2f s",
            self.model_id,
            loaded.format,
            loaded.n_params,
            self._info.load_s,
        )
        return self._info

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise InferenceError("engine not loaded")
        return self._info

    @property
    def tokenizer(self) -> object:
        if self._loaded is None:
            raise InferenceError("engine not loaded")
        return self._loaded.tokenizer

    async def close(self) -> None:
        self._closed = True
        if self._sched is not None:
            for rid in list(self._sched.seqs):
                self._sched.cancel(rid)
        self._notify()
        with trio.move_on_after(30):
            while self._busy:
                await self._wait_change()
        self._model = None
        self._loaded = None

    # ------------------------------------------------------------------ generation

    def _scheduler(self) -> Scheduler:
        if self._closed:
            raise InferenceError("engine closed")
        if self._sched is None:
            raise InferenceError("engine not loaded")
        return self._sched

    async def generate_stream(self, request: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        sched = self._scheduler()
        sched.submit(request, time.monotonic())
        rid = request.request_id
        self._notify()
        finished = False
        try:
            while True:
                chunk = sched.take(rid, time.monotonic())
                if chunk is None:
                    await self._advance()
                    continue
                finished = isinstance(chunk, FinalChunk)
                self._notify()  # taking may have unpaused the sequence
                yield chunk
                if finished:
                    return
        finally:
            if not finished:
                sched.discard(rid)
                self._notify()

    async def cancel(self, request_id: str) -> bool:
        if self._sched is None:
            return False
        ok = self._sched.cancel(request_id)
        self._notify()
        return ok

    def stats(self) -> EngineStats:
        if self._sched is None:
            return EngineStats(0, 0, 0, self.slots, 0, 0, 0, 0, 0, 0)
        return self._sched.statistics()

    async def wait_idle(self) -> None:
        """Return once no request holds a slot or waits for one."""
        while True:
            s = self.stats()
            if s.running == 0 and s.waiting == 0 and not self._busy:
                return
            await self._wait_change()

    # ------------------------------------------------------------------ driving the model

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    async def _advance(self) -> None:
        """Run one forward pass, or wait until the one in flight (or anything else) changes state."""
        sched = self._scheduler()
        if self._busy:
            await self._wait_change()
            return
        plan = sched.plan(time.monotonic())
        if plan is None:
            await self._wait_change()
            return
        self._busy = True
        try:
            try:
                sampled = await trio.to_thread.run_sync(self._run, plan, limiter=self._limiter)
            except Exception:
                log.exception("forward pass failed; ending %d request(s)", len(plan.rids))
                sched.fail(plan)
            else:
                sched.apply(plan, sampled, time.monotonic())
        finally:
            self._busy = False
            self._notify()

    def _run(self, plan: Plan) -> list[int]:
        """The model thread: cache moves, one forward pass, sampling."""
        model = self._model
        if model is None:
            raise InferenceError("engine closed")
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # worker threads do not inherit it everywhere
        for src, dst, n in plan.moves:
            model.move_slot(src, dst, n)
        if plan.kind == "prefill":
            logits = model.prefill(plan.slots[0], torch.tensor(plan.tokens), plan.positions[0])
            spec = plan.specs[0]
            return sample(logits.unsqueeze(0), [spec]) if spec is not None else []
        logits = model.decode(list(plan.slots), torch.tensor(plan.tokens), list(plan.positions))
        specs = [s for s in plan.specs if s is not None]
        return sample(logits, specs)
