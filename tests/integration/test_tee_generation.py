# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""The real generation service (tiny model, real loader and forward pass) inside a SealedStream.

A relay in the middle records every byte both ways and finds neither the prompt nor the answer.
"""

from __future__ import annotations

from contextlib import aclosing

import trio

from inference.cpu import TorchEngine
from inference.messages import ChatMessage, Chunk, FinalChunk, GenerateRequest
from inference.service import GenerationService, generate
from node.tee import ReplayGuard, SealedStream, new_epoch_keys, verify_transcript
from node.tee.claims import EpochKeys
from overlay.errors import StreamBroken
from overlay.streams import FramedStream, memory_stream_pair
from tests.inference_fixtures import tiny_engine, tiny_model_dir  # noqa: F401

SECRET = "The launch code is 7-alpha-tango-9, tell nobody"


def _keys() -> EpochKeys:
    return new_epoch_keys(
        tier="none",
        peer_id="worker",
        model_id="tiny",
        model_hash=bytes(32),
        epoch=1,
        epoch_beacon=bytes(32),
        issued_at=0,
        not_after=10**10,
    )


def _request(rid: str) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model="tiny",
        max_tokens=24,
        messages=(ChatMessage("user", SECRET),),
        temperature=0.0,
        ignore_eos=True,
    )


async def _relay(src: FramedStream, dst: FramedStream, seen: bytearray) -> None:
    try:
        while (frame := await src.receive_raw()) is not None:
            seen += frame
            await dst.send_raw(frame)
    except StreamBroken:
        await dst.reset()
        return
    await dst.aclose()


async def test_generation_service_runs_unchanged_in_a_sealed_stream(tiny_engine: TorchEngine) -> None:
    keys = _keys()
    service = GenerationService({"tiny": tiny_engine})
    guard = ReplayGuard()

    async def worker(raw: object) -> None:
        sealed = await SealedStream.accept(
            FramedStream(raw, peer_id="client"), {keys.claims_hash: keys}.get, replay=guard
        )  # type: ignore[arg-type]
        await service.handle(sealed)

    # the same request in the clear, for reference
    plain_c, plain_w = memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.handle, FramedStream(plain_w, peer_id="client"))
        with trio.fail_after(60):
            async with aclosing(generate(FramedStream(plain_c, peer_id="worker"), _request("plain"))) as gen:
                plain = [c async for c in gen]

    c_raw, r1 = memory_stream_pair()
    r2, w_raw = memory_stream_pair()
    seen = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker, w_raw)
        nursery.start_soon(_relay, FramedStream(r1), FramedStream(r2), seen)
        nursery.start_soon(_relay, FramedStream(r2), FramedStream(r1), seen)
        client = SealedStream.client(FramedStream(c_raw, peer_id="worker"), keys.claims)
        with trio.fail_after(60):
            async with aclosing(generate(client, _request("sealed"))) as gen:
                sealed: list[Chunk] = [c async for c in gen]

    assert isinstance(sealed[-1], FinalChunk)
    ids = [t for c in sealed for t in c.token_ids]
    assert ids == [t for c in plain for t in c.token_ids]  # the same generation, sealed
    assert len(ids) == 24
    answer = "".join(c.text for c in sealed)
    assert len(answer) >= 8
    captured = bytes(seen)
    assert len(captured) > 400
    assert SECRET.encode() not in captured
    for piece in ("launch code", "7-alpha-tango", "tell nobody"):
        assert piece.encode() not in captured
    for i in range(0, len(answer) - 7):  # no 8-character window of the answer either
        assert answer[i : i + 8].encode() not in captured
    assert service.statistics().served == 2


async def test_client_reading_to_the_end_gets_the_signed_transcript(tiny_engine: TorchEngine) -> None:
    keys = _keys()
    service = GenerationService({"tiny": tiny_engine})
    c_raw, w_raw = memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def worker() -> None:
            await service.handle(await SealedStream.accept(FramedStream(w_raw), {keys.claims_hash: keys}.get))

        nursery.start_soon(worker)
        client = SealedStream.client(FramedStream(c_raw), keys.claims)
        with trio.fail_after(60):
            await client.send(_request("t"))
            got = [m async for m in client]  # to the sealed end of stream
            await client.aclose()
    assert isinstance(got[-1], FinalChunk)
    t = client.transcript
    assert t is not None
    assert (t.sent, t.received) == (len(got), 1)
    verify_transcript(t, keys.claims)
