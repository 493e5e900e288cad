"""Every GPU engine against transformers in the same dtype: first-step logits and 16 greedy ids (CUDA only).

Skipped cleanly without CUDA (and per engine without its library, and
without transformers).  Two random-weight models written here: the tiny
GPU shape (head_dim 64, 2 layers) and a realistic one (Llama-3.2-1B's
hidden 2048, 16 layers, 32 heads, 8 KV heads; its vocabulary stays small,
see below).  Engines: ``cuda`` (our torch engine, fp16, with and without
CUDA graphs), ``exllamav2``, ``exllamav3``.

Comparison in fp16: the engine's first-step logits within 2 % of the
largest reference logit; the greedy ids equal, except that after a *near
tie* of the reference (top-2 margin within that tolerance) the paths may
part and the rest is not compared.  When an engine fails, the message says
which known fault its ids match (the prompt run without a causal mask, as
exllamav2 0.3.2's SDPA path does; rope_theta read as 10000), computed with
``tests/reference_llama.py`` on the GPU.

The vocabulary is the BPE's own (~400): padded vocabularies (bench/gpu.py)
hold ids the tokenizers do not cover, which exllamav2 masks and
transformers does not, so greedy ids would part for that reason alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from inference.cpu import TorchEngine
from inference.dense import DenseLlama
from inference.messages import ChatMessage, FinalChunk, GenerateRequest
from inference.tiny import write_tiny_model
from tests import reference_llama as reference

pytestmark = pytest.mark.gpu

N = 16
RTOL = 0.02
QUESTION = "What is the capital of France?"
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "intermediate_size": 512,
        "num_layers": 2, "max_position": 512, "rope_theta": 100000.0,
    },
    "1b-shape": {
        "hidden_size": 2048, "num_heads": 32, "num_kv_heads": 8, "head_dim": 64, "intermediate_size": 8192,
        "num_layers": 16, "max_position": 2048, "rope_theta": 500000.0,
    },
}  # fmt: skip


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.fixture(scope="module", params=sorted(SHAPES))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_cuda()
    name = str(request.param)
    return write_tiny_model(tmp_path_factory.mktemp("gpu") / name, dtype=torch.float16, **SHAPES[name])


def _prompt(model_dir: Path) -> list[int]:
    from inference.tokenizer import tokenizer_from_hf_dir

    return tokenizer_from_hf_dir(model_dir).encode_chat([("user", QUESTION)])


@pytest.fixture(scope="module")
def truth(model_dir: Path) -> dict[str, Any]:
    """transformers in fp16 on the GPU: logits of every greedy step (no cache: each step a full forward)."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float16).cuda().eval()
    ids = _prompt(model_dir)
    seq, steps = list(ids), []
    with torch.no_grad():
        for _ in range(N):
            logits = hf(torch.tensor([seq], device="cuda")).logits[0, -1].float().cpu()
            steps.append(logits)
            seq.append(int(logits.argmax()))
    del hf
    torch.cuda.empty_cache()
    return {"prompt": ids, "steps": steps, "ids": seq[len(ids) :]}


def _compare(name: str, truth: dict[str, Any], first: torch.Tensor, ids: list[int]) -> list[str]:
    """Problems of an engine's (first logits, greedy ids) against the reference; [] when it agrees."""
    ref = truth["steps"][0]
    scale = float(ref.abs().max())
    diff = float((first.float().cpu() - ref).abs().max())
    problems = []
    if diff > RTOL * scale:
        problems.append(f"{name}: first-step logits differ by {diff:.4f} (largest logit {scale:.3f})")
    for k, (a, b) in enumerate(zip(ids, truth["ids"], strict=False)):
        if a == b:
            continue
        step = truth["steps"][k]
        margin = float(step[b] - step[a])
        if margin > 2 * RTOL * float(step.abs().max()):
            problems.append(f"{name}: greedy id {k} is {a}, transformers {b} (margin {margin:.3f}, no tie)")
        break  # after a (near) tie the paths part; the rest is not comparable
    if len(ids) != N:
        problems.append(f"{name}: {len(ids)} ids, expected {N}")
    return problems


