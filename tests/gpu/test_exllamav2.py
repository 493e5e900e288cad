"""The real ExLlamaV2 engine on a CUDA GPU (skipped cleanly elsewhere).

Runs only where ``torch.cuda.is_available()`` and ``import exllamav2`` work
(the first import JIT-builds the extension: minutes; set
``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS``).  The tiny model is shaped for
exllamav2's constraints (head_dim 64, fp16, context 512 = 2 x 256).
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from inference.cpu import TorchEngine
from inference.exl2 import ExLlamaV2Engine, exllamav2_available
from inference.messages import ChatMessage, Chunk, FinalChunk, GenerateRequest
from inference.tiny import write_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ok, why = exllamav2_available()
    if not ok:
        pytest.skip(f"exllamav2 engine unavailable: {why}")
    import torch

    d = write_tiny_model(
        tmp_path_factory.mktemp("gpu") / "tiny-gpu",
        hidden_size=256,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=512,
        num_layers=2,
        max_position=512,
        rope_theta=100000.0,
        dtype=torch.float16,
    )
    # the transformers-5 layout: rope_theta only under rope_parameters (the engine must fix it)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


async def _run(engine: ExLlamaV2Engine | TorchEngine, request: GenerateRequest) -> list[Chunk]:
    with trio.fail_after(600):
        return [c async for c in engine.generate_stream(request)]


async def test_exllamav2_generates_like_the_cpu_engine(gpu_model: Path) -> None:
    gpu = ExLlamaV2Engine(gpu_model, model_id="tiny-gpu", max_seq_len=512, max_batch_size=4)
    with trio.fail_after(1800):  # the first import builds the CUDA extension
        await gpu.load()
    assert json.loads((gpu_model / "config.json").read_text())["rope_theta"] == 100000.0
    cpu = TorchEngine(gpu_model, model_id="tiny-gpu", weights="fp32", threads=1)
    await cpu.load()
    request = GenerateRequest(
        request_id="g",
        model="tiny-gpu",
        messages=(ChatMessage("user", "What is the capital of France?"),),
        max_tokens=24,
        temperature=0.0,
        ignore_eos=True,
    )
    on_gpu = await _run(gpu, request)
    on_cpu = await _run(cpu, request)
    final = on_gpu[-1]
    assert isinstance(final, FinalChunk)
    assert final.finish_reason == "length"
    assert sum(len(c.token_ids) for c in on_gpu) == final.completion_tokens == 24
    gpu_ids = [t for c in on_gpu for t in c.token_ids]
    cpu_ids = [t for c in on_cpu for t in c.token_ids]
    assert gpu_ids[:4] == cpu_ids[:4]  # fp16 vs fp32: the first greedy tokens agree

    # a stop token ends the job, is billed and not rendered; cancel frees the job
    stop = gpu_ids[3]
    stopped = await _run(gpu, attrs.evolve(request, request_id="s", stop_token_ids=(stop,)))
    last = stopped[-1]
    assert isinstance(last, FinalChunk)
    assert last.finish_reason == "stop_token"
    assert last.token_ids[-1] == stop
    assert sum(len(c.token_ids) for c in stopped) == last.completion_tokens
    got: list[Chunk] = []
    async for c in gpu.generate_stream(attrs.evolve(request, request_id="c", max_tokens=200)):
        got.append(c)
        if len(got) == 1:
            await gpu.cancel("c")
    assert isinstance(got[-1], FinalChunk)
    assert got[-1].finish_reason == "cancelled"
    await gpu.close()
    await cpu.close()
