# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""The generation service over real libp2p streams on loopback (Noise, yamux, TCP)."""

from __future__ import annotations

from contextlib import AsyncExitStack, aclosing

import pytest
import trio

from inference.cpu import TorchEngine
from inference.messages import ChatMessage, Chunk, FinalChunk, GenerateRequest
from inference.service import PROTOCOL_ID, GenerationService, generate
from overlay.errors import RemoteError
from overlay.host import open_overlay
from overlay.identity import Identity
from tests.inference_fixtures import tiny_engine, tiny_model_dir  # noqa: F401


def req(rid: str, **kw: object) -> GenerateRequest:
    base: dict[str, object] = {
        "model": "tiny",
        "max_tokens": 24,
        "messages": (ChatMessage("user", "Hello over libp2p"),),
        "temperature": 0.0,
        "ignore_eos": True,
    }
    base.update(kw)
    return GenerateRequest(request_id=rid, **base)  # type: ignore[arg-type]


async def test_generation_over_libp2p(tiny_engine: TorchEngine) -> None:
    service = GenerationService({"tiny": tiny_engine})
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(open_overlay(Identity.generate()))
        client = await stack.enter_async_context(open_overlay(Identity.generate()))
        worker.set_stream_handler(PROTOCOL_ID, service.handle)
        with trio.fail_after(30):
            await client.connect(worker.listen_addrs()[0])
            stream = await client.open_stream(worker.peer_id, PROTOCOL_ID)
            async with aclosing(generate(stream, req("p2p"))) as chunks:
                got: list[Chunk] = [c async for c in chunks]
            final = got[-1]
            assert isinstance(final, FinalChunk)
            assert final.completion_tokens == 24
            assert sum(len(c.token_ids) for c in got) == 24
            direct = [t async for c in tiny_engine.generate_stream(req("direct")) for t in c.token_ids]
            assert [t for c in got for t in c.token_ids] == direct

            # a client that resets mid-generation frees its slot; the worker keeps serving
            leaving = await client.open_stream(worker.peer_id, PROTOCOL_ID)
            async with aclosing(generate(leaving, req("leave", max_tokens=200))) as chunks:
                async for _ in chunks:
                    break
            await tiny_engine.wait_idle()
            assert tiny_engine.stats().cancelled == 1

            bad = await client.open_stream(worker.peer_id, PROTOCOL_ID)
            with pytest.raises(RemoteError) as refused:
                async with aclosing(generate(bad, req("bad", model="nope"))) as chunks:
                    [c async for c in chunks]
            assert refused.value.code == "unknown_model"
            again = await client.open_stream(worker.peer_id, PROTOCOL_ID)
            async with aclosing(generate(again, req("again", max_tokens=3))) as chunks:
                assert isinstance([c async for c in chunks][-1], FinalChunk)
