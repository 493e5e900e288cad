"""The trio shell and result mapping shared by the exllamav2 and exllamav3 engines (no GPU library here).

Both libraries drive generation the same way: a ``Job`` per request is
``enqueue``\\ d into a ``Generator``, and each ``iterate()`` returns result
dicts (stages ``started`` / ``prefill`` / ``streaming``; a streaming result may
carry ``token_ids`` (tensor 1 x n) and ``text``; at the end ``eos_reason`` and
the tokens not yet streamed (the stop token, text held as a possible stop
string) under ``held``; ``new_tokens`` counts them all).  What differs is in
the backends (:mod:`inference.exl2`, :mod:`inference.exl3`).

- :class:`ResultMapper`: one job's result dicts -> TokenChunk* FinalChunk,
  billing ``new_tokens`` (the final chunk carries the held ids).
- :class:`GeneratorEngine`: the shell.  It has no task of its own: a
  consumer with nothing to read runs one ``iterate()`` in a worker thread
  (enqueues and cancels are applied in that thread first, never during an
  iteration) and routes the results to each job's mapper by identifier.  An
  iteration that raises fails the jobs in flight (a typed
  :class:`~inference.engine.GenerationFailed` for those with no token yet);
  after a CUDA error the device is probed and, if it is lost, every later
  request raises :class:`~inference.engine.DeviceLost` and
  :meth:`GeneratorEngine.wait_device_lost` returns.
- :func:`generator_cache_fits`: the weights (file sizes) and the KV cache of
  a model directory against the GPU's free memory, before loading.

Prompts are rendered and tokenized with our own tokenizer, so chat
templates, stop tokens and limits are the same as on the torch engines.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from overlay.errors import InferenceError, ModelLoadError

from .device import check_fits, classify_failure, describe_device, probe_device
from .engine import DeviceLost, EngineStats, GenerationFailed, MalformedRequest, ModelInfo, encode_request
from .messages import Chunk, FinalChunk, GenerateRequest, TokenChunk
from .tokenizer import Tokenizer, tokenizer_from_hf_dir

__all__ = [
    "EOS_REASONS",
    "GeneratorBackend",
    "GeneratorEngine",
    "ResultMapper",
    "check_model_dir",
    "generator_cache_fits",
]

log = logging.getLogger(__name__)

#: the libraries' eos_reason -> our finish reason (exllamav3 adds loop_detected; we never enable it)
EOS_REASONS = {
    "stop_token": "stop_token",
    "stop_string": "stop_string",
    "max_new_tokens": "length",
    "end_filter": "stop_string",
    "loop_detected": "stop_string",
}

#: bytes per cached element of each KV-cache kind (quantized kinds include their scales, roughly)
CACHE_ELEM_BYTES = {"fp16": 2.0, "q8": 1.0625, "q6": 0.8125, "q4": 0.5625}


class ResultMapper:
    """One job's result dicts -> TokenChunk* FinalChunk (pure)."""

    def __init__(self, request_id: str, prompt_tokens: int, library: str = "exllamav2") -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.library = library
        self.completion_tokens = 0
        self.finished = False

    @staticmethod
    def _ids(value: object) -> tuple[int, ...]:
        if value is None:
            return ()
        tolist = getattr(value, "tolist", None)
        items = tolist() if callable(tolist) else value
        flat: list[int] = []
        stack = [items]
        while stack:
            item = stack.pop()
            if isinstance(item, list | tuple):
                stack.extend(reversed(item))
            else:
                flat.append(int(item))  # type: ignore[arg-type]
        return tuple(flat)

    def feed(self, r: Mapping[str, Any]) -> Chunk | None:
        """Map one result dict; None for results that carry nothing for the client."""
        if self.finished or r.get("stage") != "streaming":
            return None
        ids = self._ids(r.get("token_ids"))
        text = str(r.get("text", "") or "")
        if not r.get("eos"):
            if not ids and not text:
                return None
            self.completion_tokens += len(ids)
            return TokenChunk(self.request_id, ids, text, self.completion_tokens)
        reason = EOS_REASONS.get(str(r.get("eos_reason")), "error")
        held = r.get("held") or {}
        ids += self._ids(held.get("token_ids"))
        if reason == "stop_token":  # text held back as a possible stop string was not a stop string
            text += str(held.get("text", "") or "")
        self.completion_tokens += len(ids)
        new_tokens = int(r.get("new_tokens", self.completion_tokens))
        if new_tokens != self.completion_tokens:
            log.error(
                "%s counted %d new tokens, results carried %d (request %s)",
                self.library,
                new_tokens,
                self.completion_tokens,
                self.request_id,
            )
        self.finished = True
        t_gen = float(r.get("time_generate", 0.0) or 0.0)
        n = self.completion_tokens
        return FinalChunk(
            request_id=self.request_id,
            token_ids=ids,
            text=text,
            completion_tokens=n,
            prompt_tokens=int(r.get("prompt_tokens", self.prompt_tokens)),
            finish_reason=reason,
            ttft_s=max(float(r.get("time_enqueued", 0.0)) + float(r.get("time_prefill", 0.0)), 0.0),
            decode_tok_per_s=(n - 1) / t_gen if n > 1 and t_gen > 0 else 0.0,
            queue_s=max(float(r.get("time_enqueued", 0.0)), 0.0),
        )

    def cancelled(self) -> FinalChunk:
        self.finished = True
        return FinalChunk(
            self.request_id, (), "", self.completion_tokens, self.prompt_tokens, "cancelled", 0.0, 0.0
        )

    def failed(self) -> FinalChunk:
        self.finished = True
        return FinalChunk(
            self.request_id, (), "", self.completion_tokens, self.prompt_tokens, "error", 0.0, 0.0
        )


