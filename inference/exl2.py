"""The ExLlamaV2 engine for GPU workers (``gpu`` extra; imported lazily, CUDA only).

``exllamav2`` JIT-builds its CUDA extension on import and fails without
CUDA, so it is imported only inside :func:`open_exllamav2` (run by
:meth:`ExLlamaV2Engine.load`).  Everything else here is plain Python and is
tested on any machine:

- :func:`ensure_rope_theta`: exllamav2 reads only a *top-level* ``rope_theta``
  from config.json and silently uses 10000 otherwise, while transformers 5
  writes it under ``rope_parameters``.  We write the top-level key (and
  check the loaded config against it).
- :class:`ResultMapper`: the dynamic generator's result dicts -> our chunks.
  A streaming result may carry ``token_ids`` (tensor 1 x n) and ``text``; at
  the end, ``eos_reason`` is stop_token | stop_string | max_new_tokens |
  end_filter and the tokens not yet streamed (the stop token, text held as a
  possible stop string) sit in ``held``.  ``new_tokens`` counts them all, and
  so do we: the final chunk carries the held ids, so the chunks' ids add up
  to ``new_tokens``.
- :class:`ExLlamaV2Engine`: the trio shell.  Like the CPU engine it has no
  task of its own: a consumer with nothing to read runs one
  ``generator.iterate()`` in a worker thread (enqueues and cancels are applied
  in that thread first, never during an iteration) and routes the results to
  each job's mapper by identifier.

Prompts are rendered and tokenized with our own tokenizer
(:mod:`inference.tokenizer`), so chat templates, stop tokens and limits are
the same as on the CPU engine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from overlay.errors import InferenceError, ModelLoadError

from .engine import EngineStats, MalformedRequest, ModelInfo, encode_request
from .messages import Chunk, FinalChunk, GenerateRequest, TokenChunk
from .tokenizer import Tokenizer, tokenizer_from_hf_dir

__all__ = [
    "ExLlamaV2Backend",
    "ExLlamaV2Engine",
    "ResultMapper",
    "ensure_rope_theta",
    "exllamav2_available",
    "open_exllamav2",
]

log = logging.getLogger(__name__)

_EOS_REASONS = {
    "stop_token": "stop_token",
    "stop_string": "stop_string",
    "max_new_tokens": "length",
    "end_filter": "stop_string",
}


def exllamav2_available() -> tuple[bool, str]:
    """Whether the ExLlamaV2 engine can run here, and if not, why (for ``--engine``)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("exllamav2") is None:
        return False, "exllamav2 is not installed (pip install 'cocoon-node[gpu]')"
    try:
        import exllamav2  # noqa: F401  (JIT-builds the extension the first time: minutes)
    except Exception as e:
        return False, f"import exllamav2 failed: {type(e).__name__}: {e}"
    return True, "ok"


