"""The Engine protocol every inference backend implements, and its typed errors.

::

    engine = TorchEngine(path)            # or ExLlamaV2Engine, or select_engine(...)
    info = await engine.load()            # -> ModelInfo
    async with aclosing(engine.generate_stream(request)) as chunks:
        async for chunk in chunks:        # TokenChunk*, then one FinalChunk
            ...
    await engine.cancel(request_id)       # from anywhere; the stream ends with reason "cancelled"
    engine.count_prompt_tokens(request)   # what the request will be billed as prompt (checks it too)
    engine.stats()                        # -> EngineStats snapshot
    await engine.close()

Billing invariant (every engine, checked by the contract tests): the
``token_ids`` of all chunks of one generation add up to the final chunk's
``completion_tokens``; a terminating stop token is counted (and sent in the
final chunk's ``token_ids``) but never rendered as text.  Leaving the
iterator early cancels the generation and frees its cache.

Errors raised by ``generate_stream`` before the first chunk are
:class:`~overlay.errors.BadRequest` subclasses carrying a stable ``code``
(the ErrorFrame code the service sends), :class:`Overloaded`, or
:class:`GenerationFailed` (the forward pass failed before the request's
first token: a CUDA error, out of memory) and its subclass
:class:`DeviceLost` (the GPU is gone for good; the engine refuses every
request from then on and :meth:`ReportsDeviceLoss.wait_device_lost`
returns, so the worker withdraws its offers).  A failure after tokens were
streamed ends the stream with a final chunk of reason ``error`` instead, so
every delivered token stays billed.

Error classes of this package (all in the tree of :mod:`overlay.errors`)::

    BadRequest: UnknownModel, ContextLengthExceeded, MaxTokensTooLarge, InvalidSampling, MalformedRequest
    InferenceError: Overloaded, GenerationFailed -> DeviceLost
    ConfigError: DeviceMemoryError (model + KV cache do not fit; names what to lower)
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from typing import ClassVar, Protocol

import attrs

from overlay.errors import BadRequest, ConfigError, InferenceError

from .messages import Chunk, GenerateRequest

__all__ = [
    "ContextLengthExceeded",
    "DeviceLost",
    "DeviceMemoryError",
    "encode_request",
    "Engine",
    "EngineStats",
    "GenerationFailed",
    "InvalidSampling",
    "MalformedRequest",
    "MaxTokensTooLarge",
    "ModelInfo",
    "Overloaded",
    "ReportsDeviceLoss",
    "UnknownModel",
    "check_request",
    "error_code",
]


class UnknownModel(BadRequest):
    code: ClassVar[str] = "unknown_model"


class ContextLengthExceeded(BadRequest):
    code: ClassVar[str] = "context_length_exceeded"


class MaxTokensTooLarge(BadRequest):
    code: ClassVar[str] = "max_tokens_too_large"


class InvalidSampling(BadRequest):
    code: ClassVar[str] = "invalid_sampling"


class MalformedRequest(BadRequest):
    code: ClassVar[str] = "bad_request"


class Overloaded(InferenceError):
    """Too many requests are queued; try another worker."""

    code: ClassVar[str] = "overloaded"


class GenerationFailed(InferenceError):
    """The engine failed running this request (CUDA error, out of memory); others go on. Retry elsewhere."""

    code: ClassVar[str] = "generation_failed"


class DeviceLost(GenerationFailed):
    """The GPU is gone (a sticky CUDA error, the device fell off the bus); this worker serves nothing more."""

    code: ClassVar[str] = "device_lost"


class DeviceMemoryError(ConfigError):
    """The weights and the KV cache do not fit in the device's memory; the message names what to lower."""


def error_code(exc: BaseException) -> str:
    """The stable ErrorFrame code for an exception (``internal`` for anything unexpected)."""
    code = getattr(type(exc), "code", None)
    if isinstance(code, str):
        return code
    if isinstance(exc, BadRequest):
        return "bad_request"
    return "internal"


@attrs.frozen
class ModelInfo:
    """What a loaded engine serves."""

    model_id: str
    engine: str  # "cpu" | "cuda" | "exllamav2" | "exllamav3"
    path: str
    format: str  # "hf" | "gguf" | "exl2" | "exl3"
    n_params: int
    vocab_size: int
    context_length: int  # tokens: prompt + completion per request
    max_tokens: int  # the largest max_tokens a request may ask for
    max_batch: int  # requests the backend really decodes together (the offer's capacity)
    chat: bool  # a chat template is available
    weights: str  # "int8" | "fp32" | "fp16" | "bf16" | "exl2" | "exl3"
    load_s: float
    device: str = "cpu"  # "cpu" | "cuda:0" ...
    gpu_name: str = ""  # torch.cuda.get_device_name, "" on the CPU
    gpu_memory_total: int = 0  # bytes of device memory, 0 on the CPU
    gpu_memory_free: int = 0  # bytes free right after loading (weights and KV cache allocated)
    kv_cache_bytes: int = 0  # bytes the KV cache takes


