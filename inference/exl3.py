"""The ExLlamaV3 engine for GPU workers (``gpu`` extra: ``exllamav3==1.6.5``; imported lazily, CUDA only).

exllamav3 is the maintained successor of the archived exllamav2.  Its
``Generator`` / ``Job`` pair works like exllamav2's dynamic generator and its
result dicts have the same shape (``stage``, ``identifier``, ``token_ids``
1 x n, ``text``, ``eos``, ``eos_reason``, ``held``, ``new_tokens`` counting the
stop token, ``time_enqueued`` / ``time_prefill`` / ``time_generate``), so the
shell and the mapping are shared (:mod:`inference.jobs`).  What differs,
read from the 1.6.5 wheel:

- the cache is always paged, and attention runs through its own Triton
  paged-attention kernels (``modules/attention_fn/triton_paged.py``), which
  need no flash-attn: **it batches on any CUDA GPU**.  The cache holds
  ``max_num_tokens`` shared by all jobs; a job takes pages for its prompt and
  its ``max_new_tokens``, so we size it ``max_batch`` x ``max_seq_len`` (a
  multiple of the 256-token page) and report ``max_batch``;
- sampling is a stack of steps: ``ArgmaxSampler`` for greedy,
  ``ComboSampler(temperature, top_k, top_p, min_p=0, rep_p=1)`` otherwise
  (exllamav2's default repetition penalty of 1.025 does not exist here);
- ``Config.from_directory`` reads ``rope_theta`` top-level *or* under
  ``rope_parameters``; EXL3 and unquantized FP16/BF16 safetensors load;
- extra eos reasons: ``loop_detected`` (off unless asked for) and a result
  may say ``requeue`` (a long job continues under the same identifier);
- ``import exllamav3`` JIT-builds its extension and fails without CUDA, and
  it sets the CUDA allocator to expandable segments on import.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from overlay.errors import ModelLoadError

from .device import describe_device, probe_device
from .engine import DeviceMemoryError
from .jobs import BackendFactory, GeneratorBackend, GeneratorEngine, check_model_dir, generator_cache_fits
from .messages import GenerateRequest

__all__ = ["ExLlamaV3Engine", "exllamav3_available", "open_exllamav3"]

log = logging.getLogger(__name__)

_CACHE_BITS = {"q4": 4, "q6": 6, "q8": 8}
_HINT = (
    "exllamav3 loads EXL3 and FP16/BF16 safetensors directories of the architectures it knows; "
    "try --engine cuda (our torch engine: Llama family, HF dirs and GGUF files) or --engine exllamav2"
)


def exllamav3_available() -> tuple[bool, str]:
    """Whether the ExLlamaV3 engine can run here, and if not, why (for ``--engine``)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("exllamav3") is None:
        return False, "exllamav3 is not installed (pip install 'cocoon-node[gpu]')"
    try:
        import exllamav3  # noqa: F401  (JIT-builds the extension the first time: minutes)
    except Exception as e:
        return False, f"import exllamav3 failed: {type(e).__name__}: {e}"
    return True, "ok"


class ExLlamaV3Engine(GeneratorEngine):
    """Continuous batching on a GPU through exllamav3's generator (paged, Triton attention)."""

    library = "exllamav3"
    format = "exl3"

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
            backend_factory or open_exllamav3,
            model_id=model_id,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            max_tokens=max_tokens,
            cache=cache,
            seed=seed,
            probe=probe,
        )


@attrs.define
class _Exl3Backend:
    generator: Any
    job_cls: Any
    argmax_cls: Any
    combo_cls: Any
    max_seq_len: int
    max_batch: int
    device: str = "cuda:0"

    def make_job(self, req: GenerateRequest, input_ids: list[int], stop: list[int | str], seed: int) -> Any:
        import torch

        if req.temperature <= 0 or req.top_k == 1:
            sampler = self.argmax_cls()
        else:
            sampler = self.combo_cls(
                temperature=req.temperature,
                top_k=req.top_k,  # 0 = off
                top_p=req.top_p,  # 1.0 = off
                min_p=0.0,
                rep_p=1.0,
            )
        return self.job_cls(
            input_ids=torch.tensor([input_ids], dtype=torch.long),
            max_new_tokens=req.max_tokens,
            sampler=sampler,
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
            sampler=self.argmax_cls(),
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


def open_exllamav3(model_dir: Path, max_seq_len: int, max_batch_size: int, cache: str) -> GeneratorBackend:
    """Load a model with exllamav3 (CUDA only; imports it here, lazily)."""
    check_model_dir(model_dir, "exllamav3")
    ok, why = exllamav3_available()
    if not ok:
        raise ModelLoadError(f"{model_dir}: cannot use exllamav3: {why}")
    if cache != "fp16" and cache not in _CACHE_BITS:
        raise ModelLoadError(f"{model_dir}: unknown cache kind {cache!r} (fp16, q4, q6, q8)")
    dev = describe_device("cuda:0")
    generator_cache_fits(
        model_dir,
        what=f"exllamav3 on {dev.name}",
        device=dev.device,
        free_bytes=dev.memory_free,
        context=max_seq_len,
        batch=max_batch_size,
        cache=cache,
    )
    from exllamav3 import (
        ArgmaxSampler,
        Cache,
        CacheLayer_fp16,
        CacheLayer_quant,
        ComboSampler,
        Config,
        Generator,
        Job,
        Model,
        Tokenizer,
    )

    try:
        config = Config.from_directory(str(model_dir))
        model = Model.from_config(config)
        if cache == "fp16":
            kv = Cache(model, max_num_tokens=max_seq_len * max_batch_size, layer_type=CacheLayer_fp16)
        else:
            bits = _CACHE_BITS[cache]
            kv = Cache(
                model,
                max_num_tokens=max_seq_len * max_batch_size,
                layer_type=CacheLayer_quant,
                k_bits=bits,
                v_bits=bits,
            )
        model.load(device=dev.device)
        tokenizer = Tokenizer.from_config(config)
        generator = Generator(model=model, cache=kv, tokenizer=tokenizer, max_batch_size=max_batch_size)
    except Exception as e:
        if "out of memory" in str(e).lower():
            raise DeviceMemoryError(
                f"{model_dir}: exllamav3 ran out of GPU memory loading the model and a cache of "
                f"{max_batch_size} x {max_seq_len} tokens ({e}); lower worker.max_context or worker.max_batch"
            ) from e
        raise ModelLoadError(f"{model_dir}: exllamav3 could not load the model: {e}; {_HINT}") from e
    batch = int(getattr(generator, "max_batch_size", max_batch_size))  # it may lower it to fit the cache
    log.info("exllamav3 generator: batch %d, cache %d tokens", batch, max_seq_len * max_batch_size)
    return _Exl3Backend(generator, Job, ArgmaxSampler, ComboSampler, max_seq_len, batch, dev.device)
