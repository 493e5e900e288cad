"""``--engine auto|cpu|cuda|exllamav2|exllamav3``: pick and construct an engine for a model.

- ``cpu``: the torch engine on the CPU (int8 weights; HF directories and GGUF files);
- ``cuda``: the same torch engine on a CUDA GPU (fp16 weights, SDPA attention,
  the batching scheduler, CUDA graphs for decode steps; HF directories and
  GGUF files, Llama family);
- ``exllamav3``: exllamav3's generator (EXL3 or FP16 directories; paged
  attention in Triton, so it batches without flash-attn);
- ``exllamav2``: exllamav2's dynamic generator (EXL2/GPTQ/FP16 directories;
  it batches only with flash-attn, else it runs one request at a time and
  reports ``max_batch`` 1);
- ``auto``: without CUDA, ``cpu``.  With CUDA, the first that *loads* of

  1. ``exllamav3``, if it imports and the model is a directory: the
     maintained library, batching on any GPU, fused kernels and quantized
     (EXL3) weights;
  2. ``exllamav2`` before ``cuda`` only when flash-attn is installed (its
     paged mode batches and runs EXL2 weights);
  3. ``cuda``: batches on any GPU and loads every Llama-family HF directory
     and GGUF file;
  4. ``exllamav2`` without flash-attn last (batch 1), for EXL2/GPTQ
     directories nothing else loads.

  The order follows what batches for real on a GPU without flash-attn (most
  consumer GPUs); it is not measured yet (``bench/gpu.py`` measures it).  A
  candidate that fails to load is logged and the next one tried; a
  :class:`~inference.engine.DeviceMemoryError` stops the search (it would
  not fit elsewhere either: lower the context or the batch).

Nothing is loaded here (the availability checks import the GPU libraries,
whose first import JIT-builds them: minutes); the ``auto`` choice, like
every load, is made in ``await engine.load()``, and ``AutoEngine.kind``
names the engine chosen (so does ``ModelInfo.engine``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import trio

from overlay.errors import ConfigError, InferenceError, ModelLoadError

from .cpu import TorchEngine
from .engine import DeviceMemoryError, Engine, EngineStats, ModelInfo
from .exl2 import ExLlamaV2Engine, exllamav2_available, flash_attn_available
from .exl3 import ExLlamaV3Engine, exllamav3_available
from .messages import Chunk, GenerateRequest
from .models import resolve_model

__all__ = ["ENGINE_KINDS", "AutoEngine", "auto_order", "cuda_available", "select_engine"]

ENGINE_KINDS = ("auto", "cpu", "cuda", "exllamav2", "exllamav3")

log = logging.getLogger(__name__)

Maker = Callable[[], Engine]


def cuda_available() -> tuple[bool, str]:
    """Whether torch sees a CUDA device, and if not, why."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, "ok"


def auto_order(*, cuda: bool, is_dir: bool, exl3: bool, exl2: bool, flash_attn: bool) -> list[str]:
    """The engines ``auto`` tries, best first (pure; see the module docstring)."""
    if not cuda:
        return ["cpu"]
    order: list[str] = []
    if is_dir and exl3:
        order.append("exllamav3")
    if is_dir and exl2 and flash_attn:
        order.append("exllamav2")
    order.append("cuda")
    if is_dir and exl2 and not flash_attn:
        order.append("exllamav2")
    return order


class AutoEngine:
    """Loads the first candidate engine that loads, then forwards every call to it."""

    def __init__(self, candidates: list[tuple[str, Maker]]) -> None:
        self.candidates = candidates
        self.kind = ""  # the engine chosen, once loaded
        self.tried: list[str] = []  # "kind: why it did not load"
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise InferenceError("engine not loaded")
        return self._engine

    async def load(self) -> ModelInfo:
        if self._engine is not None:
            return await self._engine.load()
        for kind, make in self.candidates:
            engine = make()
            try:
                info = await engine.load()
            except DeviceMemoryError:
                raise
            except Exception as e:  # a library's own error while loading: try the next one
                self.tried.append(f"{kind}: {e}")
                log.warning("engine %s did not load (%s); trying the next one", kind, e)
                await engine.close()
                continue
            self._engine, self.kind = engine, kind
            log.info("engine: %s (auto; batch %d)", kind, info.max_batch)
            return info
        raise ModelLoadError("no engine could load the model: " + "; ".join(self.tried))

    def generate_stream(self, request: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        return self.engine.generate_stream(request)

    async def cancel(self, request_id: str) -> bool:
        return await self.engine.cancel(request_id)

    def count_prompt_tokens(self, request: GenerateRequest) -> int:
        return self.engine.count_prompt_tokens(request)

    def stats(self) -> EngineStats:
        if self._engine is None:
            return EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        return self._engine.stats()

    async def wait_device_lost(self) -> str:
        wait = getattr(self._engine, "wait_device_lost", None)
        if wait is None:
            await trio.sleep_forever()
        assert wait is not None
        reason: str = await wait()
        return reason

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.close()


def select_engine(
    kind: str,
    model: str | Path = "default",
    *,
    model_id: str | None = None,
    threads: int | None = None,
    max_batch: int = 8,
    context: int | None = None,
    max_tokens: int | None = None,
) -> Engine:
    """An unloaded engine of ``kind`` for ``model`` ("default", a GGUF file or a model directory)."""
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINE_KINDS)}, not {kind!r}")
    resolved_id, path = resolve_model(str(model))
    mid = model_id or resolved_id

    def cpu() -> Engine:
        return TorchEngine(
            path, model_id=mid, threads=threads, slots=max_batch, context=context, max_tokens=max_tokens
        )

    def cuda() -> Engine:
        return TorchEngine(
            path,
            model_id=mid,
            threads=threads,
            slots=max_batch,
            context=context,
            max_tokens=max_tokens,
            device="cuda",
            weights="fp16",
        )

    def exl2() -> Engine:
        return ExLlamaV2Engine(
            path, model_id=mid, max_seq_len=context or 4096, max_batch_size=max_batch, max_tokens=max_tokens
        )

    def exl3() -> Engine:
        return ExLlamaV3Engine(
            path, model_id=mid, max_seq_len=context or 4096, max_batch_size=max_batch, max_tokens=max_tokens
        )

    makers: dict[str, Maker] = {"cpu": cpu, "cuda": cuda, "exllamav2": exl2, "exllamav3": exl3}
    if kind == "cpu":
        return cpu()
    if kind == "cuda":
        ok, why = cuda_available()
        if not ok:
            raise ConfigError(f"--engine cuda: {why}; use --engine cpu")
        return cuda()
    if kind in ("exllamav2", "exllamav3"):
        ok, why = (exllamav2_available if kind == "exllamav2" else exllamav3_available)()
        if not ok:
            raise ConfigError(f"--engine {kind}: {why}")
        if not path.is_dir():
            raise ConfigError(f"--engine {kind} loads model directories, not {path.name}; use --engine cuda")
        return makers[kind]()
    has_cuda, why = cuda_available()
    order = auto_order(
        cuda=has_cuda,
        is_dir=path.is_dir(),
        exl3=has_cuda and path.is_dir() and exllamav3_available()[0],
        exl2=has_cuda and path.is_dir() and exllamav2_available()[0],
        flash_attn=flash_attn_available(),
    )
    if not has_cuda:
        log.info("engine: cpu for %s (%s)", path, why)
        return cpu()
    log.info("engine auto for %s: trying %s", path, ", ".join(order))
    return AutoEngine([(k, makers[k]) for k in order])
