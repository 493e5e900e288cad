# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""The generation service over in-memory framed streams, and the client's validating helper."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.cpu import TorchEngine
from inference.messages import CancelGeneration, ChatMessage, Chunk, FinalChunk, GenerateRequest, TokenChunk
from inference.service import BillingViolation, ChunkValidator, GenerationService, generate, merge_chunks
from overlay import wire
from overlay.errors import RemoteError, RemoteProtocolError, StreamBroken
from overlay.streams import FramedStream, memory_stream_pair
from tests.inference_fixtures import tiny_engine, tiny_model_dir  # noqa: F401


def req(rid: str = "r1", **kw: object) -> GenerateRequest:
    base: dict[str, object] = {
        "model": "tiny",
        "max_tokens": 16,
        "messages": (ChatMessage("user", "Hello there"),),
        "temperature": 0.0,
        "ignore_eos": True,
    }
    base.update(kw)
    return GenerateRequest(request_id=rid, **base)  # type: ignore[arg-type]


@pytest.fixture
async def served(tiny_engine: TorchEngine) -> AsyncIterator[tuple[GenerationService, trio.Nursery]]:
    service = GenerationService({"tiny": tiny_engine})
    async with trio.open_nursery() as nursery:
        yield service, nursery
        nursery.cancel_scope.cancel()


def connect(service: GenerationService, nursery: trio.Nursery, buffer: float = math.inf) -> FramedStream:
    a, b = memory_stream_pair(buffer)
    nursery.start_soon(service.handle, FramedStream(b, peer_id="client"))
    return FramedStream(a, peer_id="worker")


async def collect(stream: FramedStream, request: GenerateRequest) -> list[Chunk]:
    with trio.fail_after(30):
        async with aclosing(generate(stream, request)) as chunks:
            return [c async for c in chunks]


async def test_generation_through_the_service_matches_the_engine(
    served: tuple[GenerationService, trio.Nursery], tiny_engine: TorchEngine
) -> None:
    service, nursery = served
    direct = [c async for c in tiny_engine.generate_stream(req("direct"))]
    chunks = await collect(connect(service, nursery), req("via"))
    final = chunks[-1]
    assert isinstance(final, FinalChunk)
    assert final.completion_tokens == 16
    assert final.finish_reason == "length"
    assert [t for c in chunks for t in c.token_ids] == [t for c in direct for t in c.token_ids]
    assert "".join(c.text for c in chunks) == "".join(c.text for c in direct)
    with trio.fail_after(10):
        await trio.testing.wait_all_tasks_blocked()  # the handler finishes after the client's last read
    stats = service.statistics()
    assert stats.served == 1
    assert stats.tokens == 16


async def test_chunks_are_coalesced(tiny_engine: TorchEngine) -> None:
    service = GenerationService({"tiny": tiny_engine}, coalesce_s=10.0, max_chunk_tokens=8)
    async with trio.open_nursery() as nursery:
        chunks = await collect(connect(service, nursery), req(max_tokens=40))
    assert sum(len(c.token_ids) for c in chunks) == 40
    # the first chunk goes out at once (whatever the engine had), then up to 8 tokens per message
    # (more only when the engine itself handed over a bigger chunk: a slow sender's backlog)
    assert len(chunks) <= 40 // 3


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"model": "nope"}, "unknown_model"),
        ({"max_tokens": 100_000}, "max_tokens_too_large"),
        ({"messages": (ChatMessage("user", "word " * 400),)}, "context_length_exceeded"),
        ({"top_p": 2.0}, "invalid_sampling"),
        ({"prompt": "and messages"}, "bad_request"),
    ],
)
async def test_bad_requests_get_error_frames_and_the_worker_keeps_serving(
    served: tuple[GenerationService, trio.Nursery], kw: dict[str, object], code: str
) -> None:
    service, nursery = served
    with pytest.raises(RemoteError) as info:
        await collect(connect(service, nursery), req("bad", **kw))
    assert info.value.code == code
    good = await collect(connect(service, nursery), req("good", max_tokens=3))
    assert isinstance(good[-1], FinalChunk)
    assert service.statistics().errors == 1


