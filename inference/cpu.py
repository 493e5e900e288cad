"""The torch CPU engine: the trio shell around :mod:`inference.scheduler` and :mod:`inference.llama`.

When there is work, a *driver* runs in a worker thread
(``trio.to_thread.run_sync`` under a one-slot ``CapacityLimiter``, started
from a trio system task so that no consumer has to wait for it): it loops
``plan -> forward pass -> apply`` back to back, so the next step starts as
soon as the previous one ends, whatever the event loop is busy with
(sending chunks, libp2p).  It stops when nothing can run (all done, or all
running requests paused because their readers are slow) and is started again
by the next submit, take or cancel.  Every forward pass serves the whole
batch, so concurrent requests are decoded together.

The scheduler is shared by the trio thread (submit, take, cancel) and the
driver (plan, apply) under one lock held for microseconds; only the driver
touches the weights and the KV cache.  Chunks wake consumers through
``TrioToken.run_sync_soon``.  A consumer that leaves its iterator (break,
cancellation, closed stream) cancels its request and frees its cache slot at
once.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
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
_thread_state = threading.local()


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
        cpus: frozenset[int] | None = None,
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
        self.cpus = cpus  # pin the model thread to these CPUs (Linux), e.g. frozenset({3})
        self.prefill_chunk = prefill_chunk
        self.max_buffered = max_buffered
        self._rng = random.Random(seed)
        self._limiter = trio.CapacityLimiter(1)
        self._loaded: LoadedModel | None = None
        self._model: LlamaModel | None = None
        self._sched: Scheduler | None = None
        self._info: ModelInfo | None = None
        self._lock = threading.Lock()  # guards the scheduler: trio thread and model thread
        self._driving = False  # a model thread is running steps
        self._closed = False
        self._changed = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None

    # ------------------------------------------------------------------ lifecycle

    async def load(self) -> ModelInfo:
        if self._info is not None:
            return self._info
        t0 = time.perf_counter()
        self._token = trio.lowlevel.current_trio_token()
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
        with self._lock:
            self._closed = True
            if self._sched is not None:
                for rid in list(self._sched.seqs):
                    self._sched.cancel(rid)
        self._notify()
        with trio.move_on_after(30):
            while self._driving:
                await self._changed.wait()
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
        with self._lock:
            sched.submit(request, time.monotonic())
        rid = request.request_id
        self._kick()
        finished = False
        try:
            while True:
                changed = self._changed
                with self._lock:
                    chunk = sched.take(rid, time.monotonic())
                if chunk is None:
                    self._kick()
                    await changed.wait()
                    continue
                finished = isinstance(chunk, FinalChunk)
                self._kick()  # taking may have unpaused the sequence
                yield chunk
                if finished:
                    return
        finally:
            if not finished:
                with self._lock:
                    sched.discard(rid)
                self._kick()  # a freed slot may admit a waiting request

    def count_prompt_tokens(self, request: GenerateRequest) -> int:
        """Prompt tokens ``request`` will be billed for (it is fully checked first)."""
        sched = self._scheduler()
        with self._lock:  # the tokenizer is shared with the model thread
            return len(sched.encode(request))

    async def cancel(self, request_id: str) -> bool:
        if self._sched is None:
            return False
        with self._lock:
            ok = self._sched.cancel(request_id)
        self._notify()
        self._kick()
        return ok

    def stats(self) -> EngineStats:
        if self._sched is None:
            return EngineStats(0, 0, 0, self.slots, 0, 0, 0, 0, 0, 0)
        with self._lock:
            return self._sched.statistics()

    async def wait_idle(self) -> None:
        """Return once no request holds a slot or waits for one, and the model thread is idle."""
        while True:
            changed = self._changed
            s = self.stats()
            if s.running == 0 and s.waiting == 0 and not self._driving:
                return
            await changed.wait()

    # ------------------------------------------------------------------ driving the model

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _notify_from_thread(self) -> None:
        if self._token is not None:
            try:
                self._token.run_sync_soon(self._notify)
            except trio.RunFinishedError:
                pass

    def _kick(self) -> None:
        """Start the driver if there is work and none is running (trio thread only)."""
        with self._lock:
            if self._driving or self._closed or self._sched is None or not self._sched.has_work():
                return
            self._driving = True
        trio.lowlevel.spawn_system_task(self._driver_task, name="cocoon-cpu-engine-driver")

    async def _driver_task(self) -> None:
        try:
            await trio.to_thread.run_sync(self._drive, abandon_on_cancel=True, limiter=self._limiter)
        except trio.Cancelled:  # the trio run is ending; the thread stops at its next step
            pass
        except BaseException:  # never let a driver bug crash the whole run
            log.exception("engine driver failed")
            with self._lock:
                self._driving = False
            self._notify()

    def _drive(self) -> None:
        """The model thread: plan, run, apply, back to back, until nothing can run."""
        sched = self._sched
        assert sched is not None
        try:
            while True:
                with self._lock:
                    if self._closed or self._model is None:
                        return
                    plan = sched.plan(time.monotonic())
                if plan is None:
                    return
                try:
                    sampled = self._run(plan)
                except Exception:
                    log.exception("forward pass failed; ending %d request(s)", len(plan.rids))
                    with self._lock:
                        sched.fail(plan)
                else:
                    with self._lock:
                        sched.apply(plan, sampled, time.monotonic())
                self._notify_from_thread()
        finally:
            with self._lock:
                self._driving = False
            self._notify_from_thread()

    def _run(self, plan: Plan) -> list[int]:
        """The model thread: cache moves, one forward pass, sampling."""
        model = self._model
        if model is None:
            raise InferenceError("engine closed")
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # worker threads do not inherit it everywhere
        if self.cpus and getattr(_thread_state, "cpus", None) != self.cpus:
            os.sched_setaffinity(0, self.cpus)  # 0 = the calling thread only
            _thread_state.cpus = self.cpus
        for src, dst, n in plan.moves:
            model.move_slot(src, dst, n)
        if plan.kind == "prefill":
            logits = model.prefill(plan.slots[0], torch.tensor(plan.tokens), plan.positions[0])
            spec = plan.specs[0]
            return sample(logits.unsqueeze(0), [spec]) if spec is not None else []
        logits = model.decode(list(plan.slots), torch.tensor(plan.tokens), list(plan.positions))
        specs = [s for s in plan.specs if s is not None]
        return sample(logits, specs)
