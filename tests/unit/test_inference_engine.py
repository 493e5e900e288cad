# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""The CPU engine's contract on the tiny model: billing, stops, batching, cancel, backpressure, bad input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from inference.cpu import TorchEngine
from inference.engine import (
    ContextLengthExceeded,
    InvalidSampling,
    MalformedRequest,
    MaxTokensTooLarge,
    error_code,
)
from inference.messages import ChatMessage, Chunk, FinalChunk, GenerateRequest, TokenChunk
from overlay.errors import BadRequest, InferenceError, ModelLoadError
from tests.inference_fixtures import no_network, tiny_engine, tiny_gguf, tiny_model_dir  # noqa: F401

HELLO = (ChatMessage("user", "Hello there"),)


def req(rid: str = "r1", **kw: object) -> GenerateRequest:
    base: dict[str, object] = {"model": "tiny", "max_tokens": 16, "messages": HELLO, "temperature": 0.0}
    base.update(kw)
    return GenerateRequest(request_id=rid, **base)  # type: ignore[arg-type]


async def run(engine: TorchEngine, request: GenerateRequest) -> list[Chunk]:
    with trio.fail_after(30):
        return [c async for c in engine.generate_stream(request)]


def check_billing(chunks: Sequence[Chunk]) -> FinalChunk:
    """The invariant every engine keeps: ids of all chunks add up to the cumulative counts."""
    final = chunks[-1]
    assert isinstance(final, FinalChunk)
    assert all(isinstance(c, TokenChunk) for c in chunks[:-1])
    total = 0
    for c in chunks:
        total += len(c.token_ids)
        assert c.completion_tokens == total
    assert final.completion_tokens == total
    return final