def _diagnose(model_dir: Path, truth: dict[str, Any], ids: list[int]) -> str:
    """Which known fault an engine's ids match (run on the GPU in fp16 with the plain-torch reference)."""
    prompt = truth["prompt"]
    found = []
    for what, kw in (
        ("the prompt without a causal mask (exllamav2's SDPA path)", {"causal_prompt": False}),
        ("rope_theta read as 10000", {"rope_theta": 10000.0}),
    ):
        _, alt = reference.greedy(model_dir, prompt, N, device="cuda", dtype=torch.float16, **kw)
        if alt[:4] == ids[:4]:
            found.append(what)
    return "; matches " + " and ".join(found) if found else "; matches no known fault"


async def _engine_ids(engine: Any, n: int = N) -> list[int]:
    r = GenerateRequest(
        "g", "m", n, messages=(ChatMessage("user", QUESTION),), temperature=0.0, ignore_eos=True
    )
    with trio.fail_after(600):
        chunks = [c async for c in engine.generate_stream(r)]
    assert isinstance(chunks[-1], FinalChunk)
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].completion_tokens == n
    return [t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize("graphs", [True, False])
async def test_cuda_engine_matches_transformers(model_dir: Path, truth: dict[str, Any], graphs: bool) -> None:
    engine = TorchEngine(
        model_dir, model_id="m", device="cuda", weights="fp16", slots=4, context=512, cuda_graphs=graphs
    )
    info = await engine.load()
    assert (info.engine, info.device[:4], info.max_batch) == ("cuda", "cuda", 4)
    assert info.gpu_name
    assert info.gpu_memory_total > 0
    model = engine._model
    assert isinstance(model, DenseLlama)
    first = model.prefill(3, torch.tensor(truth["prompt"]), 0)  # slot 3: the engine's own runs use slot 0
    ids = await _engine_ids(engine)
    if graphs:
        assert model.graph_replays > 0, "decode steps did not replay CUDA graphs"
    problems = _compare(f"cuda (graphs {graphs})", truth, first, ids)
    assert not problems, "; ".join(problems) + _diagnose(model_dir, truth, ids)
    await engine.close()


def _drive(backend: Any, prompt: list[int]) -> tuple[torch.Tensor, list[int], list[dict[str, Any]]]:
    """Run one greedy job on a library's real generator: (first logits, ids, result dicts)."""
    job = backend.greedy_job(prompt, N, "probe")
    backend.enqueue(job)
    ids: list[int] = []
    first: torch.Tensor | None = None
    results = []
    while backend.num_remaining_jobs():
        for r in backend.iterate():
            results.append(r)
            if r.get("identifier") != "probe" or r.get("stage") != "streaming":
                continue
            if first is None and r.get("logits") is not None:
                first = r["logits"][0, 0].float().cpu()
            for part in (r, r.get("held") or {}):
                if part.get("token_ids") is not None:
                    ids.extend(int(t) for t in part["token_ids"].flatten().tolist())
    assert first is not None, "the generator returned no logits"
    return first, ids, results


@pytest.mark.parametrize("library", ["exllamav2", "exllamav3"])
async def test_library_engines_match_transformers(
    model_dir: Path, truth: dict[str, Any], library: str
) -> None:
    if library == "exllamav2":
        from inference.exl2 import ExLlamaV2Engine as Engine
        from inference.exl2 import exllamav2_available as available
    else:
        from inference.exl3 import ExLlamaV3Engine as Engine  # type: ignore[assignment]
        from inference.exl3 import exllamav3_available as available
    ok, why = available()
    if not ok:
        pytest.skip(f"{library}: {why}")
    engine = Engine(model_dir, model_id="m", max_seq_len=512, max_batch_size=4)
    with trio.fail_after(1800):  # the first import JIT-builds the extension
        info = await engine.load()
    assert info.engine == library
    if library == "exllamav2" and importlib.util.find_spec("flash_attn") is None:
        assert info.max_batch == 1  # unpaged mode: honest capacity
    backend = engine._backend
    first, ids, _ = _drive(backend, truth["prompt"])
    problems = _compare(library, truth, first, ids)
    assert not problems, "; ".join(problems) + _diagnose(model_dir, truth, ids)
    assert await _engine_ids(engine) == ids  # the shell maps the same ids
    await engine.close()
