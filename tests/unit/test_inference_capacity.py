# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""Honest capacity: the offer's capacity and engine come from the engine, status shows the device, a lost GPU
withdraws the worker's offers."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import trio

from inference.cpu import TorchEngine
from inference.engine import DeviceLost, ModelInfo
from market.pricing import OfferPublisher, PricingPolicy, WorkerProfile
from market.records import Offer, sign_offer
from node.config import NodeConfig
from node.worker import WorkerRole, engine_status
from overlay import wire
from overlay.identity import Identity
from tests.inference_fixtures import tiny_model_dir  # noqa: F401

GIB = 1 << 30


def _info(**kw: Any) -> ModelInfo:
    base: dict[str, Any] = {
        "model_id": "m", "engine": "cpu", "path": "/m", "format": "hf", "n_params": 1, "vocab_size": 10,
        "context_length": 2048, "max_tokens": 2047, "max_batch": 8, "chat": True, "weights": "int8",
        "load_s": 0.1,
    }  # fmt: skip
    base.update(kw)
    return ModelInfo(**base)


def test_status_shows_engine_batch_and_device() -> None:
    assert engine_status(_info()) == {"weights": "int8", "batch": 8, "context": 2048, "device": "cpu"}
    gpu = _info(
        engine="exllamav2",
        max_batch=1,
        weights="fp16",
        device="cuda:0",
        gpu_name="NVIDIA H200",
        gpu_memory_total=140 * GIB,
        gpu_memory_free=100 * GIB,
        kv_cache_bytes=GIB // 2,
    )
    st = engine_status(gpu, "CUDA error: unspecified launch failure")
    assert st["batch"] == 1
    assert st["device"] == "cuda:0 NVIDIA H200"
    assert st["kv_cache"] == "0.50 GiB"
    assert str(st["gpu_memory"]).endswith("of 140.0 GiB free")
    assert st["device_lost"] == "CUDA error: unspecified launch failure (offers withdrawn)"


def test_the_offer_names_the_engine_and_old_offers_still_verify() -> None:
    ident = Identity.generate()
    profile = WorkerProfile(
        ident.peer_id, ident.public_key, ("/ip4/1.2.3.4/tcp/1",), "m", b"\0" * 32, capacity=1,
        max_context=2048, decode_tok_s=100.0, engine="exllamav2",
    )  # fmt: skip
    body = OfferPublisher(profile, PricingPolicy(250, 1000)).tick(1000.0)
    assert body is not None
    assert (body.engine, body.capacity) == ("exllamav2", 1)
    signed = sign_offer(ident, body)
    again = wire.decode(wire.encode(signed))
    assert again == signed
    # an offer from a worker before the field existed: one field fewer on the wire, engine ""
    import msgpack

    env = msgpack.unpackb(wire.encode(body), raw=False, use_list=True)
    env[2] = env[2][:-1]
    old = wire.decode(msgpack.packb(env, use_bin_type=True))
    assert isinstance(old, Offer)
    assert old.engine == ""


class FakeMarket:
    def __init__(self) -> None:
        self.withdrawn = 0
        self.published = 3

    async def withdraw(self) -> None:
        self.withdrawn += 1


async def test_a_lost_gpu_withdraws_the_offers(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = TorchEngine(
        tiny_model_dir, model_id="t", weights="bf16", slots=2, context=128, probe=lambda d: "fell off the bus"
    )
    info = await engine.load()
    role = WorkerRole(NodeConfig(data_dir=tmp_path), types.SimpleNamespace(timings=None), engine=engine)  # type: ignore[arg-type]
    role.info = info
    market = role.market = FakeMarket()  # type: ignore[assignment]
    model = engine._model
    assert model is not None

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model, "prefill", broken)
    from inference.messages import ChatMessage, GenerateRequest

    r = GenerateRequest("a", "t", 4, messages=(ChatMessage("user", "hi"),), temperature=0.0)

    async def one() -> None:
        async for _ in engine.generate_stream(r):
            pass

    async with trio.open_nursery() as n:
        n.start_soon(role._watch_device)
        with trio.fail_after(30), pytest.raises(DeviceLost):
            await one()
    assert market.withdrawn == 1
    assert role.device_lost == "fell off the bus"
    assert role.status_section()["device_lost"] == "fell off the bus (offers withdrawn)"
    await engine.close()
