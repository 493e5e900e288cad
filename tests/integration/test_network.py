"""The product end to end, in one process: chain, proxies, workers and a client, all real.

The real ``openai`` client (in a worker thread: it is synchronous) and raw
HTTP talk to the client node's API; requests are matched by a proxy, sealed to
the worker's attested key, paid per token over payment channels on the local
chain, and survive a worker that dies mid-stream and a proxy that dies.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from inference.messages import TokenChunk
from node import worker as worker_mod
from node.proxy import ProxyRole
from tests.inference_fixtures import tiny_model_dir  # noqa: F401
from tests.netkit import TINY, Net, start_testnet

pytestmark = pytest.mark.slow


def _proxy(net: Net, name: str) -> ProxyRole:
    role = next(c for c in net.node(name).app.components if isinstance(c, ProxyRole))
    return role


async def _wait_offers(net: Net, name: str, n: int) -> None:
    role = _proxy(net, name)
    assert role.service is not None
    svc = role.service

    def enough() -> bool:
        return len(svc.core.book.offers(TINY, time.time())) >= n

    with trio.fail_after(30):
        await svc.wait_until(enough)


def _chat(base: str, stream: bool, max_tokens: int = 12) -> tuple[str, object]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "def add"}]
    if not stream:
        r = client.chat.completions.create(model=TINY, messages=msgs, max_tokens=max_tokens, temperature=0)  # type: ignore[arg-type]
        return r.choices[0].message.content or "", r
    parts, last = [], None
    for ev in client.chat.completions.create(
        model=TINY,
        messages=msgs,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    ):
        last = ev
        if ev.choices and ev.choices[0].delta.content:
            parts.append(ev.choices[0].delta.content)
    return "".join(parts), last


async def test_openai_client_raw_sse_and_garbage_through_the_network(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    async with trio.open_nursery() as nursery:
        net = await start_testnet(nursery, tmp_path, tiny_model_dir, workers=2)
        await _wait_offers(net, "bootstrap-1", 2)
        base = net.api
        with trio.fail_after(120):
            text, resp = await trio.to_thread.run_sync(_chat, base, False)
            streamed, last = await trio.to_thread.run_sync(_chat, base, True)
        assert text
        assert streamed == text  # greedy on identical tiny models: the same answer
        extra = resp.model_extra  # type: ignore[attr-defined]
        assert extra["cocoon"]["tier"] == "none"
        assert extra["cocoon"]["worker"] in {w.app.peer_id for w in net.workers()}
        # the client's time to first token includes the worker's own (prefill) and the network's
        assert 0 < extra["cocoon"]["worker_ttft_ms"] <= extra["cocoon"]["ttft_ms"]
        usage = resp.usage  # type: ignore[attr-defined]
        assert usage.completion_tokens >= 1
        assert usage.model_extra["cost_nanoton"] > 0
        assert last is not None
        assert last.model_extra["cocoon"]["cost_nanoton"] > 0  # type: ignore[attr-defined]

        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            body = {
                "model": TINY,
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 6,
                "stream": True,
            }
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                raw = b"".join([c async for c in r.aiter_raw()]).decode()
            events = [e for e in raw.split("\n\n") if e]
            assert events[-1] == "data: [DONE]"
            final = json.loads(events[-2][len("data: ") :])
            assert final["choices"][0]["finish_reason"] in ("stop", "length")
            assert final["usage"]["cost_nanoton"] > 0

            for bad, status in (
                (b"{oops", 400),
                (
                    json.dumps(
                        {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
                    ).encode(),
                    503,
                ),
                (b"x" * (2 << 20), 413),
                (
                    json.dumps(
                        {"model": TINY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**7}
                    ).encode(),
                    400,
                ),
            ):
                r2 = await http.post(
                    "/v1/chat/completions", content=bad, headers={"content-type": "application/json"}
                )
                assert r2.status_code == status, r2.text
                assert r2.json()["error"]["message"]
            ok = await http.post(
                "/v1/chat/completions",
                json={"model": TINY, "messages": [{"role": "user", "content": "y"}], "max_tokens": 4},
            )
            assert ok.status_code == 200
            metrics = (await http.get("/metrics")).text
            assert "cocoon_completion_tokens_total" in metrics
        nursery.cancel_scope.cancel()


async def test_worker_killed_mid_stream_the_answer_continues_elsewhere(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with trio.open_nursery() as nursery:
        net = await start_testnet(nursery, tmp_path, tiny_model_dir, workers=2)
        await _wait_offers(net, "bootstrap-1", 2)
        killed: list[str] = []
        original_send = worker_mod._MeteredStream.send

        async def send_then_die(self: worker_mod._MeteredStream, msg: object) -> None:
            await original_send(self, msg)
            if not killed and isinstance(msg, TokenChunk):
                victim = next(w for w in net.workers() if w.app.peer_id == self.worker)
                killed.append(victim.app.peer_id)
                victim.kill()  # the whole node goes down: host, streams, payments

        monkeypatch.setattr(worker_mod._MeteredStream, "send", send_then_die)
        body = {
            "model": TINY,
            "messages": [{"role": "user", "content": "def add"}],
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
        }
        async with httpx.AsyncClient(base_url=net.api, timeout=120) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                raw = b"".join([c async for c in r.aiter_raw()]).decode()
        events = [json.loads(e[6:]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
        assert not [e for e in events if "error" in e], events[-1]
        final = events[-1]
        workers = final["cocoon"]["workers"]
        assert len(killed) == 1
        assert workers[0]["peer_id"] == killed[0]
        assert len(workers) == 2
        assert workers[1]["peer_id"] != killed[0]
        delivered = sum(ev["choices"][0].get("delta", {}).get("content") is not None for ev in events[:-1])
        assert delivered >= 2
        total = sum(w["completion_tokens"] for w in workers)
        assert final["usage"]["completion_tokens"] == total
        assert workers[0]["completion_tokens"] >= 1
        # each worker was paid only for what it delivered (prompt + its own tokens, at its prices)
        assert final["usage"]["cost_nanoton"] == sum(w["cost_nanoton"] for w in workers)
        assert final["choices"][0]["finish_reason"] in ("stop", "length")
        nursery.cancel_scope.cancel()


async def test_a_dead_proxy_is_replaced_by_the_next(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    async with trio.open_nursery() as nursery:
        net = await start_testnet(nursery, tmp_path, tiny_model_dir, bootstraps=2, workers=1)
        await _wait_offers(net, "bootstrap-1", 1)
        await _wait_offers(net, "bootstrap-2", 1)
        body = {"model": TINY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
        async with httpx.AsyncClient(base_url=net.api, timeout=120) as http:
            first = await http.post("/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            used = _used_proxy(net)
            net.node(used).kill()
            second = await http.post("/v1/chat/completions", json=body)
            assert second.status_code == 200, second.text
            assert _used_proxy(net, exclude=used) != used
        nursery.cancel_scope.cancel()


def _used_proxy(net: Net, exclude: str = "") -> str:
    """The bootstrap proxy that routed the most sessions (that is alive)."""
    candidates: list[tuple[int, str]] = []
    for name in ("bootstrap-1", "bootstrap-2"):
        if name == exclude:
            continue
        candidates.append((_proxy(net, name).routed, name))
    routed, name = max(candidates)
    assert routed > 0
    return name


async def test_ask_status_and_metrics(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        net = await start_testnet(nursery, tmp_path, tiny_model_dir, workers=1)
        await _wait_offers(net, "bootstrap-1", 1)
        # `cocoon-node ask` streams the answer and says who answered, at what tier and cost
        proc = await trio.run_process(
            [sys.executable, "-m", "node.cli", "ask", "--api", net.api, "--model", TINY,
             "--max-tokens", "8", "--data-dir", str(tmp_path / "asker"), "def add"],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        err = proc.stderr.decode()
        worker = net.workers()[0].app.peer_id
        assert worker[-10:] in err
        assert "tier none" in err
        assert "nanoTON" in err
        # status sections of every role
        client_status = net.node("client").app.status().details()
        assert client_status["client"]["completions"] >= 1  # type: ignore[index]
        assert client_status["network"]["spent_nanoton"] > 0  # type: ignore[index]
        worker_status = net.workers()[0].app.status().details()
        assert worker_status["worker"]["served"] >= 1  # type: ignore[index]
        assert worker_status["worker"]["tier"] == "none"  # type: ignore[index]
        proxy_status = net.node("bootstrap-1").app.status().details()
        assert proxy_status["proxy"]["sessions_routed"] >= 1  # type: ignore[index]
        assert proxy_status["network"]["forward_fees_nanoton"] > 0  # type: ignore[index]
        # Prometheus text on the client's API: every role's figures in one registry
        async with httpx.AsyncClient(timeout=30) as http:
            text = (await http.get(f"{net.api}/metrics")).text
        for name in (
            "cocoon_completion_tokens_total",
            "cocoon_payments",
            "cocoon_overlay",
            "cocoon_client_events_total",
        ):
            assert name in text, name
        nursery.cancel_scope.cancel()
