"""Inference benchmark: SmolLM2-135M-Instruct (Q4_1 GGUF) on the CPU, one compute thread pinned to one core.

Run: ``python bench/inference.py`` (``--quick`` for fewer tokens and rounds).
Prints one table.  Measured in the same run, rounds interleaved, medians:

- decode tok/s of our torch engine (int8 weights) vs llama.cpp through
  ``llama-cpp-python`` and vs transformers' ``generate`` (fp32, the same
  dequantized weights; built without ``accelerate``).  Both baselines are
  bench-only: a baseline that is not installed is skipped with a message.
  Targets: ours / llama.cpp >= 0.5, ours / transformers >= 2;
- aggregate decode tok/s at batch 1, 4 and 8 (concurrent requests on one
  engine).  Target: batch 8 >= 4 x batch 1;
- the worker's generation service over real libp2p on loopback vs the bare
  engine: decode tok/s ratio (>= 0.97) and time-to-first-token overhead
  (<= 15 ms);
- resident memory with SmolLM2 loaded (a fresh subprocess): <= 1.2 GB.

Every engine computes on one thread pinned to the same core (our model
thread, llama.cpp's, transformers'); the trio event loop (libp2p, Noise,
yamux, framing, for the worker and the client of the service test) runs
unpinned.  Wall-clock numbers on a shared 2-core VM: other processes add
noise, which is why every comparison is interleaved and reported as a median.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: no OpenMP worker threads at all
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AsyncExitStack, aclosing
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's packages, not this file

import attrs
import torch
import trio

from inference.cpu import TorchEngine
from inference.gguf_file import read_gguf
from inference.messages import ChatMessage, Chunk, FinalChunk, GenerateRequest
from inference.models import default_model_path
from inference.service import PROTOCOL_ID, GenerationService, generate

QUESTION = "What is the capital of France?"
_T = TypeVar("_T")
Row = tuple[str, str, str, str]


CPU = sorted(os.sched_getaffinity(0))[-1]  # the core every engine computes on


def _pinned(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` in the calling thread pinned to CPU (for the baselines, run in a worker thread)."""
    os.sched_setaffinity(0, {CPU})
    torch.set_num_threads(1)
    return fn(*args)


def _engine(path: Path) -> TorchEngine:
    return TorchEngine(path, model_id="smollm2", threads=1, slots=8, context=1024, cpus=frozenset({CPU}))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _request(rid: str, n: int) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model="smollm2",
        messages=(ChatMessage("user", QUESTION),),
        max_tokens=n,
        temperature=0.0,
        ignore_eos=True,
    )


# --------------------------------------------------------------------------- our engine


async def ours_decode(engine: TorchEngine, n: int, rid: str) -> tuple[float, float, list[int]]:
    """(decode tok/s, ttft s, first ids) of one request on the bare engine, measured by the consumer."""
    t0 = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    ids: list[int] = []
    async with aclosing(engine.generate_stream(_request(rid, n))) as chunks:
        async for c in chunks:
            stamps.append((time.perf_counter(), len(c.token_ids)))
            ids.extend(c.token_ids)
    return _rate(stamps), stamps[0][0] - t0, ids[:8]


def _rate(stamps: list[tuple[float, int]]) -> float:
    """Tokens after the first chunk per second between the first and the last chunk."""
    if len(stamps) < 2:
        return float("nan")
    tokens = sum(k for _, k in stamps[1:])
    return tokens / (stamps[-1][0] - stamps[0][0])


async def batch_rate(engine: TorchEngine, batch: int, n: int) -> float:
    """Aggregate decode tok/s of ``batch`` concurrent requests, counted once all of them are decoding."""
    stamps: list[list[tuple[float, int]]] = [[] for _ in range(batch)]

    async def one(i: int) -> None:
        async with aclosing(engine.generate_stream(_request(f"b{batch}-{i}", n))) as chunks:
            async for c in chunks:
                stamps[i].append((time.perf_counter(), len(c.token_ids)))

    async with trio.open_nursery() as nursery:
        for i in range(batch):
            nursery.start_soon(one, i)
    # the window in which all requests were decoding: after the last first token, before the first end
    start = max(s[0][0] for s in stamps)
    end = min(s[-1][0] for s in stamps)
    tokens = sum(k for s in stamps for t, k in s if start < t <= end)
    return tokens / (end - start)


