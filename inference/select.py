"""``--engine auto|cpu|exllamav2``: pick and construct an engine for a model.

- ``cpu``: the torch CPU engine (HF directories and GGUF files);
- ``exllamav2``: the GPU engine; a clear ConfigError when CUDA or exllamav2 is
  missing, or when the model is a GGUF file (exllamav2 loads directories);
- ``auto``: exllamav2 when a CUDA device is present, exllamav2 imports, and
  the model is a directory; otherwise the CPU engine.

Nothing is loaded here: call ``await engine.load()``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from overlay.errors import ConfigError

from .cpu import TorchEngine
from .engine import Engine
from .exl2 import ExLlamaV2Engine, exllamav2_available
from .models import resolve_model

__all__ = ["ENGINE_KINDS", "select_engine"]

ENGINE_KINDS = ("auto", "cpu", "exllamav2")

log = logging.getLogger(__name__)


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
    if kind in ("auto", "exllamav2"):
        ok, why = exllamav2_available()
        if kind == "exllamav2" and not ok:
            raise ConfigError(f"--engine exllamav2: {why}")
        if kind == "exllamav2" and not path.is_dir():
            raise ConfigError(f"--engine exllamav2 loads model directories (EXL2/GPTQ/FP16), not {path.name}")
        if ok and path.is_dir():
            log.info("engine: exllamav2 for %s", path)
            return ExLlamaV2Engine(
                path,
                model_id=mid,
                max_seq_len=context or 4096,
                max_batch_size=max_batch,
                max_tokens=max_tokens,
            )
        if kind == "auto":
            log.info("engine: cpu for %s (%s)", path, why if not ok else "GGUF file")
    return TorchEngine(
        path, model_id=mid, threads=threads, slots=max_batch, context=context, max_tokens=max_tokens
    )
