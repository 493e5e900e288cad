"""Record what the GPU engines really return, as small fixtures the CPU-only suite tests against (CUDA only).

Run on a GPU machine (``bench/gpu_run.sh`` does, after ``tests/gpu``)::

    python3 bench/gpu_record.py --out tests/fixtures/gpu

It writes, for the tiny GPU model (``MODEL_SPEC``, rebuilt bit for bit by
``inference.tiny.write_tiny_model`` anywhere):

- ``<library>_results.json`` for exllamav2 / exllamav3 (each that imports):
  the result dicts of the *real* generator (``job`` dropped, tensors as
  lists) for scripted requests built by the engine's own ``make_job``:
  greedy to ``max_new_tokens``, a stop token, a stop string, and two jobs at
  once; ``tests/unit/test_inference_recorded.py`` replays them through
  :class:`~inference.jobs.ResultMapper` and the engine shell;
- ``logits.json``: the prompt ids, first-step logits (the whole vocabulary of
  the tiny model) and 16 greedy ids of transformers in fp16 and of every
  engine that runs here, and whether each agrees with transformers;
- ``meta.json``: the GPU, torch and library versions, the date.

Without CUDA it says so and exits 2 without writing anything: recordings
are never made up.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's packages

import torch

from inference.messages import GenerateRequest

MODEL_SPEC: dict[str, Any] = {
    "seed": 0, "hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64,
    "intermediate_size": 512, "num_layers": 2, "max_position": 512, "rope_theta": 100000.0,
    "dtype": "float16",
}  # fmt: skip
QUESTION = "What is the capital of France?"
N = 16


def jsonable(value: Any) -> Any:
    """Result dicts -> JSON: tensors to (nested) lists, the job object dropped."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if k != "job"}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


def write_model(root: Path) -> Path:
    from inference.tiny import write_tiny_model

    spec = dict(MODEL_SPEC)
    dtype = getattr(torch, spec.pop("dtype"))
    return write_tiny_model(root / "tiny-gpu", dtype=dtype, **spec)


Job = tuple[GenerateRequest, list[int], list[int | str]]


def run_jobs(backend: Any, jobs: list[Job]) -> dict[str, Any]:
    """Enqueue ``jobs`` built with the backend's own ``make_job``; the result dicts of every iterate()."""
    for req, ids, stop in jobs:
        backend.enqueue(backend.make_job(req, ids, stop, 1234))
    steps: list[list[dict[str, Any]]] = []
    while backend.num_remaining_jobs():
        steps.append([jsonable(r) for r in backend.iterate()])
    return {
        "jobs": {
            req.request_id: {"prompt": ids, "max_tokens": req.max_tokens, "stop": stop}
            for req, ids, stop in jobs
        },
        "iterations": steps,
    }