@attrs.frozen
class ServiceFigures:
    paired_ratio: float  # median over pairs of service tok/s / bare-engine tok/s
    paired_ttft_over: float  # median over pairs of service TTFT - bare TTFT, seconds
    own_ratio: float  # median of client-observed tok/s / the engine's own figure for the same request
    own_ttft_over: float  # median of client-observed TTFT - the engine's own TTFT for the same request, s
    via_rate: float
    bare_rate: float
    paired_iqr: tuple[float, float]  # spread of the paired ratios: the machine's noise


async def service_vs_bare(engine: TorchEngine, n: int, pairs: int) -> ServiceFigures:
    """The service over libp2p on loopback vs the bare engine, two ways.

    Paired runs (alternating which goes first) compare whole requests, but a
    prefill's time swings by tens of ms on a shared machine.  So each service
    request is also compared with the engine's own timing of that very
    request (``FinalChunk.ttft_s`` / ``decode_tok_per_s``, measured inside the
    engine): the difference is exactly what the service and the transport add.
    """
    from overlay.host import open_overlay
    from overlay.identity import Identity

    service = GenerationService({"smollm2": engine})
    ratios: list[float] = []
    ttft_over: list[float] = []
    own_ratios: list[float] = []
    own_over: list[float] = []
    via_rates: list[float] = []
    bare_rates: list[float] = []
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(open_overlay(Identity.generate()))
        client = await stack.enter_async_context(open_overlay(Identity.generate()))
        worker.set_stream_handler(PROTOCOL_ID, service.handle)
        await client.connect(worker.listen_addrs()[0])

        async def via(rid: str) -> tuple[float, float, FinalChunk]:
            stream = await client.open_stream(worker.peer_id, PROTOCOL_ID)
            t0 = time.perf_counter()
            stamps: list[tuple[float, int]] = []
            last: Chunk | None = None
            async with aclosing(generate(stream, _request(rid, n))) as chunks:
                async for c in chunks:
                    stamps.append((time.perf_counter(), len(c.token_ids)))
                    last = c
            assert isinstance(last, FinalChunk)
            return _rate(stamps), stamps[0][0] - t0, last

        for r in range(pairs + 1):
            if r % 2:
                v_rate, v_ttft, final = await via(f"svc{r}")
                b_rate, b_ttft, _ = await ours_decode(engine, n, f"bare{r}")
            else:
                b_rate, b_ttft, _ = await ours_decode(engine, n, f"bare{r}")
                v_rate, v_ttft, final = await via(f"svc{r}")
            if r == 0:
                continue  # warm-up: the first stream, the first runs of the service's code
            ratios.append(v_rate / b_rate)
            ttft_over.append(v_ttft - b_ttft)
            own_ratios.append(v_rate / final.decode_tok_per_s)
            own_over.append(v_ttft - final.ttft_s)
            via_rates.append(v_rate)
            bare_rates.append(b_rate)
    q = statistics.quantiles(ratios, n=4)
    return ServiceFigures(
        _median(ratios),
        _median(ttft_over),
        _median(own_ratios),
        _median(own_over),
        _median(via_rates),
        _median(bare_rates),
        (q[0], q[2]),
    )


# --------------------------------------------------------------------------- baselines


def llama_cpp_decode(llm: Any, prompt: list[int], n: int) -> tuple[float, list[int]]:
    stamps: list[float] = []
    ids: list[int] = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        ids.append(int(tok))
        if len(ids) >= n:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), ids[:8]


