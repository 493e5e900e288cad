"""NAT benchmark: a client behind NAT reaching workers direct, relayed and hole-punched, in one run.

Builds the ``devnet --nat`` topology (root; network namespaces and nftables
masquerade, see ``node/netns.py``) with no proxy candidates, so the bootstrap
node is the only proxy and the only relay, and three workers serving the same
tiny model under three names:

- ``direct``:   the worker is on a public host; the client dials it;
- ``punched``:  the worker is behind a cone NAT; the first request goes through
  the relay, the hole punch then goes direct (we wait for it);
- ``relayed``:  the worker is behind a symmetric NAT; the punch fails and every
  request crosses the relay.

The client is behind its own cone NAT.  Per path: time to first token at the
HTTP client and decode tok/s (streamed, greedy, sequential requests), and the
relay's CPU per request and per token: the CPU time of the bootstrap process
over the batch, minus that of the direct batch (proxy work, matching and
payments, is the same on every path, so the difference is the relaying).

The tiny model decodes at ~1,000+ tok/s on one core, so the transport shows;
with a real model the paths differ much less.

    .venv/bin/python bench/nat.py [--requests 20] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.tiny import write_tiny_model
from node.control import ask_action, ask_status
from node.devnet import Devnet
from node.netns import Home, namespaces_available

PATHS = ("direct", "punched", "relayed")


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stream(api: str, model: str, tokens: int) -> tuple[float, float, int]:
    """(ttft s, decode tok/s, tokens) of one streamed greedy completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Once upon a time"}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    path = ""
    with (
        httpx.Client(base_url=api, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
            if ev.get("usage"):
                n = int(ev["usage"]["completion_tokens"])
                path = ev["cocoon"]["workers"][-1].get("path", "")
    ttft = first - t0
    rate = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    if path and path != "direct" and model.endswith("direct"):
        print(f"  note: the direct worker was reached {path}", flush=True)
    return ttft, rate, n


async def _relay_bytes(net: Devnet) -> int:
    boot = next(c for c in net.children if c.name == "bootstrap")
    nat = (await ask_status(boot.data_dir)).details()["nat"]
    assert isinstance(nat, dict)
    relay = nat["relay"]
    assert isinstance(relay, dict)
    return int(relay["bytes_relayed"])


async def main(args: argparse.Namespace) -> int:
    ok, why = namespaces_available()
    if not ok:
        print(f"bench/nat.py needs network namespaces: {why}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="cocoon-natbench-"))
    models = {p: write_tiny_model(root / "models" / f"tiny-{p}") for p in PATHS}
    names = ",".join(m.name for m in models.values())
    extra: dict[str, list[str]] = {n: ["--set", f"client.models={names}"] for n in ("bootstrap", "client")}
    for i, p in enumerate(PATHS, 1):
        extra[f"worker-{i}"] = [
            "--model", str(models[p]), "--set", "worker.max_context=256", "--set", f"client.models={names}",
        ]  # fmt: skip
    homes = (Home("public"), Home("cone"), Home("symmetric"), Home("cone"))
    net = Devnet(root / "net", workers=3, proxies=0, api_port=0, nat=homes, extra=extra)
    rows: list[tuple[str, float, float, float, float, float]] = []
    async with trio.open_nursery() as nursery:
        try:
            await net.up(nursery)
            seen = await net.wait_offers(1, timeout=120)
            print(f"the client sees offers ({seen}); warming up each path ...", flush=True)
            client = next(c for c in net.children if c.name == "client")
            boot = next(c for c in net.children if c.name == "bootstrap")
            for p in PATHS:
                for _ in range(2):
                    await trio.to_thread.run_sync(_stream, net.api, models[p].name, 8)
            print("  " + (await ask_action(client.data_dir, "wait-punch", timeout=90)).message, flush=True)
            base_cpu = 0.0
            for p in PATHS:
                b0, c0 = await _relay_bytes(net), _cpu_s(boot.proc.pid)
                runs = [
                    await trio.to_thread.run_sync(_stream, net.api, models[p].name, args.tokens)
                    for _ in range(args.requests)
                ]
                cpu = _cpu_s(boot.proc.pid) - c0
                relayed = (await _relay_bytes(net)) - b0
                tokens = sum(r[2] for r in runs)
                if p == "direct":
                    base_cpu = cpu
                extra_cpu = max(cpu - base_cpu, 0.0)
                rows.append(
                    (
                        p,
                        statistics.median(r[0] for r in runs) * 1000,
                        statistics.median(r[1] for r in runs),
                        extra_cpu / args.requests * 1000,
                        extra_cpu / max(tokens, 1) * 1e6,
                        relayed / args.requests,
                    )
                )
        finally:
            with trio.CancelScope(shield=True):
                await net.down()
            nursery.cancel_scope.cancel()
    shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.requests} sequential streamed requests of {args.tokens} tokens per path (tiny model)")
    head = ("TTFT p50 ms", "tok/s p50", "relay CPU ms/req", "µs/token", "relayed B/req")
    print(f"{'path':<9} {head[0]:>12} {head[1]:>10} {head[2]:>17} {head[3]:>9} {head[4]:>14}")
    for p, ttft, rate, cpu_req, cpu_tok, b in rows:
        print(f"{p:<9} {ttft:>12.1f} {rate:>10.0f} {cpu_req:>17.2f} {cpu_tok:>9.1f} {b:>14.0f}")
    direct = rows[0]
    for p, ttft, rate, *_ in rows[1:]:
        print(f"{p} / direct: TTFT {ttft / direct[1]:.2f}x, tok/s {rate / direct[2]:.2f}x")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    sys.exit(trio.run(main, parser.parse_args()))
