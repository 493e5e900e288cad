"""GPU benchmark: bare library vs our engine vs the service over libp2p vs a devnet's OpenAI API.

On SmolLM2-135M and Llama-3.2-1B shapes (random fp16 weights written here in
seconds, real vocabulary sizes), for every GPU engine that loads here
(``cuda``: our torch engine, whose "bare library" is its model
:class:`~inference.dense.DenseLlama` driven in a plain loop; ``exllamav2`` /
``exllamav3``: the library's generator driven in a plain loop), at batch 1,
8 and 32: aggregate decode tok/s (counted while every request of the batch
is decoding) and mean time to first token.  Then the targets:

- our engine >= 0.97 x the bare library (batch 1);
- the service over libp2p >= 0.95 x the engine (batch 1);
- the engine's batch 8 aggregate >= 5 x its batch 1;
- Llama-3.2-1B fp16, batch-1 decode >= 400 tok/s (on an H100/H200-class GPU).

Run::

    python3 bench/gpu.py                       # everything (CUDA only)
    python3 bench/gpu.py --quick --no-devnet   # fewer tokens, no devnet
    python3 bench/gpu.py --device cpu          # smoke run of the cuda engine's path on the CPU, tiny shape
    python3 bench/gpu.py --json out.json       # the figures as JSON too (bench/gpu_run.sh records them)

Without CUDA (and without ``--device cpu``) it says so and exits 2.  The
devnet part starts ``cocoon-node devnet``'s processes (local chain,
bootstrap, one proxy, one worker on the engine and model under test, a
client) and streams through ``/v1/chat/completions``; it is skipped, with
the reason, where the local chain's ``pytvm`` does not import.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack, aclosing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's packages

import attrs
import torch
import trio

from inference.engine import Engine
from inference.messages import ChatMessage, GenerateRequest

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
        "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "head_dim": 64,
        "intermediate_size": 8192, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": True,
    },
}  # fmt: skip
CPU_SHAPE: dict[str, Any] = {
    "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
    "intermediate_size": 256, "vocab_size": 4096, "rope_theta": 10000.0, "tie_word_embeddings": True,
}  # fmt: skip
CONTEXT = 512  # tokens per request: prompt + completion (a multiple of 256 for the libraries)


@attrs.frozen
class Fig:
    shape: str
    engine: str
    path: str  # bare | engine | service | devnet
    batch: int
    tok_s: float  # aggregate decode tok/s
    ttft_ms: float  # mean time to first token


def _req(rid: str, i: int, n: int, model: str = "m") -> GenerateRequest:
    q = f"Question {i}: what is the capital of France?"  # distinct prompts: no prefix cache between rows
    return GenerateRequest(
        rid, model, n, messages=(ChatMessage("user", q),), temperature=0.0, ignore_eos=True
    )


class Stamps:
    """Arrival times of each row's tokens; the rate while every row decodes, the mean TTFT."""

    def __init__(self, batch: int) -> None:
        self.t0 = time.perf_counter()
        self.rows: list[list[tuple[float, int]]] = [[] for _ in range(batch)]

    def add(self, row: int, n: int) -> None:
        if n:
            self.rows[row].append((time.perf_counter(), n))

    def figures(self) -> tuple[float, float]:
        rows = [r for r in self.rows if r]
        if len(rows) < len(self.rows) or any(len(r) < 2 for r in rows):
            return float("nan"), float("nan")
        start = max(r[0][0] for r in rows)
        end = min(r[-1][0] for r in rows)
        tokens = sum(k for r in rows for t, k in r if start < t <= end)
        if end <= start:  # one chunk each after the start: fall back to whole-run figures
            start, end = min(r[0][0] for r in rows), max(r[-1][0] for r in rows)
            tokens = sum(k for r in rows for _, k in r[1:])
        ttft = statistics.mean(r[0][0] - self.t0 for r in rows)
        return tokens / max(end - start, 1e-9), ttft * 1000


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the four paths


def bare_dense(engine: Any, batch: int, n: int, device: str) -> tuple[float, float]:
    """Our model without our engine: prefill each row, then greedy decode steps over all rows."""
    from inference.dense import DenseLlama

    model = engine._model
    assert isinstance(model, DenseLlama)
    tok = engine._loaded.tokenizer
    prompts = [
        tok.encode_chat([("user", f"Question {i}: what is the capital of France?")]) for i in range(batch)
    ]
    st = Stamps(batch)
    nxt = []
    for i, p in enumerate(prompts):
        nxt.append(int(model.prefill(i, torch.tensor(p), 0).argmax()))
        st.add(i, 1)
    pos = [len(p) for p in prompts]
    slots = list(range(batch))
    for _ in range(n - 1):
        nxt = model.decode(slots, torch.tensor(nxt), pos).argmax(-1).tolist()
        pos = [x + 1 for x in pos]
        for i in slots:
            st.add(i, 1)
    _sync(device)
    return st.figures()


