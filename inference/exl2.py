"""The ExLlamaV2 engine for GPU workers (``gpu`` extra; imported lazily, CUDA only).

``exllamav2`` JIT-builds its CUDA extension on import and fails without
CUDA, so it is imported only inside :func:`open_exllamav2` (run by
:meth:`ExLlamaV2Engine.load`).  The shell and the result-dict mapping are
shared with exllamav3 (:mod:`inference.jobs`); here are the library's
quirks, all plain Python and tested on any machine:

- :func:`ensure_rope_theta`: exllamav2 reads only a *top-level* ``rope_theta``
  from config.json and silently uses 10000 otherwise, while transformers 5
  writes it under ``rope_parameters``.  We write the top-level key (and
  check the loaded config against it).
- Batch: the dynamic generator's paged mode needs flash-attn >= 2.5.7;
  without it we run the unpaged mode, which decodes **one** job at a time, and
  say so (``ModelInfo.max_batch`` = 1, so offers advertise capacity 1).  In
  paged mode the cache holds ``max_batch`` full contexts.
- Prompt attention without flash-attn and xformers: exllamav2 0.3.2's torch
  SDPA path (``ExLlamaV2Attention._attn_torch``) passes the mask of
  ``get_block_diag_mask()``, which is None outside packed batches, so a
  prompt chunk attends to its *future* tokens.  Decoding one token at a time
  is unaffected, which is why only the first tokens after a prompt differ
  (the greedy ids of notes/gpu.md, [108, 148, 133, 369], are reproduced on a
  CPU by running the prompt without its causal mask:
  ``tests/unit/test_inference_exl2.py``).  We set ``config.no_sdpa`` there,
  which selects its matmul attention with a proper causal mask.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from overlay.errors import ModelLoadError

from .device import describe_device, probe_device
from .engine import DeviceMemoryError
from .jobs import (
    BackendFactory,
    GeneratorBackend,
    GeneratorEngine,
    ResultMapper,
    check_model_dir,
    generator_cache_fits,
)
from .messages import GenerateRequest

__all__ = [
    "ExLlamaV2Backend",
    "ExLlamaV2Engine",
    "ResultMapper",
    "ensure_rope_theta",
    "exllamav2_available",
    "flash_attn_available",
    "open_exllamav2",
]

log = logging.getLogger(__name__)

ExLlamaV2Backend = GeneratorBackend  # the name tests and callers used before exllamav3 shared it

_HINT = (
    "exllamav2 loads EXL2, GPTQ and FP16/BF16 safetensors directories of the architectures it knows; "
    "try --engine exllamav3, or --engine cuda (our torch engine: Llama family, HF dirs and GGUF files)"
)


def flash_attn_available() -> bool:
    """Whether flash-attn is installed (exllamav2's paged, batching mode needs it)."""
    return importlib.util.find_spec("flash_attn") is not None


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


class ExLlamaV2Engine(GeneratorEngine):
    """Continuous batching on a GPU through exllamav2's dynamic generator (batch 1 without flash-attn)."""

    library = "exllamav2"
    format = "exl2"

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
        backend_factory: BackendFactory | None = None,
        probe: Callable[[str], str | None] = probe_device,
    ) -> None:
        super().__init__(
            model_dir,
            backend_factory or open_exllamav2,
            model_id=model_id,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            max_tokens=max_tokens,
            cache=cache,
            seed=seed,
            probe=probe,
        )


# --------------------------------------------------------------------------- the real backend (GPU only)


@attrs.define
class _RealBackend:
    generator: Any
    job_cls: Any
    settings_cls: Any
    max_seq_len: int
    rope_theta: float
    max_batch: int
    device: str = "cuda:0"

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

    def greedy_job(self, input_ids: list[int], max_new_tokens: int, identifier: str) -> Any:
        """A greedy job returning its logits, no stop condition (tests/gpu and the recorder)."""
        import torch

        return self.job_cls(
            input_ids=torch.tensor([input_ids], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            gen_settings=self.settings_cls.greedy(),
            identifier=identifier,
            return_logits=True,
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


def open_exllamav2(model_dir: Path, max_seq_len: int, max_batch_size: int, cache: str) -> GeneratorBackend:
    """Load a model with exllamav2 (CUDA only; imports it here, lazily)."""
    check_model_dir(model_dir, "exllamav2")
    theta = ensure_rope_theta(model_dir)
    ok, why = exllamav2_available()
    if not ok:
        raise ModelLoadError(f"{model_dir}: cannot use exllamav2: {why}")
    if cache not in ("fp16", "q4", "q6"):
        raise ModelLoadError(f"{model_dir}: unknown cache kind {cache!r} (fp16, q4, q6)")
    paged = flash_attn_available()  # paged mode needs flash-attn >= 2.5.7; unpaged runs one job at a time
    batch = max_batch_size if paged else 1
    dev = describe_device("cuda:0")
    generator_cache_fits(
        model_dir,
        what=f"exllamav2 on {dev.name}",
        device=dev.device,
        free_bytes=dev.memory_free,
        context=max_seq_len,
        batch=batch,
        cache=cache,
    )
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
        if not paged and importlib.util.find_spec("xformers") is None:
            config.no_sdpa = True  # its SDPA path drops the causal mask of prompt chunks (module docstring)
        config.max_seq_len = max_seq_len
        model = ExLlamaV2(config)
        cache_cls = {"fp16": ExLlamaV2Cache, "q4": ExLlamaV2Cache_Q4, "q6": ExLlamaV2Cache_Q6}[cache]
        kv = cache_cls(model, max_seq_len=max_seq_len * batch, lazy=True)
        model.load_autosplit(kv)
        from exllamav2 import ExLlamaV2Tokenizer

        tokenizer = ExLlamaV2Tokenizer(config)
        generator = ExLlamaV2DynamicGenerator(
            model=model, cache=kv, tokenizer=tokenizer, max_batch_size=batch, paged=paged
        )
        generator.warmup()
    except Exception as e:
        if "out of memory" in str(e).lower():
            raise DeviceMemoryError(
                f"{model_dir}: exllamav2 ran out of GPU memory loading the model and a cache of "
                f"{batch} x {max_seq_len} tokens ({e}); lower worker.max_context or worker.max_batch"
            ) from e
        raise ModelLoadError(f"{model_dir}: exllamav2 could not load the model: {e}; {_HINT}") from e
    log.info(
        "exllamav2 %s mode: batch %d%s",
        "paged" if paged else "unpaged",
        batch,
        "" if paged else " (flash-attn is not installed; its unpaged mode runs one job at a time)",
    )
    return _RealBackend(
        generator, ExLlamaV2DynamicJob, ExLlamaV2Sampler.Settings, max_seq_len, theta, batch, dev.device
    )
