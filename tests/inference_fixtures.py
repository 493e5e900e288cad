"""Pytest fixtures for the tiny model and engines (import them into a test module to use them).

``from tests.inference_fixtures import tiny_model_dir, tiny_engine  # noqa: F401``

The tiny model is written once per session (milliseconds); engines are loaded
per test (milliseconds) with one torch thread.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from inference.cpu import TorchEngine
from inference.tiny import write_tiny_gguf, write_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("inference") / "tiny")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(
        tiny_model_dir, tmp_path_factory.mktemp("inference") / "tiny-q8_0.gguf", qtype="Q8_0"
    )


@pytest.fixture
async def tiny_engine(tiny_model_dir: Path) -> AsyncIterator[TorchEngine]:
    """The tiny model in fp32 (batch-invariant), 4 slots, context 256."""
    engine = TorchEngine(
        tiny_model_dir, model_id="tiny", weights="fp32", slots=4, context=256, threads=1, seed=7
    )
    await engine.load()
    try:
        yield engine
    finally:
        await engine.close()


@pytest.fixture
def no_network() -> Iterator[list[str]]:
    """Record every socket connect / DNS lookup attempted during the test (the test asserts it is empty)."""
    attempts: list[str] = []
    active = True

    def hook(event: str, args: tuple[object, ...]) -> None:
        if active and event in ("socket.connect", "socket.getaddrinfo"):
            attempts.append(f"{event} {args[1:]!r}")

    sys.addaudithook(hook)
    try:
        yield attempts
    finally:
        active = False