def bare_library(engine: Any, batch: int, n: int) -> tuple[float, float]:
    """The library's generator in a plain loop, jobs built as our engine builds them."""
    backend = engine._backend
    tok = engine._tok
    st = Stamps(batch)
    for i in range(batch):
        ids = tok.encode_chat([("user", f"Question {i}: what is the capital of France?")])
        backend.enqueue(backend.make_job(_req(f"bare{i}", i, n), ids, [], 1))
    while backend.num_remaining_jobs():
        for r in backend.iterate():
            ident = str(r.get("identifier", ""))
            if r.get("stage") != "streaming" or not ident.startswith("bare"):
                continue
            k = 0
            for part in (r, r.get("held") or {}):
                t = part.get("token_ids")
                k += int(t.numel()) if t is not None else 0
            st.add(int(ident[4:]), k)
    return st.figures()


async def through_engine(engine: Engine, batch: int, n: int) -> tuple[float, float]:
    st = Stamps(batch)

    async def one(i: int) -> None:
        async with aclosing(engine.generate_stream(_req(f"e{batch}-{i}-{time.monotonic_ns()}", i, n))) as it:
            async for c in it:
                st.add(i, len(c.token_ids))

    async with trio.open_nursery() as nursery:
        for i in range(batch):
            nursery.start_soon(one, i)
    return st.figures()


async def through_service(engine: Engine, batch: int, n: int) -> tuple[float, float]:
    """GenerationService on one libp2p host, clients on another, real TCP on loopback."""
    from inference.service import PROTOCOL_ID, GenerationService, generate
    from overlay.host import open_overlay
    from overlay.identity import Identity

    service = GenerationService({"m": engine})
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(open_overlay(Identity.generate()))
        client = await stack.enter_async_context(open_overlay(Identity.generate()))
        worker.set_stream_handler(PROTOCOL_ID, service.handle)
        await client.connect(worker.listen_addrs()[0])
        streams = [await client.open_stream(worker.peer_id, PROTOCOL_ID) for _ in range(batch)]
        st = Stamps(batch)

        async def one(i: int) -> None:
            async with aclosing(
                generate(streams[i], _req(f"s{batch}-{i}-{time.monotonic_ns()}", i, n))
            ) as it:
                async for c in it:
                    st.add(i, len(c.token_ids))

        async with trio.open_nursery() as nursery:
            for i in range(batch):
                nursery.start_soon(one, i)
        return st.figures()


def _api_stream(http: Any, model: str, i: int, n: int, st: Stamps) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Question {i}: what is the capital of France?"}],
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"])
            if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                st.add(i, 1)  # one event per chunk, which may hold several tokens: settled by the usage
            usage = (ev.get("usage") or {}).get("completion_tokens")
            row = st.rows[i]
            if usage and row:  # the tokens the events did not show go to the last one
                t, k = row[-1]
                row[-1] = (t, k + max(int(usage) - sum(x for _, x in row), 0))


