# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""The dense path (the ``cuda`` engine's model and shell) on the CPU: only the device differs on a GPU.

``DenseLlama`` in fp32 must agree with the TorchScript ``LlamaModel`` (the
reference that matches transformers); fp16 / bf16 track it; the engine
built on it (``TorchEngine(weights="bf16")`` or ``dense=True``) keeps the
engine contract; CUDA graphs are off on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from inference.cpu import TorchEngine
from inference.dense import DenseLlama, span_bucket
from inference.llama import DenseLinear, LlamaModel
from inference.loader import LoadedModel, load_model
from inference.messages import ChatMessage, Chunk, FinalChunk, GenerateRequest, TokenChunk
from inference.tiny import write_tiny_model
from tests.inference_fixtures import tiny_model_dir  # noqa: F401

Q = (ChatMessage("user", "What is the capital of France?"),)


@pytest.fixture(scope="module")
def fp32(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, weights="fp32")


def _prompt(lm: LoadedModel) -> list[int]:
    return lm.tokenizer.encode_chat([("user", "What is the capital of France?")])


def _steps(m: LlamaModel | DenseLlama, ids: list[int]) -> torch.Tensor:
    """Chunked prefill of three prompts, then two batched decode steps (one over non-contiguous slots)."""
    prompts = [ids, ids[:9], ids[3:30]]
    out = [m.prefill(0, torch.tensor(ids[:7]), 0), m.prefill(0, torch.tensor(ids[7:]), 7)]
    for s, p in enumerate(prompts[1:], start=1):
        out.append(m.prefill(s, torch.tensor(p), 0))
    out.extend(m.decode([0, 1, 2], torch.tensor([5, 6, 7]), [len(p) for p in prompts]))
    out.extend(m.decode([0, 2], torch.tensor([8, 9]), [len(prompts[0]) + 1, len(prompts[2]) + 1]))
    m.move_slot(2, 1, len(prompts[2]) + 2)
    out.extend(m.decode([0, 1], torch.tensor([1, 2]), [len(prompts[0]) + 2, len(prompts[2]) + 2]))
    return torch.stack(out)


def test_dense_fp32_equals_the_torchscript_model(fp32: LoadedModel) -> None:
    ids = _prompt(fp32)
    ref = _steps(LlamaModel(fp32.config, fp32.weights, slots=3, context=128), ids)
    dense = DenseLlama(fp32.config, fp32.weights, slots=3, context=128)
    assert not dense.use_graphs  # CUDA graphs only on CUDA
    torch.testing.assert_close(_steps(dense, ids), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("kind", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_tracks_fp32(
    tiny_model_dir: Path, fp32: LoadedModel, kind: str, dtype: torch.dtype
) -> None:
    lm = load_model(tiny_model_dir, weights=kind)
    assert lm.weights.embed.dtype == dtype
    assert isinstance(lm.weights.layers[0].qkv, DenseLinear)
    ids = _prompt(fp32)
    a = _steps(LlamaModel(fp32.config, fp32.weights, slots=3, context=128), ids)
    b = _steps(DenseLlama(lm.config, lm.weights, slots=3, context=128), ids)
    assert b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.999
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_tied_embeddings_share_one_table(tmp_path: Path) -> None:
    d = write_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    lm = load_model(d, weights="bf16")
    head = lm.weights.lm_head
    assert isinstance(head, DenseLinear)
    assert head.weight.data_ptr() == lm.weights.embed.data_ptr()


def test_int8_weights_are_refused_by_the_dense_path(tiny_model_dir: Path) -> None:
    q = load_model(tiny_model_dir, weights="int8")
    with pytest.raises(ValueError, match="int8"):
        DenseLlama(q.config, q.weights, slots=1, context=64)
    with pytest.raises(ValueError, match="CPU only"):
        TorchEngine(tiny_model_dir, device="cuda", weights="int8")
    with pytest.raises(ValueError, match="dense path"):
        TorchEngine(tiny_model_dir, weights="bf16", dense=False)


def test_span_buckets() -> None:
    assert [span_bucket(s, 2048) for s in (1, 256, 257, 600, 1500, 2048)] == [256, 256, 512, 1024, 2048, 2048]
    assert span_bucket(300, 300) == 300


def req(rid: str, **kw: object) -> GenerateRequest:
    base: dict[str, object] = {"model": "t", "max_tokens": 12, "messages": Q, "temperature": 0.0}
    base.update(kw)
    return GenerateRequest(request_id=rid, **base)  # type: ignore[arg-type]


async def run(engine: TorchEngine, r: GenerateRequest) -> list[Chunk]:
    with trio.fail_after(30):
        return [c async for c in engine.generate_stream(r)]


def ids_of(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def billed(chunks: list[Chunk]) -> FinalChunk:
    final = chunks[-1]
    assert isinstance(final, FinalChunk)
    assert all(isinstance(c, TokenChunk) for c in chunks[:-1])
    assert sum(len(c.token_ids) for c in chunks) == final.completion_tokens
    return final


async def test_dense_engine_keeps_the_engine_contract(tiny_model_dir: Path) -> None:
    ref = TorchEngine(tiny_model_dir, model_id="t", weights="fp32", slots=4, context=256, threads=1)
    dense = TorchEngine(
        tiny_model_dir, model_id="t", weights="fp32", dense=True, slots=4, context=256, threads=1
    )
    half = TorchEngine(tiny_model_dir, model_id="t", weights="bf16", slots=4, context=256, threads=1, seed=1)
    for e in (ref, dense, half):
        info = await e.load()
        assert info.engine == "cpu"
        assert info.device == "cpu"
        assert info.gpu_name == ""
        assert info.max_batch == 4
    assert (await half.load()).weights == "bf16"
    assert (
        await half.load()
    ).kv_cache_bytes == 2 * 2 * 2 * 16 * 256 * 4 * 2  # k+v, layers, kv, d, ctx, slots, bf16
    want = ids_of(await run(ref, req("a", ignore_eos=True)))
    assert ids_of(await run(dense, req("a", ignore_eos=True))) == want
    # three concurrent requests are batched and match their solo runs
    prompts = ["Hello there", "What is the capital of France?", "good morning"]
    solo = [
        ids_of(await run(dense, req(f"s{i}", messages=(ChatMessage("user", p),))))
        for i, p in enumerate(prompts)
    ]
    out: dict[int, list[Chunk]] = {}

    async def one(i: int) -> None:
        out[i] = await run(dense, req(f"c{i}", messages=(ChatMessage("user", prompts[i]),)))

    steps = dense.stats().steps
    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(one, i)
    assert [ids_of(out[i]) for i in range(3)] == solo
    assert dense.stats().steps - steps < 3 * 12
    # stop token billed, seeded sampling reproducible, cancel
    stop = want[4]
    stopped = await run(dense, req("st", stop_token_ids=(stop,)))
    assert billed(stopped).finish_reason == "stop_token"
    assert ids_of(stopped) == want[: want.index(stop) + 1]
    kw: dict[str, object] = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "ignore_eos": True, "seed": 5}
    assert ids_of(await run(half, req("x", **kw))) == ids_of(await run(half, req("y", **kw)))
    got: list[Chunk] = []
    with trio.fail_after(30):
        async for c in half.generate_stream(req("z", max_tokens=200, ignore_eos=True)):
            got.append(c)
            if len(got) == 1:
                assert await half.cancel("z")
    assert billed(got).finish_reason == "cancelled"
    for e in (ref, dense, half):
        await e.close()
