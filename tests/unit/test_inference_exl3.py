# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""The ExLlamaV3 and ExLlamaV2 engines without a GPU, against FAKES of the libraries.

- ``FakeV3Generator`` is a fake: it replays result dicts shaped as
  exllamav3 1.6.5's ``Generator.iterate()`` returns them (read from its
  ``generator/job.py``: ``emit()``): stages started / prefill / streaming,
  ``token_ids`` 1 x n tensors, the stop token under ``held``, ``new_tokens``
  counting it, ``eos_triggering_token_id``, a ``requeue`` flag mid-stream,
  ``loop_detected``.
- ``fake_exllamav3`` / ``fake_exllamav2`` are fake *modules* put in
  ``sys.modules`` for one test: they record how :func:`open_exllamav3` /
  :func:`open_exllamav2` drive the real libraries' classes (cache size,
  paged mode, batch, sampler, the SDPA switch).  The real libraries run only
  in ``tests/gpu``.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

import inference.exl2 as exl2
import inference.exl3 as exl3
from inference.device import GIB, DeviceInfo
from inference.engine import ContextLengthExceeded, DeviceLost, DeviceMemoryError, GenerationFailed
from inference.exl3 import ExLlamaV3Engine
from inference.jobs import ResultMapper, check_model_dir, generator_cache_fits
from inference.messages import ChatMessage, Chunk, FinalChunk, GenerateRequest
from overlay.errors import ModelLoadError
from tests.inference_fixtures import tiny_model_dir  # noqa: F401

GPU = DeviceInfo("cuda:0", "Fake H200", 140 * GIB, 130 * GIB)


def streaming(ident: str, ids: list[int] | None, text: str | None, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "job": object(),
        "stage": "streaming",
        "eos": False,
        "serial": 3,
        "identifier": ident,
    }
    if ids:
        r["token_ids"] = torch.tensor([ids], dtype=torch.long)
    if text:
        r["text"] = text
    r.update(extra)
    return r


def v3_script(ident: str, reason: str) -> list[dict[str, Any]]:
    """Result dicts for one job as exllamav3 1.6.5 emits them."""
    start = [
        {"job": object(), "stage": "started", "eos": False, "serial": 3, "identifier": ident},
        {"job": object(), "stage": "prefill", "eos": False, "serial": 3, "identifier": ident,
         "curr_progress": 7, "max_progress": 7},
    ]  # fmt: skip
    body = [
        streaming(ident, [10], "Hel"),
        streaming(ident, [11], None),  # a partial UTF-8 character: the token goes out, the text waits
        streaming(ident, [12], "lo é", requeue=True),  # a long job continues as a new physical job
    ]
    end_fields: dict[str, Any] = {
        "eos": True, "eos_reason": reason, "full_completion": "", "prompt_tokens": 7,
        "time_enqueued": 0.01, "time_prefill": 0.05, "time_generate": 0.5,
        "cached_pages": 0, "cached_tokens": 0,
    }  # fmt: skip
    if reason == "stop_token":
        end = [streaming(ident, None, None, **end_fields, new_tokens=5, eos_triggering_token_id=2,
                         eos_triggering_token_str="<|im_end|>",
                         held={"text": " <", "token_ids": torch.tensor([[13, 2]])})]  # fmt: skip
    elif reason == "loop_detected":
        end = [streaming(ident, [13], " x", **end_fields, new_tokens=4)]
    else:
        end = [streaming(ident, [13, 14], " world", **end_fields, new_tokens=5)]
    return start + body + end


@pytest.mark.parametrize(
    ("reason", "finish", "n", "text"),
    [
        ("stop_token", "stop_token", 5, "Hello é <"),
        ("max_new_tokens", "length", 5, "Hello é world"),
        ("loop_detected", "stop_string", 4, "Hello é x"),
    ],
)
def test_v3_result_dicts_map_with_new_tokens_billed(reason: str, finish: str, n: int, text: str) -> None:
    mapper = ResultMapper("j", prompt_tokens=7, library="exllamav3")
    chunks = [c for r in v3_script("j", reason) if (c := mapper.feed(r)) is not None]
    last = chunks[-1]
    assert isinstance(last, FinalChunk)
    assert sum(len(c.token_ids) for c in chunks) == last.completion_tokens == n
    assert last.finish_reason == finish
    assert "".join(c.text for c in chunks) == text
    assert last.ttft_s == pytest.approx(0.06)


