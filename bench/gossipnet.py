"""Real overlay nodes spread over several processes, driven by JSON lines (for bench/overlay.py).

The parent starts ``procs`` children; child 0's first node is the bootstrap
node.  Each child hosts ``nodes_per_proc`` real :class:`overlay.host.Overlay`
nodes and answers commands on stdin, one JSON object per line:

    {"cmd": "subscribe", "topic": t}             -> {"ok": true}
    {"cmd": "run", "topic": t, "n": N, "rate": R, "t0": T, "total": M, "first": F}
        publish message i (i % M in this child's global indices) at T + i / R, wall clock,
        record every delivery's latency    -> {"latencies": [...], "cpu": s, "copies": k}
    {"cmd": "put", "key": k} / {"cmd": "get", "key": k} -> {"ms": ..., "found": bool}
    {"cmd": "stop"}

Latencies compare wall-clock stamps taken in different processes of one machine.
"""

from __future__ import annotations

import json
import logging
import random
import struct
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from overlay.gossip import Validation  # noqa: E402
from overlay.host import Overlay, OverlaySettings, open_overlay  # noqa: E402
from overlay.identity import Identity  # noqa: E402


def count_copies(nodes: list[Overlay]) -> list[int]:
    """Wrap each node's pubsub.push_msg to count message copies received (before de-duplication)."""
    counter = [0]
    for node in nodes:
        ps: Any = node._pubsub  # bench-only peek at the library object
        original = ps.push_msg

        async def counted(msg_forwarder: object, msg: object, _orig: Any = original, _me: Any = ps) -> None:
            if msg_forwarder != _me.my_id:
                counter[0] += 1
            await _orig(msg_forwarder, msg)

        ps.push_msg = counted
    return counter


# ----------------------------------------------------------------------------- child


async def child(index: int, n_nodes: int, bootstrap: str) -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    out = sys.stdout
    stdin = trio.wrap_file(sys.stdin)
    async with AsyncExitStack() as stack:
        nodes: list[Overlay] = []
        for i in range(n_nodes):
            boot = () if (index == 0 and i == 0) else (bootstrap or nodes[0].listen_addrs()[0],)
            settings = OverlaySettings(bootstrap=boot, publish_rate=1000, publish_burst=64)
            nodes.append(await stack.enter_async_context(open_overlay(Identity.generate(), settings)))
            if index == 0 and i == 0:
                bootstrap = nodes[0].listen_addrs()[0]
        for node in nodes:
            node.dht.register_namespace("bench", lambda k, v: True)
        copies = count_copies(nodes)
        print(json.dumps({"ready": True, "bootstrap": bootstrap}), file=out, flush=True)
        subs: dict[str, list[object]] = {}
        rng = random.Random(index)
        async with trio.open_nursery() as nursery:
            while True:
                line = await stdin.readline()
                if not line:
                    break
                cmd = json.loads(line)
                if cmd["cmd"] == "stop":
                    break
                if cmd["cmd"] == "subscribe":
                    topic = cmd["topic"]
                    subs[topic] = [await n.subscribe(topic, lambda o, d: Validation.ACCEPT) for n in nodes]
                    with trio.move_on_after(30):
                        for n in nodes:
                            await n.wait_topic_peers(topic, 2)
                    print(json.dumps({"ok": True}), file=out, flush=True)
                elif cmd["cmd"] == "run":
                    result = await _run(nodes, subs[cmd["topic"]], copies, cmd, nursery)
                    print(json.dumps(result), file=out, flush=True)
                elif cmd["cmd"] == "put":
                    await rng.choice(nodes).dht.put(cmd["key"], b"v")
                    print(json.dumps({"ok": True}), file=out, flush=True)
                elif cmd["cmd"] == "get":
                    node = rng.choice(nodes)
                    node.dht.forget_local(cmd["key"])
                    t0 = time.perf_counter()
                    value = await node.dht.get(cmd["key"])
                    ms = (time.perf_counter() - t0) * 1000
                    print(json.dumps({"ms": ms, "found": value == b"v"}), file=out, flush=True)
            nursery.cancel_scope.cancel()


