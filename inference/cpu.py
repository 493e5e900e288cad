"""The torch engine (``cpu`` and ``cuda``): the trio shell around :mod:`inference.scheduler` and the model.

One class serves both engine kinds; only the model and the device differ:

- ``TorchEngine(path)`` (``--engine cpu``): int8 or fp32 weights through
  :class:`~inference.llama.LlamaModel` and its TorchScript decode loop;
- ``TorchEngine(path, device="cuda")`` (``--engine cuda``): fp16 (default) or
  bf16 weights through :class:`~inference.dense.DenseLlama` (SDPA, CUDA
  graphs for decode steps).  The same dense path runs on the CPU with
  ``weights="bf16"`` / ``"fp16"``, or ``dense=True`` with fp32, which is how it
  is tested without a GPU.

Before the KV cache is allocated on a GPU its bytes are compared with the
free memory (:func:`inference.device.check_fits`): a context that does not
fit fails the load with a :class:`~inference.engine.DeviceMemoryError`
naming what to lower.  A forward pass that raises ends only the requests of
that step (:class:`~inference.engine.GenerationFailed` if they had no token
yet, else a final chunk of reason ``error``); after a CUDA error the device
is probed, and if it no longer computes the engine is *lost*: every request
ends, new ones raise :class:`~inference.engine.DeviceLost`, and
:meth:`TorchEngine.wait_device_lost` returns (the worker withdraws its offers).

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
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import torch
import trio

from overlay.errors import InferenceError

from .dense import DenseLlama
from .device import GIB, check_fits, classify_failure, describe_device, dtype_bytes, probe_device
from .engine import DeviceLost, DeviceMemoryError, EngineStats, GenerationFailed, ModelInfo
from .llama import LlamaModel
from .loader import LoadedModel, load_model
from .messages import Chunk, FinalChunk, GenerateRequest
from .sampling import sample
from .scheduler import Plan, Scheduler

__all__ = ["TorchEngine"]

log = logging.getLogger(__name__)
_thread_state = threading.local()


_WEIGHTS = ("int8", "fp32", "fp16", "bf16")


class TorchEngine:
    """Llama-family models on the CPU or a CUDA GPU with continuous batching."""

    def __init__(
        self,
        path: str | Path,
        *,
        model_id: str | None = None,
        weights: str | None = None,
        slots: int = 8,
        context: int | None = None,
        max_tokens: int | None = None,
        threads: int | None = None,
        prefill_chunk: int = 256,
        max_buffered: int = 64,
        seed: int | None = None,
        cpus: frozenset[int] | None = None,
        device: str = "cpu",
        dense: bool | None = None,
        cuda_graphs: bool = True,
        free_memory: int | None = None,
        probe: Callable[[str], str | None] = probe_device,
    ) -> None:
        gpu = device.startswith("cuda")
        weights = weights or ("fp16" if gpu else "int8")
        if weights not in _WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(_WEIGHTS)}, not {weights!r}")
        if weights == "int8" and gpu:
            raise ValueError("int8 weights run on the CPU only; use fp16 or bf16 on a GPU")
        self.device = device
        self.dense = dense if dense is not None else (gpu or weights in ("fp16", "bf16"))
        if weights in ("fp16", "bf16") and not self.dense:
            raise ValueError(f"{weights} weights run on the dense path only")
        if weights == "int8" and self.dense:
            raise ValueError("the dense path takes fp32, fp16 or bf16 weights")
        self.cuda_graphs = cuda_graphs
        self.free_memory = free_memory  # bytes; None = ask the device (tests inject a figure)
        self._probe = probe
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
        self._model: LlamaModel | DenseLlama | None = None
        self._sched: Scheduler | None = None
        self._lost: str | None = None  # why the device is lost, once it is
        self._lost_event = trio.Event()
        self._failures: dict[str, str] = {}  # request id -> why its forward pass failed
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
        try:
            loaded = await trio.to_thread.run_sync(
                functools.partial(load_model, self.path, weights=self.weights, device=self.device),
                limiter=self._limiter,
            )
        except Exception as e:
            if classify_failure(e) != "oom":
                raise
            raise DeviceMemoryError(
                f"{self.path}: the {self.weights} weights do not fit in {self.device}'s memory ({e}); "
                "use a smaller model or a GPU with more memory"
            ) from e
        cfg = loaded.config
        context = min(self.context or min(cfg.max_position, 2048), cfg.max_position)
        max_tokens = min(self.max_tokens or context, context - 1)
        elem = 4 if self.weights in ("int8", "fp32") else dtype_bytes(self.weights)
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
        free = self.free_memory
        if free is None and self.device.startswith("cuda"):
            free = describe_device(self.device).memory_free
        if free is not None:  # weights are resident: only the cache (and a reserve) must still fit
            check_fits(
                what=f"{self.path.name} on {self.device}",
                device=self.device,
                free_bytes=free,
                weight_bytes=0,
                per_token_bytes=per_token,
                context=context,
                batch=self.slots,
            )
        if self.dense:
            self._model = DenseLlama(
                cfg, loaded.weights, slots=self.slots, context=context, cuda_graphs=self.cuda_graphs
            )
        else:
            self._model = LlamaModel(cfg, loaded.weights, slots=self.slots, context=context)
        self._loaded = loaded
        dev = describe_device(self.device)
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
            engine="cuda" if self.device.startswith("cuda") else "cpu",
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
            device=dev.device,
            gpu_name="" if dev.device == "cpu" else dev.name,
            gpu_memory_total=dev.memory_total,
            gpu_memory_free=dev.memory_free,
            kv_cache_bytes=per_token * context * self.slots,
        )
        log.info(
            "loaded %s (%s, %d params, %s weights on %s, KV cache %.2f GiB) in %.2f s",
            self.model_id,
            loaded.format,
            loaded.n_params,
            self.weights,
            dev.summary(),
            self._info.kv_cache_bytes / GIB,
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

    async def wait_device_lost(self) -> str:
        """Return why, once the device is lost for good (see the module docstring)."""
        await self._lost_event.wait()
        return self._lost or "device lost"

    def _scheduler(self) -> Scheduler:
        if self._lost is not None:
            raise DeviceLost(f"{self.device} is lost ({self._lost}); this worker serves nothing more")
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
        self._failures.pop(rid, None)
        self._kick()
        finished = False
        first = True
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
                failed = isinstance(chunk, FinalChunk) and chunk.finish_reason == "error"
                if failed and first and not chunk.completion_tokens:
                    self._raise_failure(rid)  # nothing was produced, nothing billed: a typed error
                first = False
                self._kick()  # taking may have unpaused the sequence
                yield chunk
                if finished:
                    return
        finally:
            self._failures.pop(rid, None)
            if not finished:
                with self._lock:
                    sched.discard(rid)
                self._kick()  # a freed slot may admit a waiting request

    def _raise_failure(self, rid: str) -> None:
        why = self._failures.pop(rid, "the forward pass failed")
        if self._lost is not None:
            raise DeviceLost(f"{self.device} is lost ({self._lost})")
        raise GenerationFailed(f"request {rid} failed on {self.device}: {why}")

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
            if self._driving or self._closed or self._lost is not None:
                return
            if self._sched is None or not self._sched.has_work():
                return
            self._driving = True
        trio.lowlevel.spawn_system_task(self._driver_task, name="cocoon-cpu-engine-driver")

    async def _driver_task(self) -> None:
        try:
            await trio.to_thread.run_sync(self._drive, abandon_on_cancel=True, limiter=self._limiter)
        except trio.Cancelled:  # the trio run is ending; the thread stops at its next step
            pass
        except BaseException as e:
            # A driver bug must not crash the whole run, but KeyboardInterrupt / SystemExit
            # (and any other non-Exception) still go up after the engine is left consistent.
            log.exception("engine driver failed")
            with self._lock:
                self._driving = False
            self._notify()
            if not isinstance(e, Exception):
                raise

    def _drive(self) -> None:
        """The model thread: plan, run, apply, back to back, until nothing can run."""
        sched = self._sched
        assert sched is not None
        try:
            while True:
                with self._lock:
                    if self._closed or self._lost is not None or self._model is None:
                        return
                    plan = sched.plan(time.monotonic())
                if plan is None:
                    return
                try:
                    sampled = self._run(plan)
                except Exception as e:
                    self._failed(sched, plan, e)
                else:
                    with self._lock:
                        sched.apply(plan, sampled, time.monotonic())
                self._notify_from_thread()
        finally:
            with self._lock:
                self._driving = False
            self._notify_from_thread()

    def _failed(self, sched: Scheduler, plan: Plan, exc: Exception) -> None:
        """The model thread: a forward pass raised; end its requests (all of them if the device is lost)."""
        kind = classify_failure(exc)
        log.error(
            "forward pass failed (%s): %s: %s; ending %d request(s)",
            kind,
            type(exc).__name__,
            exc,
            len(plan.rids),
            exc_info=kind == "other",
        )
        lost = self._probe(self.device) if kind == "cuda" else None
        with self._lock:
            for rid in plan.rids:
                self._failures[rid] = f"{type(exc).__name__}: {exc}"
            sched.fail(plan)
            if lost is not None:
                self._lost = lost
                failed = sched.fail_all()
                log.critical("%s is lost (%s); ended %d more request(s)", self.device, lost, len(failed))
        if kind == "oom" and self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if lost is not None and self._token is not None:
            try:
                self._token.run_sync_soon(self._lost_event.set)
            except trio.RunFinishedError:
                pass

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