async def test_wrong_first_message_and_garbage(served: tuple[GenerationService, trio.Nursery]) -> None:
    service, nursery = served
    s = connect(service, nursery)
    with trio.fail_after(10):
        await s.send(wire.ErrorFrame("x", "not a request"))
        answer = await s.receive()
    assert isinstance(answer, wire.ErrorFrame)
    assert answer.code == "bad_request"
    # raw garbage: the worker's stream resets, nothing crashes
    a, b = memory_stream_pair()
    nursery.start_soon(service.handle, FramedStream(b, peer_id="garbage"))
    await a.write(b"\x05\xc1\xc1\xc1\xc1\xc1")
    with trio.fail_after(10):
        with pytest.raises(StreamBroken):
            await FramedStream(a).receive_as(FinalChunk)
    good = await collect(connect(service, nursery), req("after-garbage", max_tokens=2))
    assert isinstance(good[-1], FinalChunk)


async def test_client_that_goes_away_frees_its_slot(
    served: tuple[GenerationService, trio.Nursery], tiny_engine: TorchEngine
) -> None:
    service, nursery = served
    leaving = connect(service, nursery)
    staying = connect(service, nursery)
    results: list[Chunk] = []

    async def stay() -> None:
        results.extend(await collect(staying, req("stay", max_tokens=60)))

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            inner.start_soon(stay)
            async with aclosing(generate(leaving, req("leave", max_tokens=200))) as chunks:
                async for _ in chunks:
                    break  # leaving early resets the stream
        await tiny_engine.wait_idle()
    assert isinstance(results[-1], FinalChunk)
    assert results[-1].completion_tokens == 60
    stats = tiny_engine.stats()
    assert stats.cancelled == 1
    assert stats.running == 0
    assert stats.free_slots == 4
    assert service.statistics().disconnects == 1


async def test_cancel_message_ends_with_a_cancelled_final_chunk(
    served: tuple[GenerationService, trio.Nursery],
) -> None:
    service, nursery = served
    s = connect(service, nursery)
    request = req("c", max_tokens=200)
    got: list[Chunk] = []
    with trio.fail_after(30):
        async with aclosing(generate(s, request)) as chunks:
            async for c in chunks:
                got.append(c)
                if len(got) == 1:
                    await s.send(CancelGeneration("c"))
    final = got[-1]
    assert isinstance(final, FinalChunk)
    assert final.finish_reason == "cancelled"
    assert sum(len(c.token_ids) for c in got) == final.completion_tokens < 200


async def test_slow_reader_does_not_stall_other_clients(tiny_model_dir: object) -> None:
    engine = TorchEngine(
        str(tiny_model_dir), model_id="tiny", weights="fp32", slots=2, threads=1, max_buffered=4
    )
    await engine.load()
    service = GenerationService({"tiny": engine}, queue_chunks=1)
    async with trio.open_nursery() as nursery:
        slow = connect(service, nursery, buffer=1)  # one frame of transport buffer
        await slow.send(req("slow", max_tokens=120))
        with trio.fail_after(30):
            first = await slow.receive()
            assert isinstance(first, TokenChunk)
            fast = await collect(connect(service, nursery), req("fast", max_tokens=50))
            assert isinstance(fast[-1], FinalChunk)
            assert engine.stats().paused == 1
            rest: list[Chunk] = [first]
            validator = ChunkValidator(req("slow", max_tokens=120))
            validator.check(first)
            while not validator.finished:
                rest.append(validator.check(await slow.receive()))
        final = rest[-1]
        assert isinstance(final, FinalChunk)
        assert final.completion_tokens == 120
        nursery.cancel_scope.cancel()
    await engine.close()


async def test_concurrent_streams_are_batched(
    served: tuple[GenerationService, trio.Nursery], tiny_engine: TorchEngine
) -> None:
    service, nursery = served
    before = tiny_engine.stats().steps
    async with trio.open_nursery() as inner:
        for i in range(4):
            inner.start_soon(collect, connect(service, nursery), req(f"b{i}", max_tokens=20))
    assert tiny_engine.stats().steps - before < 2 * 20 + 4