def load_transformers(path: Path) -> Any:
    """transformers' LlamaForCausalLM with the GGUF's weights dequantized to fp32 (no accelerate needed)."""
    transformers: Any = importlib.import_module("transformers")  # bench-only; typed Any on purpose

    with read_gguf(path) as g:
        md = g.metadata
        heads, kv = int(md["llama.attention.head_count"]), int(md["llama.attention.head_count_kv"])  # type: ignore[call-overload]
        cfg = transformers.LlamaConfig(
            vocab_size=len(md["tokenizer.ggml.tokens"]),  # type: ignore[arg-type]
            hidden_size=md["llama.embedding_length"],
            intermediate_size=md["llama.feed_forward_length"],
            num_hidden_layers=md["llama.block_count"],
            num_attention_heads=heads,
            num_key_value_heads=kv,
            rope_theta=float(md["llama.rope.freq_base"]),  # type: ignore[arg-type]
            rms_norm_eps=float(md["llama.attention.layer_norm_rms_epsilon"]),  # type: ignore[arg-type]
            max_position_embeddings=int(md["llama.context_length"]),  # type: ignore[call-overload]
            tie_word_embeddings="output.weight" not in g.tensors,
        )

        def rotate_half_order(w: torch.Tensor, n: int) -> torch.Tensor:  # GGUF interleaved -> HF rows
            o, i = w.shape
            return w.reshape(n, o // n // 2, 2, i).transpose(1, 2).reshape(o, i)

        sd = {
            "model.embed_tokens.weight": g.dequantize("token_embd.weight"),
            "model.norm.weight": g.dequantize("output_norm.weight"),
        }
        for layer in range(cfg.num_hidden_layers):
            p, b = f"model.layers.{layer}.", f"blk.{layer}."
            sd[p + "self_attn.q_proj.weight"] = rotate_half_order(g.dequantize(b + "attn_q.weight"), heads)
            sd[p + "self_attn.k_proj.weight"] = rotate_half_order(g.dequantize(b + "attn_k.weight"), kv)
            for ours, theirs in (
                    ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
                ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
            ):  # fmt: skip
                sd[p + theirs + ".weight"] = g.dequantize(b + ours + ".weight")
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model


def transformers_decode(model: Any, prompt: list[int], n: int) -> tuple[float, list[int]]:
    transformers: Any = importlib.import_module("transformers")

    class Stamps(transformers.generation.streamers.BaseStreamer):  # type: ignore[misc]
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, value: Any) -> None:
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt])
    s = Stamps()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        streamer=s, pad_token_id=2,
    )  # fmt: skip
    new = s.t[1:]  # the first put() is the prompt
    return (len(new) - 1) / (new[-1] - new[0]), out[0, len(prompt) : len(prompt) + 8].tolist()


# --------------------------------------------------------------------------- memory