async def _run(
    nodes: list[Overlay], subs: list[object], copies: list[int], cmd: dict[str, Any], nursery: trio.Nursery
) -> dict[str, Any]:
    n, rate, t0 = int(cmd["n"]), float(cmd["rate"]), float(cmd["t0"])
    total, first = int(cmd["total"]), int(cmd["first"])
    latencies: list[float] = []
    per_publisher: dict[int, int] = {}

    async def drain(node: Overlay, sub: Any) -> None:
        async for msg in sub:
            if msg.origin == node.peer_id:
                continue
            sent_at, idx = struct.unpack(">dI", msg.data[:12])
            latencies.append(time.time() - sent_at)
            per_publisher[idx % total] = per_publisher.get(idx % total, 0) + 1

    async with trio.open_nursery() as drains:
        for node, sub in zip(nodes, subs, strict=True):
            drains.start_soon(drain, node, sub)
        copies[0] = 0
        cpu0 = time.process_time()
        mine = {first + j: node for j, node in enumerate(nodes)}
        for i in range(n):
            publisher = mine.get(i % total)
            if publisher is None:
                continue
            delay = t0 + i / rate - time.time()
            if delay > 0:
                await trio.sleep(delay)
            await publisher.publish(str(cmd["topic"]), struct.pack(">dI", time.time(), i) + bytes(244))
        await trio.sleep(max(0.0, t0 + n / rate + 8 - time.time()))  # stragglers
        cpu = time.process_time() - cpu0
        drains.cancel_scope.cancel()
    return {"latencies": latencies, "cpu": cpu, "copies": copies[0], "per_publisher": per_publisher}


# ----------------------------------------------------------------------------- parent


class ProcNet:
    """``procs`` child processes of ``nodes_per_proc`` nodes each."""

    def __init__(self, procs: int, nodes_per_proc: int) -> None:
        self.procs = procs
        self.nodes_per_proc = nodes_per_proc
        self.children: list[subprocess.Popen[str]] = []

    @property
    def total(self) -> int:
        return self.procs * self.nodes_per_proc

    def _spawn(self, index: int, bootstrap: str) -> dict[str, Any]:
        p = subprocess.Popen(
            [sys.executable, __file__, str(index), str(self.nodes_per_proc), bootstrap],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.children.append(p)
        return self._read(p)

    @staticmethod
    def _read(p: subprocess.Popen[str]) -> dict[str, Any]:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("a bench child died")
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    def _send(self, p: subprocess.Popen[str], cmd: dict[str, Any]) -> None:
        assert p.stdin is not None
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()

    def start(self) -> None:
        first = self._spawn(0, "")
        boot = str(first["bootstrap"])
        for i in range(1, self.procs):
            self._spawn(i, boot)

    def subscribe(self, topic: str) -> None:
        for p in self.children:
            self._send(p, {"cmd": "subscribe", "topic": topic})
        for p in self.children:
            self._read(p)
        time.sleep(2.5)  # let heartbeats form the mesh (a settle time, not a wait for a condition)

    def run(self, topic: str, n: int, rate: float) -> dict[str, float]:
        t0 = time.time() + 1.0
        for i, p in enumerate(self.children):
            cmd = {"cmd": "run", "topic": topic, "n": n, "rate": rate, "t0": t0}
            cmd.update({"total": self.total, "first": i * self.nodes_per_proc})
            self._send(p, cmd)
        results = [self._read(p) for p in self.children]
        lat = sorted(x for r in results for x in r["latencies"])
        expected = n * (self.total - 1)
        copies = sum(int(r["copies"]) for r in results)
        cpu = sum(float(r["cpu"]) for r in results)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] * 1000 if lat else float("nan")

        per: dict[int, int] = {}
        for r in results:
            for k, v in r["per_publisher"].items():
                per[int(k)] = per.get(int(k), 0) + v
        short = {k: v for k, v in per.items() if v < (n // self.total) * (self.total - 1)}
        missing = [k for k in range(self.total) if k not in per]
        if short or missing:
            print(f"  publishers under-delivered {short}, never delivered {missing}", flush=True)
        return {
            "delivery": len(lat) / expected,
            "p50_ms": pct(50),
            "p99_ms": pct(99),
            "cpu_per_copy_ms": cpu / max(1, copies) * 1000,
            "copies_per_delivery": copies / max(1, len(lat)),
        }

    def dht(self, n_keys: int) -> dict[str, float]:
        rng = random.Random(11)
        times: list[float] = []
        found = 0
        for i in range(n_keys):
            a, b = rng.sample(range(self.procs), 2) if self.procs > 1 else (0, 0)
            key = f"/bench/k{i}"
            self._send(self.children[a], {"cmd": "put", "key": key})
            self._read(self.children[a])
            self._send(self.children[b], {"cmd": "get", "key": key})
            r = self._read(self.children[b])
            times.append(float(r["ms"]))
            found += bool(r["found"])
        times.sort()
        return {
            "p50_ms": times[len(times) // 2],
            "p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
            "found": found / n_keys,
        }

    def stop(self) -> None:
        for p in self.children:
            try:
                self._send(p, {"cmd": "stop"})
            except (BrokenPipeError, OSError):
                pass
        for p in self.children:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    trio.run(child, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