def _final(rid: str, n: int, ids: tuple[int, ...] = (), reason: str = "length") -> FinalChunk:
    return FinalChunk(rid, ids, "", n, 3, reason, 0.1, 10.0)


def test_validator_rejects_miscounted_chunks() -> None:
    r = req("v", max_tokens=5)
    v = ChunkValidator(r)
    v.check(TokenChunk("v", (1, 2), "ab", 2))
    with pytest.raises(BillingViolation):
        v.check(TokenChunk("v", (3,), "c", 4))  # claims one more than delivered
    v = ChunkValidator(r)
    with pytest.raises(BillingViolation, match="exceed max_tokens"):
        v.check(TokenChunk("v", (1, 2, 3, 4, 5, 6), "", 6))
    with pytest.raises(RemoteProtocolError, match="request"):
        ChunkValidator(r).check(TokenChunk("other", (1,), "", 1))
    with pytest.raises(RemoteProtocolError, match="without tokens"):
        ChunkValidator(r).check(TokenChunk("v", (), "x", 0))
    with pytest.raises(RemoteProtocolError, match="finish reason"):
        ChunkValidator(r).check(_final("v", 0, reason="bored"))
    v = ChunkValidator(r)
    v.check(_final("v", 1, (7,)))
    with pytest.raises(RemoteProtocolError, match="after the final"):
        v.check(_final("v", 1))
    with pytest.raises(RemoteProtocolError, match="expected a chunk"):
        ChunkValidator(r).check(wire.ErrorFrame("x", "y"))


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=10), lie=st.integers(-3, 3))
def test_validator_accepts_exactly_the_honest_counts(sizes: list[int], lie: int) -> None:
    r = req("h", max_tokens=100)
    v = ChunkValidator(r)
    total = 0
    for n in sizes[:-1]:
        total += n
        v.check(TokenChunk("h", tuple(range(n)), "", total))
    total += sizes[-1]
    last = _final("h", total + lie, tuple(range(sizes[-1])))
    if lie == 0:
        assert v.check(last) is last
    else:
        with pytest.raises(BillingViolation):
            v.check(last)


def test_merge_chunks() -> None:
    a = TokenChunk("m", (1, 2), "ab", 2)
    b = TokenChunk("m", (3,), "c", 3)
    assert merge_chunks(a, b) == TokenChunk("m", (1, 2, 3), "abc", 3)
    f = _final("m", 4, (4,))
    merged = merge_chunks(a, f)
    assert isinstance(merged, FinalChunk)
    assert merged.token_ids == (1, 2, 4)
    assert merged.completion_tokens == 4


class _Recorder:
    """A MessageStream that records what is sent (for the sender's merging rules)."""

    peer_id = "recorder"

    def __init__(self) -> None:
        self.sent: list[object] = []

    async def send(self, msg: object) -> None:
        self.sent.append(msg)

    async def receive(self) -> object | None:
        return None

    async def aclose(self) -> None:
        pass

    async def reset(self) -> None:
        pass


async def test_sender_merges_up_to_the_limit_and_carries_the_rest() -> None:
    service = GenerationService({}, coalesce_s=10.0, max_chunk_tokens=8)
    send, recv = trio.open_memory_channel[Chunk](100)
    total = 0
    for n in (1, 5, 2, 5, 3, 3, 3):
        total += n
        send.send_nowait(TokenChunk("s", tuple(range(n)), "x" * n, total))
    send.send_nowait(_final("s", total + 1, (9,)))
    out = _Recorder()
    with trio.fail_after(10):
        await service._send_loop(out, recv, lambda: None)
    sizes = [len(c.token_ids) for c in out.sent]  # type: ignore[attr-defined]
    assert sizes == [1, 7, 8, 7]  # the first alone; 5+2 (5 more would not fit); 5+3; 3+3+the final's 1
    assert isinstance(out.sent[-1], FinalChunk)
    assert sum(sizes) == total + 1