@attrs.frozen
class EngineStats:
    """A snapshot of an engine's load and counters."""

    running: int  # requests holding a cache slot
    waiting: int  # requests queued for a slot
    paused: int  # running requests held back because their reader is slow
    free_slots: int
    completed: int
    cancelled: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    steps: int  # forward passes run


class Engine(Protocol):
    """An inference backend; see the module docstring for the contract."""

    async def load(self) -> ModelInfo: ...

    def generate_stream(self, request: GenerateRequest) -> AsyncGenerator[Chunk, None]: ...

    async def cancel(self, request_id: str) -> bool: ...

    def count_prompt_tokens(self, request: GenerateRequest) -> int: ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


class ReportsDeviceLoss(Protocol):
    """An engine that can lose its device (GPU engines); the worker withdraws its offers when it does."""

    async def wait_device_lost(self) -> str:
        """Return (with the reason) once the device is lost for good; never returns while it works."""
        ...


_MAX_TEMPERATURE = 5.0
_MAX_SEED = (1 << 63) - 1


def check_request(req: GenerateRequest, *, vocab_size: int, max_tokens: int) -> None:
    """Shape and sampling checks that need no tokenizer; raises a BadRequest subclass."""
    if not req.request_id:
        raise MalformedRequest("request_id must not be empty")
    if (req.prompt is None) == (not req.messages):
        raise MalformedRequest("exactly one of prompt / messages must be set")
    for m in req.messages:
        if m.role not in ("system", "user", "assistant", "tool"):
            raise MalformedRequest(f"unknown chat role {m.role!r}")
    if req.max_tokens < 1:
        raise MaxTokensTooLarge(f"max_tokens must be at least 1, got {req.max_tokens}")
    if req.max_tokens > max_tokens:
        raise MaxTokensTooLarge(f"max_tokens {req.max_tokens} over this worker's limit of {max_tokens}")
    if not (math.isfinite(req.temperature) and 0.0 <= req.temperature <= _MAX_TEMPERATURE):
        raise InvalidSampling(f"temperature must be in [0, {_MAX_TEMPERATURE}], got {req.temperature}")
    if not (math.isfinite(req.top_p) and 0.0 < req.top_p <= 1.0):
        raise InvalidSampling(f"top_p must be in (0, 1], got {req.top_p}")
    if not 0 <= req.top_k <= vocab_size:
        raise InvalidSampling(f"top_k must be in [0, {vocab_size}], got {req.top_k}")
    if req.seed is not None and not 0 <= req.seed <= _MAX_SEED:
        raise InvalidSampling(f"seed must be in [0, 2**63), got {req.seed}")
    if any(not s for s in req.stop):
        raise InvalidSampling("stop strings must not be empty")
    if any(not 0 <= t < vocab_size for t in req.stop_token_ids):
        raise InvalidSampling(f"stop_token_ids must be in [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t in req.continuation):
        raise MalformedRequest(f"continuation token ids must be in [0, {vocab_size})")


class _Encoder(Protocol):
    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]: ...


def encode_request(
    req: GenerateRequest, tokenizer: _Encoder, *, vocab_size: int, max_tokens: int, context: int
) -> list[int]:
    """Check ``req`` and return its prompt ids (rendered prompt + continuation); BadRequest subclasses."""
    check_request(req, vocab_size=vocab_size, max_tokens=max_tokens)
    try:
        if req.prompt is not None:
            ids = tokenizer.encode_prompt(req.prompt)
        else:
            ids = tokenizer.encode_chat([(m.role, m.content) for m in req.messages])
    except ValueError as e:
        raise MalformedRequest(str(e)) from e
    ids.extend(req.continuation)
    if not ids:
        raise MalformedRequest("the prompt is empty")
    if len(ids) >= context:
        raise ContextLengthExceeded(f"prompt of {len(ids)} tokens; this worker's context is {context}")
    if len(ids) + req.max_tokens > context:
        raise ContextLengthExceeded(
            f"prompt of {len(ids)} tokens + max_tokens {req.max_tokens} exceed the context of {context}"
        )
    return ids