async def through_devnet(
    model_dir: Path, engine_kind: str, batches: list[int], n: int
) -> dict[int, tuple[float, float]]:
    """A devnet whose one worker serves ``model_dir`` on ``engine_kind``; its OpenAI API, rows at once."""
    import httpx

    from node.devnet import Child, Devnet

    class GpuDevnet(Devnet):
        async def start(
            self,
            name: str,
            args: list[str],
            nursery: trio.Nursery,
            timeout: float = 180.0,
            *more: Any,  # whatever else Devnet.start takes, passed on
            **kw: Any,
        ) -> Child:
            if name != "chain":  # proxies and the client serve only the models they are told of
                args = [*args, "--set", f"client.models={model_dir.name}"]
            if name.startswith("worker-"):
                extra = ["--model", str(model_dir), "--engine", engine_kind]
                extra += [
                    "--set",
                    f"worker.max_batch={max(batches)}",
                    "--set",
                    f"worker.max_context={CONTEXT}",
                ]
                args = [*args, *extra]
                timeout = 1800.0  # a library's first import builds its extension
            return await super().start(name, args, nursery, timeout, *more, **kw)

    out: dict[int, tuple[float, float]] = {}
    root = Path(tempfile.mkdtemp(prefix="cocoon-bench-gpu-devnet-"))
    net = GpuDevnet(root, workers=1, proxies=1, api_port=18490)
    async with trio.open_nursery() as nursery:
        try:
            await net.up(nursery)
            with trio.fail_after(300):
                while await net.wait_offers(1, timeout=5) < 1:
                    pass
            clients = [httpx.Client(base_url=net.api, timeout=600) for _ in range(max(batches))]
            for i, cl in enumerate(clients):  # channels opened, connections kept, like an app
                await trio.to_thread.run_sync(_api_stream, cl, model_dir.name, i, 4, Stamps(max(batches)))
            for b in batches:
                st = Stamps(b)
                async with trio.open_nursery() as batch:
                    for i in range(b):
                        batch.start_soon(
                            trio.to_thread.run_sync, _api_stream, clients[i], model_dir.name, i, n, st
                        )
                out[b] = st.figures()
        finally:
            with trio.CancelScope(shield=True):
                await net.down()
            nursery.cancel_scope.cancel()
    return out


# --------------------------------------------------------------------------- engines under test


def make_engine(kind: str, model_dir: Path, max_batch: int, device: str) -> Engine:
    from inference.cpu import TorchEngine

    if kind == "cuda":
        return TorchEngine(
            model_dir, model_id="m", device=device, weights="fp16", slots=max_batch, context=CONTEXT
        )
    if kind == "exllamav2":
        from inference.exl2 import ExLlamaV2Engine

        return ExLlamaV2Engine(model_dir, model_id="m", max_seq_len=CONTEXT, max_batch_size=max_batch)
    from inference.exl3 import ExLlamaV3Engine

    return ExLlamaV3Engine(model_dir, model_id="m", max_seq_len=CONTEXT, max_batch_size=max_batch)


def available(kind: str) -> tuple[bool, str]:
    if kind == "cuda":
        return True, "ok"
    if kind == "exllamav2":
        from inference.exl2 import exllamav2_available

        return exllamav2_available()
    from inference.exl3 import exllamav3_available

    return exllamav3_available()


async def bench_shape(name: str, spec: dict[str, Any], args: argparse.Namespace, figs: list[Fig]) -> None:
    from inference.tiny import write_tiny_model

    root = Path(tempfile.mkdtemp(prefix=f"cocoon-bench-gpu-{name}-"))
    t0 = time.perf_counter()
    model_dir = write_tiny_model(
        root / name, dtype=torch.float16, max_position=CONTEXT, pad_vocab=True, **spec
    )
    print(f"\n{name}: random fp16 weights written in {time.perf_counter() - t0:.1f} s", flush=True)
    for kind in args.engines:
        ok, why = available(kind)
        if not ok:
            print(f"  {kind}: skipped ({why})")
            continue
        engine = make_engine(kind, model_dir, max(args.batches), args.device)
        try:
            info = await engine.load()
        except Exception as e:  # report and go on with the next engine
            print(f"  {kind}: did not load: {type(e).__name__}: {e}")
            continue
        print(
            f"  {kind}: loaded in {info.load_s:.1f} s, batch {info.max_batch}, {info.gpu_name or info.device}"
        )
        await through_engine(engine, 1, 8)  # warm-up (CUDA graphs captured, kernels built)

        def add(path: str, b: int, r: tuple[float, float], kind: str = kind) -> None:
            figs.append(Fig(name, kind, path, b, r[0], r[1]))
            print(f"    {path:<8} batch {b:>2}: {r[0]:8.1f} tok/s  TTFT {r[1]:7.1f} ms", flush=True)

        for b in args.batches:
            if b > info.max_batch:
                print(f"    batch {b}: over the engine's batch {info.max_batch}, queued (measured anyway)")
            runs = [
                (_bare(kind, engine, b, args), await through_engine(engine, b, args.tokens))
                for _ in range(args.rounds)
            ]
            add("bare", b, _med([r[0] for r in runs]))
            add("engine", b, _med([r[1] for r in runs]))
            if not args.no_service and b in (1, 8):
                add(
                    "service",
                    b,
                    _med([await through_service(engine, b, args.tokens) for _ in range(args.rounds)]),
                )
        await engine.close()
        if args.devnet and kind == args.devnet_engine:
            try:
                for b, r in (await through_devnet(model_dir, kind, [1, 8], args.tokens)).items():
                    add("devnet", b, r)
            except Exception as e:
                print(f"    devnet: failed: {type(e).__name__}: {e}")