class FakeV3Generator:
    """A FAKE exllamav3 generator (see the module docstring), with faults to inject."""

    max_seq_len = 512
    max_batch = 8
    device = "cpu"

    def __init__(self, reasons: dict[str, str] | None = None) -> None:
        self.reasons = reasons or {}
        self.active: dict[str, Iterator[dict[str, Any]]] = {}
        self.cancelled: list[str] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.fail_next: Exception | None = None

    def make_job(self, req: GenerateRequest, input_ids: list[int], stop: list[int | str], seed: int) -> str:
        self.jobs[req.request_id] = {"ids": input_ids, "stop": stop, "seed": seed}
        return req.request_id

    def enqueue(self, job: str) -> None:
        self.active[job] = iter(v3_script(job, self.reasons.get(job, "max_new_tokens")))

    def cancel(self, job: str) -> None:
        self.cancelled.append(job)
        self.active.pop(job, None)

    def num_remaining_jobs(self) -> int:
        return len(self.active)

    def iterate(self) -> list[dict[str, Any]]:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        out = []
        for job, it in list(self.active.items()):
            r = next(it, None)
            if r is None or r.get("eos"):
                del self.active[job]
            if r is not None:
                out.append(r)
        return out


def req(rid: str, **kw: Any) -> GenerateRequest:
    base: dict[str, Any] = {"model": "gpu", "max_tokens": 20, "messages": (ChatMessage("user", "hi"),)}
    base.update(kw)
    return GenerateRequest(request_id=rid, **base)


async def run(engine: Any, r: GenerateRequest) -> list[Chunk]:
    with trio.fail_after(10):
        return [c async for c in engine.generate_stream(r)]


async def test_v3_engine_reports_the_generators_batch_and_routes_jobs(tiny_model_dir: Path) -> None:
    fake = FakeV3Generator({"a": "stop_token"})
    engine = ExLlamaV3Engine(tiny_model_dir, model_id="gpu", backend_factory=lambda *a: fake, seed=1)
    info = await engine.load()
    assert (info.engine, info.format, info.max_batch, info.context_length) == ("exllamav3", "exl3", 8, 512)
    assert info.device == "cpu"
    out: dict[str, list[Chunk]] = {}

    async def one(rid: str) -> None:
        out[rid] = await run(engine, req(rid))

    async with trio.open_nursery() as n:
        n.start_soon(one, "a")
        n.start_soon(one, "b")
    assert [c.finish_reason for c in (out["a"][-1], out["b"][-1]) if isinstance(c, FinalChunk)] == [
        "stop_token",
        "length",
    ]
    assert 2 in fake.jobs["a"]["stop"]
    with pytest.raises(ContextLengthExceeded):
        await run(engine, req("long", max_tokens=500, messages=(ChatMessage("user", "a b c d " * 10),)))
    await engine.close()


async def test_v3_engine_failures_and_a_lost_device(tiny_model_dir: Path) -> None:
    fake = FakeV3Generator()
    lost: list[str | None] = [None]
    engine = ExLlamaV3Engine(tiny_model_dir, backend_factory=lambda *a: fake, probe=lambda d: lost[0])
    await engine.load()
    fake.fail_next = RuntimeError("CUDA error: misaligned address")  # the device still works afterwards
    with pytest.raises(GenerationFailed, match="misaligned"):
        await run(engine, req("x"))
    assert isinstance((await run(engine, req("y")))[-1], FinalChunk)
    assert "x" in fake.cancelled  # the failed job's pages were freed
    lost[0] = "CUDA error: the GPU fell off the bus"
    fake.fail_next = RuntimeError("CUDA error: unspecified launch failure")
    with pytest.raises(DeviceLost):
        await run(engine, req("z"))
    with trio.fail_after(5):
        assert await engine.wait_device_lost() == "CUDA error: the GPU fell off the bus"
    with pytest.raises(DeviceLost):
        engine.count_prompt_tokens(req("w"))
    await engine.close()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


async def test_directories_the_libraries_cannot_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a file"):
        check_model_dir(tmp_path / "x.gguf", "exllamav3")
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        await ExLlamaV3Engine(d, backend_factory=lambda *a: FakeV3Generator()).load()
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=str(d)):
        await exl2.ExLlamaV2Engine(d, backend_factory=lambda *a: FakeV3Generator()).load()


def test_generator_cache_fits_counts_files_and_the_kv_cache(tiny_model_dir: Path) -> None:
    weights = (tiny_model_dir / "model.safetensors").stat().st_size
    per_token = 2 * 2 * 2 * 16 * 2  # k+v, 2 layers, 2 KV heads, head_dim 16, fp16
    kv = generator_cache_fits(
        tiny_model_dir, what="t", device="cuda:0", free_bytes=4 * GIB, context=512, batch=8
    )
    assert kv == per_token * 512 * 8
    with pytest.raises(DeviceMemoryError, match=r"worker\.max_context to \d+"):
        generator_cache_fits(
            tiny_model_dir,
            what="t",
            device="cuda:0",
            free_bytes=GIB + weights + 600_000,
            context=4096,
            batch=8,
        )
    q4 = generator_cache_fits(
        tiny_model_dir, what="t", device="cuda:0", free_bytes=4 * GIB, context=512, batch=8, cache="q4"
    )
    assert q4 < kv / 3


