# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""Bad input and failures of the GPU engines, on the CPU: memory that does not fit, CUDA errors, lost devices.

The faults are injected: a forward pass that raises the RuntimeError torch
raises for a CUDA error, a device probe that says the device is lost (the
probe of a real GPU runs a tiny kernel), a free-memory figure.  Everything
else is the real engine on the tiny model.
"""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from inference.cpu import TorchEngine
from inference.device import GIB, check_fits, classify_failure, describe_device, kv_cache_bytes, probe_device
from inference.engine import DeviceLost, DeviceMemoryError, GenerationFailed, error_code
from inference.messages import ChatMessage, Chunk, FinalChunk, GenerateRequest
from overlay.errors import ConfigError, InferenceError
from tests.inference_fixtures import tiny_model_dir  # noqa: F401

CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


def req(rid: str, **kw: Any) -> GenerateRequest:
    base: dict[str, Any] = {"model": "t", "max_tokens": 12, "messages": (ChatMessage("user", "hi"),)}
    base.update(temperature=0.0, ignore_eos=True)
    base.update(kw)
    return GenerateRequest(request_id=rid, **base)


async def run(engine: Any, r: GenerateRequest) -> list[Chunk]:
    with trio.fail_after(30):
        return [c async for c in engine.generate_stream(r)]


# --------------------------------------------------------------------------- pure parts


def test_check_fits_names_what_to_lower() -> None:
    per_token = kv_cache_bytes(layers=16, kv_heads=8, head_dim=64, tokens=1, elem_bytes=2)
    assert per_token == 32768  # Llama-3.2-1B in fp16: 32 KiB per token
    kv = check_fits(
        what="m", device="cuda:0", free_bytes=10 * GIB, weight_bytes=0, per_token_bytes=per_token,
        context=4096, batch=8,
    )  # fmt: skip
    assert kv == per_token * 4096 * 8
    with pytest.raises(DeviceMemoryError) as e:
        check_fits(
            what="tiny on cuda:0", device="cuda:0", free_bytes=4 * GIB, weight_bytes=int(2.5 * GIB),
            per_token_bytes=per_token, context=8192, batch=32, reserve_bytes=GIB // 2, align=256,
        )  # fmt: skip
    msg = str(e.value)
    assert isinstance(e.value, ConfigError)
    assert "8.00 GiB" in msg  # 32 x 8192 x 32 KiB
    assert "worker.max_context to 1024" in msg  # (4 - 2.5 - 0.5) GiB / (32 x 32 KiB), down to 256s
    assert "worker.max_batch to 4" in msg
    with pytest.raises(DeviceMemoryError, match="smaller or more quantized"):
        check_fits(
            what="m", device="cuda:0", free_bytes=GIB, weight_bytes=2 * GIB, per_token_bytes=per_token,
            context=512, batch=1,
        )  # fmt: skip


def test_classify_failure() -> None:
    assert (
        classify_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == "oom"
    )
    assert classify_failure(RuntimeError(CUDA_ERROR)) == "cuda"
    assert classify_failure(RuntimeError("CUDA error: device-side assert triggered")) == "cuda"
    assert (
        classify_failure(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx")) == "cuda"
    )
    assert classify_failure(ValueError("shapes do not match")) == "other"
    assert probe_device("cpu") is None
    assert describe_device("cpu").name == "cpu"
    assert describe_device("cpu").summary() == "cpu"


# --------------------------------------------------------------------------- the torch engine


async def test_a_context_that_does_not_fit_fails_the_load(tiny_model_dir: Path) -> None:
    engine = TorchEngine(tiny_model_dir, weights="bf16", slots=8, context=512, free_memory=GIB + 300_000)
    with pytest.raises(DeviceMemoryError, match=r"lower worker\.max_context to \d+") as e:
        await engine.load()
    assert "8 x 512 tokens" in str(e.value)
    assert "max_context to 146" in str(e.value)  # 300,000 bytes over the reserve / (8 slots x 256 bytes)
    ok = TorchEngine(tiny_model_dir, weights="bf16", slots=8, context=512, free_memory=2 * GIB)
    assert (await ok.load()).kv_cache_bytes == 2 * 2 * 2 * 16 * 512 * 8 * 2
    await ok.close()


def _inject(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch, *, fail_on: str, after: int = 0
) -> list[int]:
    model = engine._model
    assert model is not None
    original = getattr(model, fail_on)
    calls = [0]

    def flaky(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError(CUDA_ERROR)
        return original(*a, **k)

    monkeypatch.setattr(model, fail_on, flaky)
    return calls


async def test_a_cuda_error_fails_only_its_request(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = TorchEngine(
        tiny_model_dir, model_id="t", weights="bf16", slots=2, context=128, probe=lambda d: None
    )
    await engine.load()
    _inject(engine, monkeypatch, fail_on="prefill")
    with pytest.raises(GenerationFailed, match="illegal memory access") as e:
        await run(engine, req("p"))  # failed before its first token: a typed error, nothing billed
    assert error_code(e.value) == "generation_failed"
    monkeypatch.undo()
    _inject(engine, monkeypatch, fail_on="decode", after=3)
    chunks = await run(engine, req("d"))
    final = chunks[-1]
    assert isinstance(final, FinalChunk)
    assert final.finish_reason == "error"  # tokens were streamed: they stay billed
    assert sum(len(c.token_ids) for c in chunks) == final.completion_tokens > 0
    monkeypatch.undo()
    after = await run(engine, req("ok"))  # the device still works: the engine goes on
    assert isinstance(after[-1], FinalChunk)
    assert after[-1].finish_reason == "length"
    assert engine.stats().failed == 2
    await engine.close()


async def test_a_lost_device_ends_everything_and_is_reported(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[str] = []

    def probe(device: str) -> str | None:
        probes.append(device)
        return "CUDA error: unspecified launch failure"

    engine = TorchEngine(tiny_model_dir, model_id="t", weights="bf16", slots=2, context=128, probe=probe)
    await engine.load()
    lost: list[str] = []

    async def watch() -> None:
        lost.append(await engine.wait_device_lost())

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        with trio.fail_after(30):
            async with aclosing(engine.generate_stream(req("a", max_tokens=60))) as first:
                await first.__anext__()  # "a" is decoding when the fault hits
                _inject(engine, monkeypatch, fail_on="decode")
                rest = [c async for c in first]
    assert isinstance(rest[-1], FinalChunk)
    assert rest[-1].finish_reason == "error"
    assert lost == ["CUDA error: unspecified launch failure"]
    assert probes == ["cpu"]
    with pytest.raises(DeviceLost) as e:
        await run(engine, req("b"))
    assert error_code(e.value) == "device_lost"
    with pytest.raises(DeviceLost):
        engine.count_prompt_tokens(req("c"))  # what the worker calls first: it refuses with device_lost
    await engine.close()


def test_system_exit_in_the_model_thread_is_not_swallowed(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A SystemExit raised in a forward pass is logged and re-raised: the trio run ends with it."""

    async def main() -> None:
        engine = TorchEngine(tiny_model_dir, model_id="t", weights="fp32", slots=1, context=64)
        await engine.load()
        model = engine._model
        assert model is not None

        def bye(*a: Any, **k: Any) -> Any:
            raise SystemExit(3)

        monkeypatch.setattr(model, "prefill", bye)
        with trio.fail_after(30):
            async for _ in engine.generate_stream(req("x")):
                pass

    with pytest.raises(BaseException) as e:  # trio wraps what a system task raises
        trio.run(main)

    def has_exit(exc: BaseException | None) -> bool:
        if exc is None:
            return False
        if isinstance(exc, SystemExit):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return any(has_exit(x) for x in exc.exceptions)
        return has_exit(exc.__cause__) or has_exit(exc.__context__)

    assert has_exit(e.value)
    assert "engine driver failed" in caplog.text


async def test_errors_stay_in_the_tree() -> None:
    assert issubclass(DeviceLost, GenerationFailed)
    assert issubclass(GenerationFailed, InferenceError)
    assert issubclass(DeviceMemoryError, ConfigError)
