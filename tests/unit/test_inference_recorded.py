"""Recorded truth from a GPU (``bench/gpu_record.py``), tested on the CPU: mapping, accounting, logits.

The fixtures live in ``tests/fixtures/gpu/`` (``COCOON_GPU_FIXTURES`` points
elsewhere).  **No recording exists until a session with a GPU runs
``bench/gpu_run.sh``**; until then every test here skips, saying so.  Nothing
here is fabricated: the files are what the real generators returned.

- ``<library>_results.json``: the real result dicts, replayed through
  :class:`~inference.jobs.ResultMapper` (billing: the chunks' ids add up to
  ``new_tokens``; the finish reason of each script) and, one job at a time,
  through the engine shell with a backend that returns them;
- ``logits.json``: transformers' fp16 first-step logits and greedy ids on
  the GPU for the tiny model, against our own engine on the CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from bench.gpu_record import MODEL_SPEC, QUESTION, write_model
from inference.cpu import TorchEngine
from inference.jobs import GeneratorEngine, ResultMapper
from inference.messages import ChatMessage, FinalChunk, GenerateRequest

FIXTURES = Path(
    os.environ.get("COCOON_GPU_FIXTURES", Path(__file__).resolve().parent.parent / "fixtures" / "gpu")
)
FINISH = {
    "greedy": "length",
    "stop_token": "stop_token",
    "stop_string": "stop_string",
    "two_at_once": "length",
}


def _load(name: str) -> dict[str, Any]:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"no GPU recording {path.name} yet (a GPU session runs bench/gpu_run.sh to record it)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("recorded"))


@pytest.fixture(params=["exllamav2", "exllamav3"])
def results(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _load(f"{request.param}_results.json")


@pytest.fixture
def logits() -> dict[str, Any]:
    return _load("logits.json")


def test_recorded_results_map_and_bill(results: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    rec = results
    library = rec["library"]
    for name, script in rec["scripts"].items():
        results = [r for step in script["iterations"] for r in step]
        for rid, job in script["jobs"].items():
            mapper = ResultMapper(rid, len(job["prompt"]), library)
            chunks = [c for r in results if r.get("identifier") == rid and (c := mapper.feed(r)) is not None]
            final = chunks[-1]
            assert isinstance(final, FinalChunk), (name, rid)
            eos = next(r for r in results if r.get("identifier") == rid and r.get("eos"))
            assert sum(len(c.token_ids) for c in chunks) == final.completion_tokens == eos["new_tokens"]
            assert final.finish_reason == FINISH[name], (name, eos.get("eos_reason"))
            assert final.completion_tokens <= job["max_tokens"]
            if name == "stop_token":
                assert final.token_ids[-1] in job["stop"]  # billed, sent in the final chunk
            if name == "stop_string":
                assert job["stop"][0] not in "".join(c.text for c in chunks)
    assert "new tokens, results carried" not in caplog.text


class Replay:
    """A backend returning one recorded job's result dicts, one iterate() at a time."""

    max_seq_len = 512
    device = "cpu"

    def __init__(self, iterations: list[list[dict[str, Any]]], max_batch: int) -> None:
        self.max_batch = max_batch
        self._steps: Iterator[list[dict[str, Any]]] = iter(iterations)
        self._left = len(iterations)
        self.made: list[tuple[list[int], list[int | str]]] = []

    def make_job(self, req: GenerateRequest, input_ids: list[int], stop: list[int | str], seed: int) -> str:
        self.made.append((input_ids, stop))
        return req.request_id

    def enqueue(self, job: str) -> None:
        pass

    def cancel(self, job: str) -> None:
        pass

    def num_remaining_jobs(self) -> int:
        return self._left

    def iterate(self) -> list[dict[str, Any]]:
        self._left -= 1
        return next(self._steps, [])


async def test_recorded_results_through_the_engine_shell(results: dict[str, Any], model_dir: Path) -> None:
    rec = results
    library = rec["library"]
    for name in ("greedy", "stop_token", "stop_string"):
        script = rec["scripts"].get(name)
        if script is None:
            continue
        ((rid, job),) = script["jobs"].items()
        replay = Replay(script["iterations"], rec["max_batch"])
        engine = GeneratorEngine(model_dir, lambda *a, r=replay: r)  # type: ignore[misc]
        engine.library = library
        info = await engine.load()
        assert info.max_batch == rec["max_batch"]
        r = GenerateRequest(rid, "tiny-gpu", job["max_tokens"], prompt="x", temperature=0.0, ignore_eos=True)
        with trio.fail_after(10):
            chunks = [c async for c in engine.generate_stream(r)]
        final = chunks[-1]
        assert isinstance(final, FinalChunk)
        assert final.finish_reason == FINISH[name]
        assert engine.stats().completion_tokens == final.completion_tokens
        await engine.close()


async def test_recorded_logits_agree_with_our_cpu_engine(logits: dict[str, Any], model_dir: Path) -> None:
    rec = logits
    assert rec["model"] == MODEL_SPEC, "the recording is of another model spec"
    if "transformers" not in rec:
        pytest.skip("the recording has no transformers reference")
    ref = torch.tensor(rec["transformers"]["logits"])
    engine = TorchEngine(model_dir, model_id="tiny-gpu", weights="fp16", slots=1, context=512, threads=1)
    await engine.load()
    assert engine._loaded is not None
    prompt = engine._loaded.tokenizer.encode_chat([("user", QUESTION)])
    assert prompt == rec["prompt"]  # the tokenizer and the model are rebuilt identically
    assert engine._model is not None
    ours = engine._model.prefill(0, torch.tensor(prompt), 0)
    assert float((ours - ref).abs().max()) <= 0.02 * float(ref.abs().max())
    r = GenerateRequest(
        "g", "tiny-gpu", 4, messages=(ChatMessage("user", QUESTION),), temperature=0.0, ignore_eos=True
    )
    with trio.fail_after(30):
        ids = [t async for c in engine.generate_stream(r) for t in c.token_ids]
    assert ids[0] == rec["transformers"]["ids"][0]
    await engine.close()