def _bare(kind: str, engine: Engine, batch: int, args: argparse.Namespace) -> tuple[float, float]:
    if kind == "cuda":
        return bare_dense(engine, batch, args.tokens, args.device)
    return bare_library(engine, batch, args.tokens)


def _med(xs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)


def targets(figs: list[Fig]) -> list[tuple[str, float, str, bool]]:
    """(what, value, target, met) for every target the figures allow."""

    def get(shape: str, engine: str, path: str, batch: int) -> float | None:
        for f in figs:
            if (f.shape, f.engine, f.path, f.batch) == (shape, engine, path, batch):
                return f.tok_s
        return None

    out = []
    for shape, engine in sorted({(f.shape, f.engine) for f in figs}):
        e1, b1, s1, e8 = (
            get(shape, engine, p, b) for p, b in (("engine", 1), ("bare", 1), ("service", 1), ("engine", 8))
        )
        tag = f"{shape} {engine}"
        if e1 and b1:
            out.append((f"{tag}: engine / bare, batch 1", e1 / b1, ">= 0.97", e1 / b1 >= 0.97))
        if s1 and e1:
            out.append((f"{tag}: service / engine, batch 1", s1 / e1, ">= 0.95", s1 / e1 >= 0.95))
        if e8 and e1:
            out.append((f"{tag}: batch 8 / batch 1 aggregate", e8 / e1, ">= 5", e8 / e1 >= 5))
        if shape == "llama-3.2-1b" and e1:
            out.append((f"{tag}: batch-1 decode tok/s", e1, ">= 400 (H100/H200)", e1 >= 400))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run on a tiny shape)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--engines", default="cuda,exllamav3,exllamav2", help="comma-separated engines")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--quick", action="store_true", help="64 tokens, 1 round")
    ap.add_argument("--no-service", action="store_true", help="skip the service over libp2p")
    ap.add_argument("--no-devnet", dest="devnet", action="store_false", help="skip the devnet's API")
    ap.add_argument("--devnet-engine", default="cuda", help="the engine the devnet's worker runs")
    ap.add_argument("--json", type=Path, help="also write the figures and targets here")
    args = ap.parse_args()
    args.engines = args.engines.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.tokens, args.rounds = 64, 1
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    if args.device == "cpu":
        torch.set_num_threads(1)
        shapes = {"tiny-cpu": CPU_SHAPE}
        args.engines = ["cuda"]  # the cuda engine's code, on the CPU
        args.batches = [b for b in args.batches if b <= 8] or [1]
        args.tokens = min(args.tokens, 32)
        args.devnet = False
        print("CPU smoke run: the cuda engine's path (dense fp16) on a tiny shape; figures mean nothing")
    elif not torch.cuda.is_available():
        print(
            "bench/gpu.py measures GPU engines and there is no CUDA device here "
            "(torch.cuda.is_available() is False); `--device cpu` smoke-runs the cuda engine's path",
            file=sys.stderr,
        )
        return 2
    figs: list[Fig] = []
    t0 = time.perf_counter()

    async def run() -> None:
        for name, spec in shapes.items():
            await bench_shape(name, spec, args, figs)

    trio.run(run)
    gpu = torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu"
    wall = time.perf_counter() - t0
    print(f"\n{gpu}, torch {torch.__version__}, {args.tokens} tokens x {args.rounds} rounds, {wall:.0f} s")
    print(f"{'shape':<14} {'engine':<10} {'path':<8} {'batch':>5} {'tok/s':>9} {'TTFT ms':>8}")
    for f in figs:
        print(f"{f.shape:<14} {f.engine:<10} {f.path:<8} {f.batch:>5} {f.tok_s:>9.1f} {f.ttft_ms:>8.1f}")
    checks = targets(figs)
    if checks:
        print(f"\n{'target':<52} {'value':>8}  {'wanted':<20}")
        for what, value, want, met in checks:
            print(f"{what:<52} {value:>8.2f}  {want:<20} {'ok' if met else 'MISS'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "gpu": gpu,
                    "torch": torch.__version__,
                    "tokens": args.tokens,
                    "rounds": args.rounds,
                    "figures": [attrs.asdict(f) for f in figs],
                    "targets": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