class GeneratorBackend(Protocol):
    """What the shell needs from a generator library (a fake stands in for it in tests)."""

    max_seq_len: int  # tokens per request (prompt + completion)
    max_batch: int  # jobs the generator really runs at once (1 in exllamav2's unpaged mode)
    device: str  # "cuda:0" ("cpu" for fakes)

    def make_job(
        self, req: GenerateRequest, input_ids: list[int], stop: list[int | str], seed: int
    ) -> Any: ...

    def enqueue(self, job: Any) -> None: ...

    def cancel(self, job: Any) -> None: ...

    def iterate(self) -> list[dict[str, Any]]: ...

    def num_remaining_jobs(self) -> int: ...


BackendFactory = Callable[[Path, int, int, str], GeneratorBackend]


def check_model_dir(model_dir: Path, library: str) -> None:
    """Refuse what the library cannot load (no directory, config.json or safetensors), saying what to do."""
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"{model_dir}: {library} loads a model directory (config.json + *.safetensors), not a file; "
            "use --engine cuda or --engine cpu for GGUF files"
        )
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{model_dir}: no config.json, so {library} cannot load it; point --model at a model dir"
        )
    if not any(model_dir.glob("*.safetensors")):
        raise ModelLoadError(
            f"{model_dir}: no *.safetensors weights; {library} loads safetensors (EXL2/EXL3/GPTQ/FP16) only"
        )