def record_library(library: str, model_dir: Path, prompt: list[int], eos: list[int]) -> dict[str, Any] | None:
    if library == "exllamav2":
        from inference.exl2 import exllamav2_available as available
        from inference.exl2 import open_exllamav2 as open_backend
    else:
        from inference.exl3 import exllamav3_available as available
        from inference.exl3 import open_exllamav3 as open_backend
    ok, why = available()
    if not ok:
        print(f"{library}: skipped ({why})")
        return None
    backend: Any = open_backend(model_dir, 512, 4, "fp16")

    def req(rid: str, n: int = 12, **kw: Any) -> GenerateRequest:
        return GenerateRequest(rid, "tiny-gpu", n, prompt="x", temperature=0.0, **kw)

    free = run_jobs(backend, [(req("greedy", ignore_eos=True), prompt, [])])
    streamed = [r for step in free["iterations"] for r in step if r.get("stage") == "streaming"]
    ids = [t for r in streamed for t in _flat(r.get("token_ids"))]
    text = "".join(str(r.get("text", "")) for r in streamed)
    scripts: dict[str, dict[str, Any]] = {"greedy": free}
    if len(ids) > 4:
        scripts["stop_token"] = run_jobs(backend, [(req("stop_token"), prompt, [ids[3], *eos])])
    if len(text) > 6:
        scripts["stop_string"] = run_jobs(
            backend, [(req("stop_string"), prompt, [text[len(text) // 2 :][:3]])]
        )
    scripts["two_at_once"] = run_jobs(
        backend,
        [(req("a", 8, ignore_eos=True), prompt, []), (req("b", 10, ignore_eos=True), prompt[:-3], [])],
    )
    return {
        "library": library,
        "version": importlib.metadata.version(library),
        "max_batch": backend.max_batch,
        "scripts": scripts,
    }


def _flat(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list):
        return [t for v in value for t in _flat(v)]
    return [int(value)]


def record_logits(model_dir: Path, prompt: list[int], device: str = "cuda") -> dict[str, Any]:
    import trio

    from inference.cpu import TorchEngine
    from inference.messages import ChatMessage

    out: dict[str, Any] = {"model": MODEL_SPEC, "question": QUESTION, "prompt": prompt, "engines": {}}
    try:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float16).to(device)
        seq = list(prompt)
        with torch.no_grad():
            first = hf(torch.tensor([seq], device=device)).logits[0, -1].float().cpu()
            for _ in range(N):
                seq.append(int(hf(torch.tensor([seq], device=device)).logits[0, -1].argmax()))
        out["transformers"] = {
            "version": transformers.__version__,
            "logits": first.tolist(),
            "ids": seq[len(prompt) :],
        }
        del hf
    except ImportError:
        print("transformers is not installed: no reference logits")

    async def cuda_engine() -> dict[str, Any]:
        e = TorchEngine(model_dir, model_id="tiny-gpu", device=device, weights="fp16", slots=4, context=512)
        await e.load()
        assert e._model is not None
        first = e._model.prefill(3, torch.tensor(prompt), 0).cpu()
        r = GenerateRequest(
            "g", "tiny-gpu", N, messages=(ChatMessage("user", QUESTION),), temperature=0.0, ignore_eos=True
        )
        ids = [t async for c in e.generate_stream(r) for t in c.token_ids]
        await e.close()
        return {"logits": first.tolist(), "ids": ids}

    out["engines"]["cuda"] = trio.run(cuda_engine)
    for library in ("exllamav2", "exllamav3") if device == "cuda" else ():
        rec = _library_logits(library, model_dir, prompt)
        if rec is not None:
            out["engines"][library] = rec
    ref = out.get("transformers")
    for name, rec in out["engines"].items():
        if ref is not None:
            diff = max(abs(a - b) for a, b in zip(rec["logits"], ref["logits"], strict=True))
            rec["max_abs_diff_vs_transformers"] = diff
            rec["ids_equal_transformers"] = rec["ids"] == ref["ids"]
            print(f"{name}: first-step logits max |diff| {diff:.4f}; ids equal: {rec['ids'] == ref['ids']}")
    return out


def _library_logits(library: str, model_dir: Path, prompt: list[int]) -> dict[str, Any] | None:
    if library == "exllamav2":
        from inference.exl2 import exllamav2_available as available
        from inference.exl2 import open_exllamav2 as open_backend
    else:
        from inference.exl3 import exllamav3_available as available
        from inference.exl3 import open_exllamav3 as open_backend
    if not available()[0]:
        return None
    backend: Any = open_backend(model_dir, 512, 4, "fp16")
    backend.enqueue(backend.greedy_job(prompt, N, "probe"))
    first: list[float] | None = None
    ids: list[int] = []
    while backend.num_remaining_jobs():
        for r in backend.iterate():
            if r.get("stage") != "streaming":
                continue
            if first is None and r.get("logits") is not None:
                first = r["logits"][0, 0].float().cpu().tolist()
            for part in (r, r.get("held") or {}):
                ids.extend(_flat(jsonable(part.get("token_ids"))))
    return {"logits": first, "ids": ids}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/gpu"), help="where the fixtures go")
    ap.add_argument(
        "--cpu-smoke",
        type=Path,
        metavar="DIR",
        help="check this script on a CPU: the cuda engine's path, logits only, into DIR (not a fixture)",
    )
    args = ap.parse_args()
    if args.cpu_smoke is not None:
        from inference.tokenizer import tokenizer_from_hf_dir

        args.cpu_smoke.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_model(Path(tmp))
            prompt = tokenizer_from_hf_dir(model_dir).encode_chat([("user", QUESTION)])
            rec = record_logits(model_dir, prompt, device="cpu")
        (args.cpu_smoke / "logits.json").write_text(json.dumps(rec))
        print(f"CPU smoke run written to {args.cpu_smoke} (not a GPU recording)")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False): nothing recorded", file=sys.stderr)
        return 2
    from inference.tokenizer import tokenizer_from_hf_dir

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp))
        tok = tokenizer_from_hf_dir(model_dir)
        prompt = tok.encode_chat([("user", QUESTION)])
        for library in ("exllamav2", "exllamav3"):
            lib = record_library(library, model_dir, prompt, list(tok.eos_token_ids))
            if lib is not None:
                (args.out / f"{library}_results.json").write_text(json.dumps(lib, indent=1))
                print(f"{library}: recorded {len(lib['scripts'])} scripts")
        (args.out / "logits.json").write_text(json.dumps(record_logits(model_dir, prompt)))
    versions = {}
    for name in ("torch", "transformers", "exllamav2", "exllamav3", "flash-attn"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    meta = {
        "gpu": torch.cuda.get_device_name(0),
        "memory_gib": round(torch.cuda.mem_get_info(0)[1] / 2**30, 1),
        "versions": versions,
        "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"recorded into {args.out}: {sorted(p.name for p in args.out.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
