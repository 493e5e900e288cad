# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""``--engine``: the auto order, the fallback at load time, clear errors for engines that cannot run here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from inference.cpu import TorchEngine
from inference.engine import DeviceMemoryError, ModelInfo
from inference.messages import ChatMessage, FinalChunk, GenerateRequest
from inference.select import ENGINE_KINDS, AutoEngine, auto_order, cuda_available, select_engine
from overlay.errors import ConfigError, ModelLoadError
from tests.inference_fixtures import tiny_model_dir  # noqa: F401


def test_auto_order() -> None:
    assert auto_order(cuda=False, is_dir=True, exl3=True, exl2=True, flash_attn=True) == ["cpu"]
    assert auto_order(cuda=True, is_dir=True, exl3=True, exl2=True, flash_attn=False) == [
        "exllamav3",
        "cuda",
        "exllamav2",
    ]
    assert auto_order(cuda=True, is_dir=True, exl3=False, exl2=True, flash_attn=True) == ["exllamav2", "cuda"]
    assert auto_order(cuda=True, is_dir=False, exl3=True, exl2=True, flash_attn=True) == ["cuda"]  # GGUF


def test_kinds_that_cannot_run_here(tiny_model_dir: Path) -> None:
    assert ENGINE_KINDS == ("auto", "cpu", "cuda", "exllamav2", "exllamav3")
    if not cuda_available()[0]:
        for kind in ("cuda", "exllamav2", "exllamav3"):
            with pytest.raises(ConfigError, match=f"--engine {kind}"):
                select_engine(kind, tiny_model_dir)
        assert isinstance(select_engine("auto", tiny_model_dir), TorchEngine)
    assert isinstance(select_engine("cpu", tiny_model_dir), TorchEngine)


class Broken:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.closed = False

    async def load(self) -> ModelInfo:
        raise self.exc

    async def close(self) -> None:
        self.closed = True


async def test_auto_takes_the_first_engine_that_loads(tiny_model_dir: Path) -> None:
    broken = Broken(ModelLoadError("/m: exllamav3 could not load the model: Unknown architecture"))
    good = TorchEngine(tiny_model_dir, model_id="t", weights="fp32", slots=2, context=128, threads=1)
    auto = AutoEngine([("exllamav3", lambda: broken), ("cuda", lambda: good)])  # type: ignore[list-item]
    info = await auto.load()
    assert auto.kind == "cuda"
    assert info.max_batch == 2
    assert broken.closed
    assert auto.tried == ["exllamav3: /m: exllamav3 could not load the model: Unknown architecture"]
    r = GenerateRequest("a", "t", 4, messages=(ChatMessage("user", "hi"),), temperature=0.0, ignore_eos=True)
    with trio.fail_after(30):
        chunks = [c async for c in auto.generate_stream(r)]
    assert isinstance(chunks[-1], FinalChunk)
    assert auto.count_prompt_tokens(r) == chunks[-1].prompt_tokens
    assert auto.stats().completed == 1
    await auto.close()


async def test_auto_stops_at_memory_and_reports_every_failure() -> None:
    full: Any = Broken(DeviceMemoryError("lower worker.max_context to 1024"))
    never: Any = Broken(ModelLoadError("not reached"))
    with pytest.raises(DeviceMemoryError):
        await AutoEngine([("exllamav3", lambda: full), ("cuda", lambda: never)]).load()
    a: Any = Broken(ModelLoadError("a failed"))
    b: Any = Broken(RuntimeError("b failed"))
    with pytest.raises(ModelLoadError, match=r"exllamav3: a failed; cuda: b failed"):
        await AutoEngine([("exllamav3", lambda: a), ("cuda", lambda: b)]).load()