def ensure_rope_theta(model_dir: Path) -> float:
    """Make config.json carry a top-level ``rope_theta``; return it."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    top = raw.get("rope_theta")
    params = raw.get("rope_parameters")
    nested = params.get("rope_theta") if isinstance(params, dict) else None
    if top is not None and nested is not None and float(top) != float(nested):
        raise ModelLoadError(f"{path}: rope_theta {top} disagrees with rope_parameters.rope_theta {nested}")
    if top is not None:
        return float(top)
    theta = float(nested) if nested is not None else 10000.0
    raw["rope_theta"] = theta
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(raw, indent=2), encoding="utf-8")
        os.replace(tmp, path)
        log.warning("%s: wrote top-level rope_theta=%s (exllamav2 ignores rope_parameters)", path, theta)
    except OSError as e:  # read-only model dir: the loaded config is patched instead
        log.warning("%s: cannot write rope_theta (%s); patching the loaded config", path, e)
    return theta


class ResultMapper:
    """One job's result dicts -> TokenChunk* FinalChunk (pure)."""

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
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
        reason = _EOS_REASONS.get(str(r.get("eos_reason")), "error")
        held = r.get("held") or {}
        ids += self._ids(held.get("token_ids"))
        if reason == "stop_token":  # text held back as a possible stop string was not a stop string
            text += str(held.get("text", "") or "")
        self.completion_tokens += len(ids)
        new_tokens = int(r.get("new_tokens", self.completion_tokens))
        if new_tokens != self.completion_tokens:
            log.error(
                "exllamav2 counted %d new tokens, results carried %d (request %s)",
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


class ExLlamaV2Backend(Protocol):
    """What the engine needs from exllamav2 (a fake stands in for it in tests)."""

    max_seq_len: int
    rope_theta: float

    def make_job(
        self, req: GenerateRequest, input_ids: list[int], stop: list[int | str], seed: int
    ) -> Any: ...

    def enqueue(self, job: Any) -> None: ...

    def cancel(self, job: Any) -> None: ...

    def iterate(self) -> list[dict[str, Any]]: ...

    def num_remaining_jobs(self) -> int: ...


@attrs.define
class _Job:
    req: GenerateRequest
    mapper: ResultMapper
    handle: Any
    out: deque[Chunk] = attrs.Factory(deque)
    enqueued: bool = False


class ExLlamaV2Engine:
    """Continuous batching on a GPU through exllamav2's dynamic generator."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_id: str | None = None,
        max_seq_len: int = 4096,
        max_batch_size: int = 16,
        max_tokens: int | None = None,
        cache: str = "fp16",
        seed: int | None = None,
        backend_factory: Callable[[Path, int, int, str], ExLlamaV2Backend] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_id = model_id or self.model_dir.name
        self.max_seq_len = max(256, math.ceil(max_seq_len / 256) * 256)  # the generator asserts % 256 == 0
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.cache = cache
        self._factory = backend_factory or open_exllamav2
        self._rng = random.Random(seed)
        self._limiter = trio.CapacityLimiter(1)
        self._backend: ExLlamaV2Backend | None = None
        self._tok: Tokenizer | None = None
        self._info: ModelInfo | None = None
        self._jobs: dict[str, _Job] = {}
        self._to_cancel: list[_Job] = []
        self._busy = False
        self._closed = False
        self._changed = trio.Event()
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0, "prompt": 0, "completion": 0, "steps": 0}

    async def load(self) -> ModelInfo:
        if self._info is not None:
            return self._info
        t0 = time.perf_counter()
        self._tok = tokenizer_from_hf_dir(self.model_dir)
        self._backend = await trio.to_thread.run_sync(
            self._factory,
            self.model_dir,
            self.max_seq_len,
            self.max_batch_size,
            self.cache,
            limiter=self._limiter,
        )
        context = self._backend.max_seq_len
        self._info = ModelInfo(
            model_id=self.model_id,
            engine="exllamav2",
            path=str(self.model_dir),
            format="exl2",
            n_params=0,
            vocab_size=self._tok.vocab_size,
            context_length=context,
            max_tokens=min(self.max_tokens or context, context - 1),
            max_batch=self.max_batch_size,
            chat=self._tok.chat_template is not None,
            weights=self.cache,
            load_s=time.perf_counter() - t0,
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
        job = _Job(req, ResultMapper(req.request_id, len(ids)), handle)
        self._jobs[req.request_id] = job
        self._counts["prompt"] += len(ids)
        return job

    async def generate_stream(self, request: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        job = self._submit(request)
        self._notify()
        finished = False
        try:
            while True:
                if job.out:
                    chunk = job.out.popleft()
                    finished = isinstance(chunk, FinalChunk)
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
        except Exception:
            log.exception("exllamav2 iteration failed")
            for j in list(self._jobs.values()):
                if not j.mapper.finished:
                    j.mapper.finished = True
                    j.out.append(
                        FinalChunk(j.req.request_id, (), "", j.mapper.completion_tokens, 0, "error", 0.0, 0.0)
                    )
                    self._counts["failed"] += 1
        else:
            self._route(results)
        finally:
            self._busy = False
            self._notify()

    @staticmethod
    def _iterate(backend: ExLlamaV2Backend, enqueue: list[_Job], cancel: list[_Job]) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------- the real backend (GPU only)


@attrs.define
class _RealBackend:
    generator: Any
    job_cls: Any
    settings_cls: Any
    max_seq_len: int
    rope_theta: float

    def make_job(self, req: GenerateRequest, input_ids: list[int], stop: list[int | str], seed: int) -> Any:
        import torch

        if req.temperature <= 0 or req.top_k == 1:
            settings = self.settings_cls.greedy()
        else:
            settings = self.settings_cls()
            settings.temperature = req.temperature
            settings.top_k = req.top_k  # 0 = off
            settings.top_p = 0.0 if req.top_p >= 1.0 else req.top_p  # 0 = off
            settings.min_p = 0.0
            settings.token_repetition_penalty = 1.0  # exllamav2's default is 1.025
        return self.job_cls(
            input_ids=torch.tensor([input_ids], dtype=torch.long),
            max_new_tokens=req.max_tokens,
            gen_settings=settings,
            seed=seed,
            stop_conditions=stop,
            identifier=req.request_id,
            decode_special_tokens=False,
        )

    def enqueue(self, job: Any) -> None:
        self.generator.enqueue(job)

    def cancel(self, job: Any) -> None:
        self.generator.cancel(job)

    def iterate(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self.generator.iterate()
        return results

    def num_remaining_jobs(self) -> int:
        return int(self.generator.num_remaining_jobs())


def open_exllamav2(model_dir: Path, max_seq_len: int, max_batch_size: int, cache: str) -> ExLlamaV2Backend:
    """Load a model with exllamav2 (CUDA only; imports it here, lazily)."""
    theta = ensure_rope_theta(model_dir)
    ok, why = exllamav2_available()
    if not ok:
        raise ModelLoadError(f"{model_dir}: cannot use exllamav2: {why}")
    from exllamav2 import (
        ExLlamaV2,
        ExLlamaV2Cache,
        ExLlamaV2Cache_Q4,
        ExLlamaV2Cache_Q6,
        ExLlamaV2Config,
    )
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    try:
        config = ExLlamaV2Config(str(model_dir))
        config.arch_compat_overrides()
        if float(getattr(config, "rotary_embedding_base", theta)) != theta:
            log.warning("exllamav2 read rope base %s; setting %s", config.rotary_embedding_base, theta)
            config.rotary_embedding_base = theta
        config.max_seq_len = max_seq_len
        model = ExLlamaV2(config)
        cache_cls = {"fp16": ExLlamaV2Cache, "q4": ExLlamaV2Cache_Q4, "q6": ExLlamaV2Cache_Q6}[cache]
        kv = cache_cls(model, max_seq_len=max_seq_len, lazy=True)
        model.load_autosplit(kv)
        from exllamav2 import ExLlamaV2Tokenizer

        tokenizer = ExLlamaV2Tokenizer(config)
        paged = importlib.util.find_spec("flash_attn") is not None  # paged mode needs flash-attn >= 2.5.7
        generator = ExLlamaV2DynamicGenerator(
            model=model,
            cache=kv,
            tokenizer=tokenizer,
            max_batch_size=max_batch_size if paged else 1,
            paged=paged,
        )
        generator.warmup()
    except KeyError:
        raise ModelLoadError(f"{model_dir}: unknown cache kind {cache!r} (fp16, q4, q6)") from None
    except Exception as e:
        raise ModelLoadError(f"{model_dir}: exllamav2 could not load the model: {e}") from e
    return _RealBackend(generator, ExLlamaV2DynamicJob, ExLlamaV2Sampler.Settings, max_seq_len, theta)