def rss_probe() -> None:
    """In a fresh process: load SmolLM2 on our engine, generate a little, print resident memory."""

    async def main() -> None:
        engine = _engine(default_model_path())
        await engine.load()
        await ours_decode(engine, 16, "rss")
        status = await trio.Path("/proc/self/status").read_text()
        kb = {
            line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")
        }
        print(json.dumps({"rss_mb": kb["VmRSS"] / 1024, "peak_mb": kb["VmHWM"] / 1024}))

    trio.run(main)


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    n, rounds = args.tokens, args.rounds
    path = default_model_path()
    engine = _engine(path)
    info = await engine.load()
    rows.append(("our engine: load SmolLM2 (GGUF -> int8)", f"{info.load_s:.2f} s", "", ""))
    prompt = engine._loaded.tokenizer.encode_chat([("user", QUESTION)])  # type: ignore[union-attr]

    llm = None
    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama

        llm = await trio.to_thread.run_sync(
            lambda: Llama(str(path), n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
        )
    else:
        print("llama.cpp baseline skipped: llama-cpp-python is not installed")
        print("  (bench extra: pip install llama-cpp-python==0.3.36, builds from source in ~10 min)")
    hf = None
    if importlib.util.find_spec("transformers") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = load_transformers(path)
    else:
        print(
            "transformers baseline skipped: transformers is not installed (pip install transformers==5.24.0)"
        )

    await ours_decode(engine, 16, "warm")  # TorchScript's first runs
    r_ours: list[float] = []
    r_llama: list[float] = []
    r_hf: list[float] = []
    firsts: dict[str, list[int]] = {}
    for r in range(rounds):
        if llm is not None:
            rate, firsts["llama.cpp"] = await trio.to_thread.run_sync(
                _pinned, llama_cpp_decode, llm, prompt, n
            )
            r_llama.append(rate)
        rate, _, firsts["ours"] = await ours_decode(engine, n, f"solo{r}")
        r_ours.append(rate)
        if hf is not None:
            rate, firsts["transformers"] = await trio.to_thread.run_sync(
                _pinned, transformers_decode, hf, prompt, n
            )
            r_hf.append(rate)
    ours = _median(r_ours)
    rows.append(("decode tok/s, ours (int8, batch 1)", f"{ours:.1f}", "", ""))
    if llm is not None:
        lc = _median(r_llama)
        rows.append(("decode tok/s, llama.cpp (Q4_1, 1 thread)", f"{lc:.1f}", "", ""))
        rows.append(("ours / llama.cpp", f"{ours / lc:.2f}", ">= 0.5", _ok(ours / lc >= 0.5)))
    if hf is not None:
        h = _median(r_hf)
        rows.append(("decode tok/s, transformers generate (fp32)", f"{h:.1f}", "", ""))
        rows.append(("ours / transformers", f"{ours / h:.2f}", ">= 2", _ok(ours / h >= 2)))
    for name, ids in firsts.items():
        print(f"first greedy ids, {name}: {ids}")

    rates = {}
    for b in (1, 4, 8):
        rates[b] = _median([await batch_rate(engine, b, n) for _ in range(rounds)])
        rows.append((f"aggregate decode tok/s, batch {b}", f"{rates[b]:.1f}", "", ""))
    rows.append(("batch 8 / batch 1", f"{rates[8] / rates[1]:.2f}", ">= 4", _ok(rates[8] / rates[1] >= 4)))

    sv = await service_vs_bare(engine, max(n // 2, 32), pairs=4 * rounds + 1)
    rows.append(
        ("service over libp2p loopback: decode tok/s", f"{sv.via_rate:.1f} (bare {sv.bare_rate:.1f})", "", "")
    )
    rows.append(
        (
            "service / bare tok/s, paired runs",
            f"{sv.paired_ratio:.3f} (IQR {sv.paired_iqr[0]:.2f}-{sv.paired_iqr[1]:.2f})",
            ">= 0.97",
            _ok(sv.paired_ratio >= 0.97),
        )
    )
    rows.append(
        ("service / engine tok/s, same request", f"{sv.own_ratio:.3f}", ">= 0.97", _ok(sv.own_ratio >= 0.97))
    )
    paired_ms, own_ms = sv.paired_ttft_over * 1e3, sv.own_ttft_over * 1e3
    rows.append(("TTFT overhead, paired runs (prefill noise)", f"{paired_ms:.1f} ms", "", ""))
    rows.append(("TTFT overhead, same request", f"{own_ms:.1f} ms", "<= 15 ms", _ok(own_ms <= 15)))
    await engine.close()
    return rows


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("llama-cpp-python", "transformers"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} absent")
    return ", ".join(out)


def _ok(flag: bool) -> str:
    return "ok" if flag else "MISS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 tokens, 2 rounds")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per comparison")
    ap.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        rss_probe()
        return
    if args.quick:
        args.tokens, args.rounds = 64, 2
    pinned = f"cpu {CPU}"
    others = set(os.sched_getaffinity(0)) - {CPU}
    if others:  # the event loop (and the worker threads until they pin themselves) off the compute core
        os.sched_setaffinity(0, others)
    t0 = time.perf_counter()
    rows = trio.run(run, args)
    probe = subprocess.run(
        [sys.executable, __file__, "--rss-probe"], capture_output=True, text=True, check=True, env=os.environ
    )
    mem = json.loads(probe.stdout.strip().splitlines()[-1])
    rows.append(
        (
            "RSS with SmolLM2 loaded (fresh process)",
            f"{mem['rss_mb']:.0f} MB (peak {mem['peak_mb']:.0f} MB)",
            "<= 1200 MB",
            _ok(mem["rss_mb"] <= 1200),
        )
    )
    width = max(len(r[0]) for r in rows)
    took = time.perf_counter() - t0
    shape = f"{args.tokens} tokens x {args.rounds} rounds"
    print(f"\nSmolLM2-135M-Instruct Q4_1, compute pinned to {pinned}, {shape}")
    print(f"torch {torch.__version__}, {_versions()}; {took:.0f} s")
    print(f"{'metric':<{width}}  {'value':<34} {'target':<9} ")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:<34} {target:<9} {ok}")


if __name__ == "__main__":
    main()
