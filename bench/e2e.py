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

from inference.cpu import TorchEngine
from inference.messages import FinalChunk, GenerateRequest, TokenChunk
from inference.models import DEFAULT_MODEL_ID, default_model_path
from node.devnet import Devnet

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


def network_once(http: httpx.Client, tokens: int) -> tuple[float, float, int, float, float]:
    """(ttft s, decode tok/s, tokens, the worker engine's own tok/s and ttft s) of one streamed
    completion.

    ``http`` is a long-lived client, as an app keeps (building one costs ~30 ms of TLS set-up).
    """
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
    engine_tps = engine_ttft = 0.0
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
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
                engine_tps = float(ev["cocoon"].get("worker_decode_tok_s", 0.0))
                engine_ttft = float(ev["cocoon"].get("worker_ttft_ms", 0.0)) / 1000
    return first - t0, (n - 1) / max(last - first, 1e-9), n, engine_tps, engine_ttft


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
            http = httpx.Client(base_url=net.api, timeout=300)
            for _ in range(2 * 2):  # every worker's payment channel opened, every report verified
                await trio.to_thread.run_sync(network_once, http, 8)
            await bare_once(engine, 8)
            bare_ttft, bare_tps, net_ttft, net_tps, same, same_ttft = [], [], [], [], [], []
            for i in range(runs):
                t, s, _ = await bare_once(engine, tokens)
                bare_ttft.append(t)
                bare_tps.append(s)
                t2, s2, n2, e2, f2 = await trio.to_thread.run_sync(network_once, http, tokens)
                net_ttft.append(t2)
                same_ttft.append(t2 - f2)
                net_tps.append(s2)
                same.append(s2 / e2 if e2 else float("nan"))
                print(
                    f"  run {i + 1}: bare {s:6.1f} tok/s ttft {t * 1000:6.1f} ms | network {s2:6.1f} tok/s"
                    f" ttft {t2 * 1000:6.1f} ms ({n2} tokens; its engine {e2:.1f} tok/s)",
                    flush=True,
                )
            mb, mn = statistics.median(bare_tps), statistics.median(net_tps)
            tb, tn = statistics.median(bare_ttft), statistics.median(net_ttft)
            rows.append(("decode tok/s, bare engine (median)", f"{mb:.1f}", ""))
            rows.append(("decode tok/s, through the network", f"{mn:.1f}", ""))
            rows.append(("ratio network / bare", f"{mn / mb:.3f}", "target >= 0.95"))
            rows.append(
                (
                    "ratio network / serving engine, same request",
                    f"{statistics.median(same):.3f}",
                    "the worker engine's own timing of that request",
                )
            )
            rows.append(("TTFT bare / network (median)", f"{tb * 1000:.1f} / {tn * 1000:.1f} ms", ""))
            rows.append(("TTFT overhead of the network", f"{(tn - tb) * 1000:.1f} ms", "target <= 25 ms"))
            rows.append(
                (
                    "TTFT overhead, same request",
                    f"{statistics.median(same_ttft) * 1000:.1f} ms",
                    "client's TTFT minus the worker engine's own (no prefill noise)",
                )
            )

            results: list[tuple[float, float, int, float, float]] = []

            clients = [httpx.Client(base_url=net.api, timeout=300) for _ in range(concurrent)]
            for cl in clients:  # each with its connection open
                await trio.to_thread.run_sync(network_once, cl, 2)

            async def one(own: httpx.Client) -> None:
                results.append(await trio.to_thread.run_sync(network_once, own, tokens))

            t0 = time.perf_counter()
            async with trio.open_nursery() as batch:
                for cl in clients:
                    batch.start_soon(one, cl)
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