# --------------------------------------------------------------------------- fake library modules


class Recorder:
    def __init__(self) -> None:
        self.calls: dict[str, dict[str, Any]] = {}


def fake_exllamav3(rec: Recorder, fail: Exception | None = None) -> types.ModuleType:
    m = types.ModuleType("exllamav3")

    class Config:
        @staticmethod
        def from_directory(d: str) -> Any:
            if fail is not None:
                raise fail
            rec.calls["config"] = {"dir": d}
            return Config()

    class Model:
        @staticmethod
        def from_config(cfg: Any) -> Any:
            return Model()

        def load(self, **kw: Any) -> None:
            rec.calls["load"] = kw

    class Cache:
        def __init__(self, model: Any, **kw: Any) -> None:
            rec.calls["cache"] = kw

    class Tokenizer:
        @staticmethod
        def from_config(cfg: Any) -> Any:
            return Tokenizer()

    class Generator:
        def __init__(self, **kw: Any) -> None:
            rec.calls["generator"] = kw
            self.max_batch_size = kw["max_batch_size"]

    class Job:
        def __init__(self, **kw: Any) -> None:
            rec.calls["job"] = kw

    class ArgmaxSampler:
        pass

    class ComboSampler:
        def __init__(self, **kw: Any) -> None:
            rec.calls["sampler"] = kw

    for cls in (Config, Model, Cache, Tokenizer, Generator, Job, ArgmaxSampler, ComboSampler):
        setattr(m, cls.__name__, cls)
    m.CacheLayer_fp16 = type("CacheLayer_fp16", (), {})  # type: ignore[attr-defined]
    m.CacheLayer_quant = type("CacheLayer_quant", (), {})  # type: ignore[attr-defined]
    return m


@pytest.fixture
def on_a_fake_gpu(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for mod in (exl2, exl3):
        monkeypatch.setattr(mod, "describe_device", lambda device: GPU)
    monkeypatch.setattr(exl3, "exllamav3_available", lambda: (True, "ok"))
    monkeypatch.setattr(exl2, "exllamav2_available", lambda: (True, "ok"))
    return monkeypatch


def test_open_exllamav3_sizes_the_cache_for_the_batch(
    tiny_model_dir: Path, on_a_fake_gpu: pytest.MonkeyPatch
) -> None:
    rec = Recorder()
    on_a_fake_gpu.setitem(sys.modules, "exllamav3", fake_exllamav3(rec))
    backend = exl3.open_exllamav3(tiny_model_dir, 512, 8, "q4")
    assert rec.calls["cache"]["max_num_tokens"] == 512 * 8  # 8 full contexts fit: batch 8 is real
    assert rec.calls["cache"]["k_bits"] == 4
    assert rec.calls["load"] == {"device": "cuda:0"}
    assert rec.calls["generator"]["max_batch_size"] == 8
    assert backend.max_batch == 8
    greedy = req("g", temperature=0.0)
    backend.make_job(greedy, [1, 2, 3], [2, "STOP"], 7)
    job = rec.calls["job"]
    assert job["input_ids"].tolist() == [[1, 2, 3]]
    assert (job["identifier"], job["seed"], job["stop_conditions"], job["max_new_tokens"]) == (
        "g",
        7,
        [2, "STOP"],
        20,
    )
    assert "sampler" not in rec.calls  # greedy: ArgmaxSampler
    backend.make_job(req("s", temperature=0.7, top_k=40, top_p=0.9), [1], [], 1)
    assert rec.calls["sampler"] == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "rep_p": 1.0}


