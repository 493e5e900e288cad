"""End-to-end benchmark on a devnet: the whole network against the bare engine, same run.

Starts ``cocoon-node devnet`` (separate processes: local chain, bootstrap
proxy, proxy candidates, workers on SmolLM2-135M with one torch thread each, a
client) and, in this process, the same engine with the same settings.  Then:

- paired runs (bare, network, bare, network, ...) of one greedy completion:
  decode tok/s and time to first token; the ratio network/bare (target >= 0.95)
  and the TTFT overhead (target <= 25 ms).  TTFT through the network is measured
  at the HTTP client: request sent -> first SSE content event.
- 8 concurrent clients through the API: all complete; aggregate tok/s.

    .venv/bin/python bench/e2e.py [--runs 5] [--tokens 96]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.cpu import TorchEngine  # noqa: E402
from inference.messages import FinalChunk, GenerateRequest, TokenChunk  # noqa: E402
from inference.models import DEFAULT_MODEL_ID, default_model_path  # noqa: E402
from node.devnet import Devnet  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


async def bare_once(engine: TorchEngine, tokens: int) -> tuple[float, float, int]:
    """(ttft s, decode tok/s, tokens) of one greedy chat completion on the bare engine."""
    from inference.messages import ChatMessage

    req = GenerateRequest(
        f"bare-{time.monotonic_ns()}",
        DEFAULT_MODEL_ID,
        tokens,
        messages=(ChatMessage("user", PROMPT),),
        temperature=0.0,
        ignore_eos=True,
    )
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    async for chunk in engine.generate_stream(req):
        if isinstance(chunk, TokenChunk | FinalChunk) and chunk.token_ids:
            now = time.perf_counter()
            if not first:
                first = now
            last = now
            n += len(chunk.token_ids)
    return first - t0, (n - 1) / max(last - first, 1e-9), n


def network_once(api: str, tokens: int, stream_timeout: float = 300) -> tuple[float, float, int]:
    body = {
        "model": DEFAULT_MODEL_ID,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    with (
        httpx.Client(base_url=api, timeout=stream_timeout) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"])
            if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                now = time.perf_counter()
                if not first:
                    first = now
                last = now
            if "usage" in ev and ev.get("cocoon"):
                n = ev["usage"]["completion_tokens"]
    return first - t0, (n - 1) / max(last - first, 1e-9), n


async def main(runs: int, tokens: int, concurrent: int) -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="cocoon-bench-e2e-"))
    net = Devnet(root, workers=2, proxies=1, api_port=18480)
    engine = TorchEngine(default_model_path(), model_id=DEFAULT_MODEL_ID, slots=8, threads=1)
    rows: list[tuple[str, str, str]] = []
    async with trio.open_nursery() as nursery:
        try:
            await net.up(nursery)
            print("loading the bare engine in this process ...", flush=True)
            await engine.load()
            seen = await net.wait_offers(2)
            print(f"client sees {seen} offers; warming up (first request opens the payment channels) ...")
            await trio.to_thread.run_sync(network_once, net.api, 8)
            await bare_once(engine, 8)
            bare_ttft, bare_tps, net_ttft, net_tps = [], [], [], []
            for i in range(runs):
                t, s, _ = await bare_once(engine, tokens)
                bare_ttft.append(t)
                bare_tps.append(s)
                t2, s2, n2 = await trio.to_thread.run_sync(network_once, net.api, tokens)
                net_ttft.append(t2)
                net_tps.append(s2)
                print(f"  run {i + 1}: bare {s:6.1f} tok/s ttft {t * 1000:6.1f} ms | "
                      f"network {s2:6.1f} tok/s ttft {t2 * 1000:6.1f} ms ({n2} tokens)", flush=True)  # fmt: skip
            mb, mn = statistics.median(bare_tps), statistics.median(net_tps)
            tb, tn = statistics.median(bare_ttft), statistics.median(net_ttft)
            rows.append(("decode tok/s, bare engine (median)", f"{mb:.1f}", ""))
            rows.append(("decode tok/s, through the network", f"{mn:.1f}", ""))
            rows.append(("ratio network / bare", f"{mn / mb:.3f}", "target >= 0.95"))
            rows.append(("TTFT bare / network (median)", f"{tb * 1000:.1f} / {tn * 1000:.1f} ms", ""))
            rows.append(("TTFT overhead of the network", f"{(tn - tb) * 1000:.1f} ms", "target <= 25 ms"))

            results: list[tuple[float, float, int]] = []
            t0 = time.perf_counter()

            async def one() -> None:
                results.append(await trio.to_thread.run_sync(network_once, net.api, tokens))

            async with trio.open_nursery() as batch:
                for _ in range(concurrent):
                    batch.start_soon(one)
            wall = time.perf_counter() - t0
            total = sum(r[2] for r in results)
            rows.append(
                (
                    f"{concurrent} concurrent clients",
                    f"{len(results)}/{concurrent} complete, {total} tokens in {wall:.1f} s",
                    "",
                )
            )
            rows.append(("aggregate tok/s (2 workers, 1 thread each)", f"{total / wall:.1f}", ""))
        finally:
            with trio.CancelScope(shield=True):
                await engine.close()
                await net.down()
            nursery.cancel_scope.cancel()
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"\n{'figure':<{w0}}  {'measured':<{w1}}  note")
    print("-" * (w0 + w1 + 20))
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--concurrent", type=int, default=8)
    a = ap.parse_args()
    trio.run(main, a.runs, a.tokens, a.concurrent)
