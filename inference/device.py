"""Devices for the engines: what a GPU is, whether a model fits in it, and what a failure means.

Pure parts (no CUDA needed; tested on any machine with injected figures):

- :func:`kv_cache_bytes`: the bytes of a KV cache of a given shape;
- :func:`check_fits`: weights + KV cache + a reserve against the free memory,
  computed *before* the cache is allocated; a :class:`~inference.engine.DeviceMemoryError`
  names the context and the batch that would fit and the config key to lower;
- :func:`classify_failure`: an exception from a forward pass is ``oom`` (that
  request fails, the engine goes on), ``cuda`` (a CUDA error: the device is
  probed, see below) or ``other``.

Torch parts (lazy, CUDA only where it exists):

- :func:`describe_device`: name, total and free memory (``torch.cuda.get_device_name``,
  ``torch.cuda.mem_get_info``), or ``cpu``;
- :func:`probe_device`: a tiny kernel and a synchronize; a sticky CUDA error
  (illegal memory access, device-side assert, the GPU fell off the bus)
  makes every later call fail, which is how a lost device is told from a
  failed request.
"""

from __future__ import annotations

import logging
import math

import attrs

from .engine import DeviceMemoryError

__all__ = [
    "DeviceInfo",
    "check_fits",
    "classify_failure",
    "describe_device",
    "dtype_bytes",
    "kv_cache_bytes",
    "probe_device",
]

log = logging.getLogger(__name__)

GIB = 1 << 30

#: substrings of the messages of CUDA runtime errors (torch raises RuntimeError / AcceleratorError)
_CUDA_MARKERS = (
    "cuda error",
    "cudaerror",
    "cublas_status",
    "cudnn_status",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "ecc error",
    "fallen off the bus",
    "gpu is lost",
    "cuda driver",
    "nccl error",
)


@attrs.frozen
class DeviceInfo:
    """A compute device as ``cocoon-node status`` shows it."""

    device: str  # "cpu" | "cuda:0" ...
    name: str  # the GPU's name, or "cpu"
    memory_total: int = 0  # bytes (0 on the CPU)
    memory_free: int = 0  # bytes free now

    def summary(self) -> str:
        if not self.memory_total:
            return self.name
        return f"{self.name}, {self.memory_free / GIB:.1f} of {self.memory_total / GIB:.1f} GiB free"


def dtype_bytes(weights: str) -> int:
    """Bytes per element of a weight / cache kind ("fp32", "fp16", "bf16", "int8")."""
    sizes = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
    if weights not in sizes:
        raise ValueError(f"unknown weight kind {weights!r}")
    return sizes[weights]


def kv_cache_bytes(*, layers: int, kv_heads: int, head_dim: int, tokens: int, elem_bytes: int) -> int:
    """Bytes of K and V for ``tokens`` positions (all slots together) of every layer."""
    return 2 * layers * kv_heads * head_dim * tokens * elem_bytes


def check_fits(
    *,
    what: str,
    device: str,
    free_bytes: int,
    weight_bytes: int,
    per_token_bytes: int,
    context: int,
    batch: int,
    reserve_bytes: int | None = None,
    align: int = 1,
) -> int:
    """Check that ``weight_bytes`` (not yet loaded) and a ``batch`` x ``context`` KV cache fit; KV bytes.

    ``free_bytes`` is the device's free memory now (``torch.cuda.mem_get_info``;
    pass 0 for ``weight_bytes`` when the weights are already resident).  The
    reserve (default: 1 GiB or 5 % of the free memory, whichever is more) is
    left for activations, the CUDA context growing and the allocator's slack.
    ``align``: the engine rounds contexts to this (256 for exllamav2/v3).
    """
    kv = per_token_bytes * context * batch
    reserve = max(GIB, free_bytes // 20) if reserve_bytes is None else reserve_bytes
    need = weight_bytes + kv + reserve
    if need <= free_bytes:
        return kv
    room = free_bytes - weight_bytes - reserve
    fit_ctx = (room // max(per_token_bytes * batch, 1)) // align * align if room > 0 else 0
    fit_batch = room // max(per_token_bytes * context, 1) if room > 0 else 0
    hints = []
    if fit_ctx >= max(align, 64):
        hints.append(f"lower worker.max_context to {fit_ctx} (--set worker.max_context={fit_ctx})")
    if fit_batch >= 1 and batch > 1:
        hints.append(f"lower worker.max_batch to {fit_batch} (--set worker.max_batch={fit_batch})")
    if not hints:
        hints.append("use a smaller or more quantized model, or a GPU with more memory")
    raise DeviceMemoryError(
        f"{what}: a KV cache for {batch} x {context} tokens needs {kv / GIB:.2f} GiB"
        + (f" and the weights {weight_bytes / GIB:.2f} GiB" if weight_bytes else "")
        + f", with {reserve / GIB:.2f} GiB kept in reserve that is {need / GIB:.2f} GiB, "
        f"but {device} has {free_bytes / GIB:.2f} GiB free; " + " or ".join(hints)
    )


def classify_failure(exc: BaseException) -> str:
    """``oom`` | ``cuda`` | ``other`` for an exception a forward pass raised (pure; no CUDA call)."""
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "oom"
    if name in ("AcceleratorError", "CudaError"):
        return "cuda"
    text = str(exc).lower()
    if any(m in text for m in _CUDA_MARKERS):
        return "cuda"
    return "other"


def describe_device(device: str) -> DeviceInfo:
    """The device's name and memory (CUDA), or ``cpu``."""
    if not device.startswith("cuda"):
        return DeviceInfo(device="cpu", name="cpu")
    import torch

    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return DeviceInfo(f"cuda:{index}", torch.cuda.get_device_name(index), int(total), int(free))


def probe_device(device: str) -> str | None:
    """None if ``device`` still computes; else why not (a sticky CUDA error: the device is lost)."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        x = torch.ones(16, device=device)
        ok = bool(math.isclose(float((x + x).sum().item()), 32.0))
        torch.cuda.synchronize(device)
    except Exception as e:  # every CUDA call fails once the context is corrupted
        return f"{type(e).__name__}: {e}"
    return None if ok else "the device computed a wrong result"