def test_open_exllamav3_errors_name_the_directory(
    tiny_model_dir: Path, on_a_fake_gpu: pytest.MonkeyPatch
) -> None:
    on_a_fake_gpu.setitem(
        sys.modules, "exllamav3", fake_exllamav3(Recorder(), AssertionError("Unknown architecture"))
    )
    with pytest.raises(
        ModelLoadError, match=r"exllamav3 could not load the model: Unknown architecture.*--engine cuda"
    ):
        exl3.open_exllamav3(tiny_model_dir, 512, 8, "fp16")
    on_a_fake_gpu.setitem(
        sys.modules, "exllamav3", fake_exllamav3(Recorder(), RuntimeError("CUDA out of memory"))
    )
    with pytest.raises(DeviceMemoryError, match="8 x 512 tokens"):
        exl3.open_exllamav3(tiny_model_dir, 512, 8, "fp16")
    with pytest.raises(ModelLoadError, match="cache kind"):
        exl3.open_exllamav3(tiny_model_dir, 512, 8, "q3")
    on_a_fake_gpu.setattr(
        exl3, "describe_device", lambda d: DeviceInfo("cuda:0", "Small", 8 * GIB, 3 * GIB // 2)
    )
    with pytest.raises(DeviceMemoryError, match=r"max_context to 32\d{3}"):  # ~0.5 GiB over the reserve
        exl3.open_exllamav3(tiny_model_dir, 65536, 64, "fp16")


def fake_exllamav2(rec: Recorder) -> tuple[types.ModuleType, types.ModuleType]:
    m = types.ModuleType("exllamav2")
    g = types.ModuleType("exllamav2.generator")

    class ExLlamaV2Config:
        def __init__(self, d: str) -> None:
            self.rotary_embedding_base = 10000.0  # as if it had missed rope_parameters
            self.no_sdpa = False
            rec.calls["config"] = {"obj": self}

        def arch_compat_overrides(self) -> None:
            pass

    class ExLlamaV2:
        def __init__(self, cfg: Any) -> None:
            pass

        def load_autosplit(self, cache: Any) -> None:
            pass

    def cache(kind: str) -> type:
        class C:
            def __init__(self, model: Any, **kw: Any) -> None:
                rec.calls["cache"] = {"kind": kind, **kw}

        return C

    class ExLlamaV2Tokenizer:
        def __init__(self, cfg: Any) -> None:
            pass

    class ExLlamaV2DynamicGenerator:
        def __init__(self, **kw: Any) -> None:
            rec.calls["generator"] = kw

        def warmup(self) -> None:
            pass

    class Settings:
        @staticmethod
        def greedy() -> Any:
            return Settings()

    m.ExLlamaV2Config = ExLlamaV2Config  # type: ignore[attr-defined]
    m.ExLlamaV2 = ExLlamaV2  # type: ignore[attr-defined]
    m.ExLlamaV2Cache = cache("fp16")  # type: ignore[attr-defined]
    m.ExLlamaV2Cache_Q4 = cache("q4")  # type: ignore[attr-defined]
    m.ExLlamaV2Cache_Q6 = cache("q6")  # type: ignore[attr-defined]
    m.ExLlamaV2Tokenizer = ExLlamaV2Tokenizer  # type: ignore[attr-defined]
    g.ExLlamaV2DynamicGenerator = ExLlamaV2DynamicGenerator  # type: ignore[attr-defined]
    g.ExLlamaV2DynamicJob = object  # type: ignore[attr-defined]
    g.ExLlamaV2Sampler = types.SimpleNamespace(Settings=Settings)  # type: ignore[attr-defined]
    return m, g


@pytest.mark.parametrize("flash", [False, True])
def test_open_exllamav2_batch_is_honest(
    tiny_model_dir: Path, tmp_path: Path, on_a_fake_gpu: pytest.MonkeyPatch, flash: bool
) -> None:
    d = _copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    (d / "config.json").write_text(json.dumps(cfg))
    rec = Recorder()
    m, g = fake_exllamav2(rec)
    on_a_fake_gpu.setitem(sys.modules, "exllamav2", m)
    on_a_fake_gpu.setitem(sys.modules, "exllamav2.generator", g)
    on_a_fake_gpu.setattr(exl2, "flash_attn_available", lambda: flash)
    backend = exl2.open_exllamav2(d, 512, 8, "fp16")
    gen = rec.calls["generator"]
    config = rec.calls["config"]["obj"]
    assert config.rotary_embedding_base == 10000.0  # the value from config.json, fixed top-level first
    if flash:
        assert (gen["paged"], gen["max_batch_size"], backend.max_batch) == (True, 8, 8)
        assert rec.calls["cache"]["max_seq_len"] == 512 * 8
        assert config.no_sdpa is False
    else:  # unpaged: one job at a time, and prompt attention off its mask-dropping SDPA path
        assert (gen["paged"], gen["max_batch_size"], backend.max_batch) == (False, 1, 1)
        assert rec.calls["cache"]["max_seq_len"] == 512
        assert config.no_sdpa is True


def test_the_gpu_libraries_are_never_imported_by_the_package() -> None:
    import inference.select  # noqa: F401

    assert "exllamav2" not in sys.modules
    assert "exllamav3" not in sys.modules