def generator_cache_fits(
    model_dir: Path,
    *,
    what: str,
    device: str,
    free_bytes: int,
    context: int,
    batch: int,
    cache: str = "fp16",
) -> int:
    """Weights (their files' size) + a ``batch`` x ``context`` KV cache vs ``free_bytes``; the KV bytes."""
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        text = raw.get("text_config", raw) if isinstance(raw, dict) else {}
        heads = int(text["num_attention_heads"])
        layers = int(text["num_hidden_layers"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{model_dir / 'config.json'}: cannot read the model's shape: {e}") from e
    if cache not in CACHE_ELEM_BYTES:
        raise ModelLoadError(f"{model_dir}: unknown cache kind {cache!r} ({', '.join(CACHE_ELEM_BYTES)})")
    per_token = math.ceil(2 * layers * kv_heads * head_dim * CACHE_ELEM_BYTES[cache])
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return check_fits(
        what=what,
        device=device,
        free_bytes=free_bytes,
        weight_bytes=weights,
        per_token_bytes=per_token,
        context=context,
        batch=batch,
        align=256,
    )


@attrs.define
class _Job:
    req: GenerateRequest
    mapper: ResultMapper
    handle: Any
    out: deque[Chunk] = attrs.Factory(deque)
    enqueued: bool = False


class GeneratorEngine:
    """Continuous batching on a GPU through a library's job generator (subclassed per library)."""

    library = "generator"  # ModelInfo.engine
    format = ""  # ModelInfo.format

    def __init__(
        self,
        model_dir: str | Path,
        factory: BackendFactory,
        *,
        model_id: str | None = None,
        max_seq_len: int = 4096,
        max_batch_size: int = 16,
        max_tokens: int | None = None,
        cache: str = "fp16",
        seed: int | None = None,
        probe: Callable[[str], str | None] = probe_device,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_id = model_id or self.model_dir.name
        self.max_seq_len = max(256, math.ceil(max_seq_len / 256) * 256)  # generators want % 256 == 0
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.cache = cache
        self._factory = factory
        self._probe = probe
        self._rng = random.Random(seed)
        self._limiter = trio.CapacityLimiter(1)
        self._backend: GeneratorBackend | None = None
        self._tok: Tokenizer | None = None
        self._info: ModelInfo | None = None
        self._jobs: dict[str, _Job] = {}
        self._to_cancel: list[_Job] = []
        self._busy = False
        self._closed = False
        self._lost: str | None = None
        self._lost_event = trio.Event()
        self._why: str = ""  # the last failure, for GenerationFailed
        self._changed = trio.Event()
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0, "prompt": 0, "completion": 0, "steps": 0}

    async def load(self) -> ModelInfo:
        if self._info is not None:
            return self._info
        t0 = time.perf_counter()
        check_model_dir(self.model_dir, self.library)
        self._tok = tokenizer_from_hf_dir(self.model_dir)
        self._backend = backend = await trio.to_thread.run_sync(
            self._factory,
            self.model_dir,
            self.max_seq_len,
            self.max_batch_size,
            self.cache,
            limiter=self._limiter,
        )
        context = backend.max_seq_len
        dev = describe_device(backend.device)
        self._info = ModelInfo(
            model_id=self.model_id,
            engine=self.library,
            path=str(self.model_dir),
            format=self.format,
            n_params=0,
            vocab_size=self._tok.vocab_size,
            context_length=context,
            max_tokens=min(self.max_tokens or context, context - 1),
            max_batch=backend.max_batch,
            chat=self._tok.chat_template is not None,
            weights=self.cache,
            load_s=time.perf_counter() - t0,
            device=dev.device,
            gpu_name="" if dev.device == "cpu" else dev.name,
            gpu_memory_total=dev.memory_total,
            gpu_memory_free=dev.memory_free,
        )
        return self._info

    async def close(self) -> None:
        self._closed = True
        for rid in list(self._jobs):
            await self.cancel(rid)
        with trio.move_on_after(30):
            while self._busy:
                await self._changed.wait()
        self._backend = None

    async def wait_device_lost(self) -> str:
        """Return why, once the GPU is lost for good."""
        await self._lost_event.wait()
        return self._lost or "device lost"

    def stats(self) -> EngineStats:
        running = sum(1 for j in self._jobs.values() if j.enqueued and not j.mapper.finished)
        c = self._counts
        return EngineStats(
            running=running,
            waiting=sum(1 for j in self._jobs.values() if not j.enqueued),
            paused=0,
            free_slots=max(self.max_batch_size - running, 0),
            completed=c["completed"],
            cancelled=c["cancelled"],
            failed=c["failed"],
            prompt_tokens=c["prompt"],
            completion_tokens=c["completion"],
            steps=c["steps"],
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------------ requests

    def count_prompt_tokens(self, request: GenerateRequest) -> int:
        """Prompt tokens ``request`` will be billed for (it is fully checked first)."""
        return len(self._encode(request))

    def _encode(self, req: GenerateRequest) -> list[int]:
        if self._lost is not None:
            raise DeviceLost(f"the GPU is lost ({self._lost}); this worker serves nothing more")
        if self._closed or self._tok is None or self._info is None:
            raise InferenceError("engine closed" if self._closed else "engine not loaded")
        return encode_request(
            req,
            self._tok,
            vocab_size=self._info.vocab_size,
            max_tokens=self._info.max_tokens,
            context=self._info.context_length,
        )

    def _submit(self, req: GenerateRequest) -> _Job:
        ids = self._encode(req)
        if self._backend is None or self._tok is None:
            raise InferenceError("engine closed")
        if req.request_id in self._jobs:
            raise MalformedRequest(f"request id {req.request_id!r} is already in flight")
        stop: list[int | str] = [*req.stop_token_ids, *req.stop]
        if not req.ignore_eos:
            stop.extend(self._tok.eos_token_ids)  # a job has no stop token unless we pass it
        seed = req.seed if req.seed is not None else self._rng.getrandbits(63)
        handle = self._backend.make_job(req, ids, list(dict.fromkeys(stop)), seed)
        job = _Job(req, ResultMapper(req.request_id, len(ids), self.library), handle)
        self._jobs[req.request_id] = job
        self._counts["prompt"] += len(ids)
        return job

    async def generate_stream(self, request: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        job = self._submit(request)
        self._notify()
        finished = False
        first = True
        try:
            while True:
                if job.out:
                    chunk = job.out.popleft()
                    finished = isinstance(chunk, FinalChunk)
                    if (
                        isinstance(chunk, FinalChunk)
                        and first
                        and chunk.finish_reason == "error"
                        and not chunk.completion_tokens
                    ):
                        if self._lost is not None:
                            raise DeviceLost(f"the GPU is lost ({self._lost})")
                        raise GenerationFailed(f"request {request.request_id} failed: {self._why}")
                    first = False
                    yield chunk
                    if finished:
                        return
                    continue
                await self._advance()
        finally:
            if self._jobs.get(request.request_id) is job:
                del self._jobs[request.request_id]
            if not finished and not job.mapper.finished:
                job.mapper.finished = True
                self._to_cancel.append(job)
                self._counts["cancelled"] += 1
                self._notify()

    async def cancel(self, request_id: str) -> bool:
        job = self._jobs.get(request_id)
        if job is None or job.mapper.finished:
            return False
        self._to_cancel.append(job)
        job.out.append(job.mapper.cancelled())
        self._counts["cancelled"] += 1
        self._notify()
        return True

    # ------------------------------------------------------------------ driving the generator

    async def _advance(self) -> None:
        if self._busy:
            await self._changed.wait()
            return
        backend = self._backend
        if backend is None:
            raise InferenceError("engine closed")
        enqueue = [j for j in self._jobs.values() if not j.enqueued and not j.mapper.finished]
        cancel, self._to_cancel = self._to_cancel, []
        for j in enqueue:
            j.enqueued = True
        self._busy = True
        try:
            results = await trio.to_thread.run_sync(
                self._iterate, backend, enqueue, cancel, limiter=self._limiter
            )
        except Exception as e:
            await self._failed(backend, e)
        else:
            self._route(results)
        finally:
            self._busy = False
            self._notify()

    async def _failed(self, backend: GeneratorBackend, exc: Exception) -> None:
        """An iteration raised: every job in flight fails; after a CUDA error, probe the device."""
        kind = classify_failure(exc)
        log.error("%s iteration failed (%s): %s: %s", self.library, kind, type(exc).__name__, exc)
        self._why = f"{type(exc).__name__}: {exc}"
        if kind == "cuda":
            lost = await trio.to_thread.run_sync(self._probe, backend.device, limiter=self._limiter)
            if lost is not None:
                log.critical("%s is lost (%s)", backend.device, lost)
                self._lost = lost
                self._lost_event.set()
        for j in list(self._jobs.values()):
            if not j.mapper.finished:
                j.out.append(j.mapper.failed())
                self._counts["failed"] += 1
                if j.enqueued and self._lost is None:
                    self._to_cancel.append(j)  # free its pages at the next iteration

    @staticmethod
    def _iterate(backend: GeneratorBackend, enqueue: list[_Job], cancel: list[_Job]) -> list[dict[str, Any]]:
        for j in cancel:
            if j.enqueued:
                backend.cancel(j.handle)
        for j in enqueue:
            backend.enqueue(j.handle)
        if not backend.num_remaining_jobs():
            return []
        return backend.iterate()

    def _route(self, results: list[dict[str, Any]]) -> None:
        self._counts["steps"] += 1
        for r in results:
            job = self._jobs.get(str(r.get("identifier")))
            if job is None:
                continue
            chunk = job.mapper.feed(r)
            if chunk is None:
                continue
            self._counts["completion"] += len(chunk.token_ids)
            if isinstance(chunk, FinalChunk):
                self._counts["failed" if chunk.finish_reason == "error" else "completed"] += 1
            job.out.append(chunk)