def ids_of(chunks: Sequence[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks: Sequence[Chunk]) -> str:
    return "".join(c.text for c in chunks)


async def test_length_and_billing(tiny_engine: TorchEngine, no_network: list[str]) -> None:
    chunks = await run(tiny_engine, req(max_tokens=12, ignore_eos=True))
    final = check_billing(chunks)
    assert final.finish_reason == "length"
    assert final.completion_tokens == 12
    assert final.prompt_tokens == len(tiny_engine._loaded.tokenizer.encode_chat([("user", "Hello there")]))  # type: ignore[union-attr]
    assert final.ttft_s > 0
    assert final.decode_tok_per_s > 0
    assert final.queue_s >= 0
    assert text_of(chunks) == tiny_engine._loaded.tokenizer.decode(ids_of(chunks))  # type: ignore[union-attr]
    assert no_network == []


async def test_stop_token_is_billed_but_not_rendered(tiny_engine: TorchEngine) -> None:
    ref = ids_of(await run(tiny_engine, req("a", max_tokens=12, ignore_eos=True)))
    stop = ref[5]
    cut = ref.index(stop)
    chunks = await run(tiny_engine, req("b", max_tokens=12, stop_token_ids=(stop,)))
    final = check_billing(chunks)
    assert final.finish_reason == "stop_token"
    assert ids_of(chunks) == ref[: cut + 1]
    assert final.token_ids[-1] == stop
    tok = tiny_engine._loaded.tokenizer  # type: ignore[union-attr]
    assert text_of(chunks) == tok.decode(ref[:cut])


async def test_stop_string_is_cut_and_not_emitted(tiny_engine: TorchEngine) -> None:
    ref_chunks = await run(tiny_engine, req("a", max_tokens=16, ignore_eos=True))
    ref_text = text_of(ref_chunks)
    stop = ref_text[len(ref_text) // 2 : len(ref_text) // 2 + 2]
    assert stop
    chunks = await run(tiny_engine, req("b", max_tokens=16, ignore_eos=True, stop=(stop, "never-there")))
    final = check_billing(chunks)
    assert final.finish_reason == "stop_string"
    assert text_of(chunks) == ref_text[: ref_text.index(stop)]
    assert ids_of(chunks) == ids_of(ref_chunks)[: final.completion_tokens]


async def test_concurrent_requests_are_batched_and_match_solo_runs(tiny_engine: TorchEngine) -> None:
    prompts = ["Hello there", "What is the capital of France?", "good morning"]
    solo = []
    for i, p in enumerate(prompts):
        solo.append(
            ids_of(
                await run(tiny_engine, req(f"solo{i}", messages=(ChatMessage("user", p),), ignore_eos=True))
            )
        )
    steps_before = tiny_engine.stats().steps
    results: dict[int, list[Chunk]] = {}

    async def one(i: int) -> None:
        r = req(f"c{i}", messages=(ChatMessage("user", prompts[i]),), ignore_eos=True)
        results[i] = await run(tiny_engine, r)

    async with trio.open_nursery() as n:
        for i in range(len(prompts)):
            n.start_soon(one, i)
    for i in range(len(prompts)):
        check_billing(results[i])
        assert ids_of(results[i]) == solo[i]
    steps = tiny_engine.stats().steps - steps_before
    assert steps < 3 * 16  # 3 prefills + shared decode steps, not 3 x 16 separate ones


async def test_seeded_sampling_is_reproducible(tiny_engine: TorchEngine) -> None:
    kw: dict[str, object] = {
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 40,
        "max_tokens": 16,
        "ignore_eos": True,
    }
    a = ids_of(await run(tiny_engine, req("a", seed=1234, **kw)))
    b = ids_of(await run(tiny_engine, req("b", seed=1234, **kw)))
    c = ids_of(await run(tiny_engine, req("c", seed=999, **kw)))
    assert a == b
    assert a != c
    # top_k 1 is greedy whatever the temperature
    g = ids_of(await run(tiny_engine, req("g", max_tokens=16, ignore_eos=True)))
    k1 = ids_of(
        await run(tiny_engine, req("k", temperature=1.5, top_k=1, seed=5, max_tokens=16, ignore_eos=True))
    )
    assert g == k1


async def test_cancel_ends_with_cancelled_and_keeps_billing(tiny_engine: TorchEngine) -> None:
    chunks: list[Chunk] = []
    with trio.fail_after(30):
        async for c in tiny_engine.generate_stream(req("x", max_tokens=200, ignore_eos=True)):
            chunks.append(c)
            if len(chunks) == 2:
                assert await tiny_engine.cancel("x")
    final = check_billing(chunks)
    assert final.finish_reason == "cancelled"
    assert final.completion_tokens < 200
    assert not await tiny_engine.cancel("x")
    assert tiny_engine.stats().running == 0


async def test_leaving_the_iterator_frees_the_slot(tiny_engine: TorchEngine) -> None:
    before = tiny_engine.stats()
    with trio.fail_after(30):
        async with aclosing(tiny_engine.generate_stream(req("y", max_tokens=200, ignore_eos=True))) as it:
            async for c in it:
                assert isinstance(c, TokenChunk)
                break
        await tiny_engine.wait_idle()
    after = tiny_engine.stats()
    assert after.running == 0
    assert after.free_slots == 4
    assert after.cancelled == before.cancelled + 1
    # the same request id can be used again and the engine still serves
    check_billing(await run(tiny_engine, req("y", max_tokens=4)))


async def test_more_requests_than_slots_queue_and_finish(tiny_engine: TorchEngine) -> None:
    finals: list[FinalChunk] = []

    async def one(i: int) -> None:
        final = check_billing(await run(tiny_engine, req(f"q{i}", max_tokens=6, ignore_eos=True)))
        finals.append(final)

    async with trio.open_nursery() as n:
        for i in range(7):
            n.start_soon(one, i)
    assert len(finals) == 7
    assert all(f.completion_tokens == 6 for f in finals)
    assert max(f.queue_s for f in finals) > 0
    assert tiny_engine.stats().free_slots == 4


async def test_slow_reader_is_paused_and_does_not_stall_others(tiny_model_dir: Path) -> None:
    engine = TorchEngine(tiny_model_dir, weights="fp32", slots=2, context=256, threads=1, max_buffered=4)
    await engine.load()
    slow = engine.generate_stream(req("slow", max_tokens=40, ignore_eos=True))
    slow_chunks: list[Chunk] = []
    with trio.fail_after(30):
        slow_chunks.append(await slow.__anext__())
        # the other request runs to completion while "slow" is not read
        fast = await run(engine, req("fast", max_tokens=30, ignore_eos=True))
        assert check_billing(fast).completion_tokens == 30
        s = engine.stats()
        assert s.paused == 1
        assert s.running == 1
        async for c in slow:
            slow_chunks.append(c)
            assert len(c.token_ids) <= 4
    final = check_billing(slow_chunks)
    assert final.completion_tokens == 40
    await engine.close()


@pytest.mark.parametrize(
    ("kw", "exc", "code"),
    [
        ({"max_tokens": 10_000}, MaxTokensTooLarge, "max_tokens_too_large"),
        ({"max_tokens": 0}, MaxTokensTooLarge, "max_tokens_too_large"),
        (
            {"messages": (ChatMessage("user", "word " * 300),)},
            ContextLengthExceeded,
            "context_length_exceeded",
        ),
        (
            {"max_tokens": 250, "messages": (ChatMessage("user", "a b c " * 10),)},
            ContextLengthExceeded,
            "context_length_exceeded",
        ),
        ({"temperature": -1.0}, InvalidSampling, "invalid_sampling"),
        ({"temperature": math.inf}, InvalidSampling, "invalid_sampling"),
        ({"top_p": 0.0}, InvalidSampling, "invalid_sampling"),
        ({"top_k": 10**6}, InvalidSampling, "invalid_sampling"),
        ({"seed": -1}, InvalidSampling, "invalid_sampling"),
        ({"stop": ("",)}, InvalidSampling, "invalid_sampling"),
        ({"stop_token_ids": (10**6,)}, InvalidSampling, "invalid_sampling"),
        ({"prompt": "both"}, MalformedRequest, "bad_request"),
        ({"messages": ()}, MalformedRequest, "bad_request"),
        ({"messages": (ChatMessage("wizard", "hi"),)}, MalformedRequest, "bad_request"),
        ({"request_id": ""}, MalformedRequest, "bad_request"),
    ],
)
async def test_bad_requests_are_typed_and_the_engine_keeps_serving(
    tiny_engine: TorchEngine, kw: dict[str, object], exc: type[BadRequest], code: str
) -> None:
    rid = str(kw.pop("request_id", "bad"))
    with pytest.raises(exc) as info:
        await run(tiny_engine, req(rid, **kw))
    assert error_code(info.value) == code
    assert tiny_engine.stats().running == 0
    assert tiny_engine.stats().waiting == 0
    check_billing(await run(tiny_engine, req("good", max_tokens=3)))


async def test_duplicate_request_id_in_flight(tiny_engine: TorchEngine) -> None:
    with trio.fail_after(30):
        async with aclosing(tiny_engine.generate_stream(req("dup", max_tokens=50, ignore_eos=True))) as it:
            await it.__anext__()
            with pytest.raises(MalformedRequest, match="already in flight"):
                await run(tiny_engine, req("dup"))


async def test_raw_prompt_and_a_failing_forward_pass(
    tiny_engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = await run(tiny_engine, req("raw", messages=(), prompt="The capital of France is", max_tokens=5))
    check_billing(chunks)
    model = tiny_engine._model
    assert model is not None
    original = model.decode
    calls = 0

    def flaky(*a: object, **k: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("injected fault")
        return original(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "decode", flaky)
    final = check_billing(await run(tiny_engine, req("boom", max_tokens=8, ignore_eos=True)))
    assert final.finish_reason == "error"
    assert tiny_engine.stats().failed == 1
    assert (
        check_billing(await run(tiny_engine, req("after", max_tokens=4, ignore_eos=True))).completion_tokens
        == 4
    )


async def test_gguf_model_with_int8_weights(tiny_gguf: Path) -> None:
    engine = TorchEngine(tiny_gguf, model_id="tiny-gguf", weights="int8", slots=2, context=128, threads=1)
    info = await engine.load()
    assert info.format == "gguf"
    assert info.weights == "int8"
    assert info.chat
    assert info.model_id == "tiny-gguf"
    final = check_billing(await run(engine, req(model="tiny-gguf", max_tokens=8, ignore_eos=True)))
    assert final.completion_tokens == 8
    await engine.close()
    with pytest.raises(InferenceError, match="closed"):
        await run(engine, req())


async def test_corrupt_model_file_fails_load_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    engine = TorchEngine(bad, threads=1)
    with pytest.raises(ModelLoadError, match=r"broken\.gguf"):
        await engine.load()


async def test_continuation_resumes_where_another_worker_stopped(tiny_engine: TorchEngine) -> None:
    ref = ids_of(await run(tiny_engine, req("ref", max_tokens=12, ignore_eos=True)))
    base = tiny_engine.count_prompt_tokens(req("count"))
    resumed_req = req("resume", max_tokens=7, ignore_eos=True, continuation=tuple(ref[:5]))
    assert tiny_engine.count_prompt_tokens(resumed_req) == base + 5
    resumed = await run(tiny_engine, resumed_req)
    final = check_billing(resumed)
    assert final.prompt_tokens == base + 5
    assert final.completion_tokens == 7
    assert ids_of(resumed) == ref[5:12]
    with pytest.raises(MalformedRequest, match="continuation"):
        tiny_engine.count_prompt_tokens(req("bad", continuation=(10**6,)))
    with pytest.raises(ContextLengthExceeded):
        tiny_engine.count_prompt_tokens(req("long", max_tokens=100, continuation=(5,) * 200))
