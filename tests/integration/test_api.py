"""The OpenAI-compatible API over real HTTP (hypercorn on loopback), backed by a real local engine.

The real ``openai`` client runs in a worker thread (it is synchronous); raw
SSE and garbage requests go through httpx.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from inference.cpu import TorchEngine
from node.api import ApiSettings, OpenAIApp, serve_api
from node.local_backend import EngineBackend
from node.metrics import Metrics
from tests.inference_fixtures import tiny_engine, tiny_model_dir  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
async def api(tiny_engine: TorchEngine) -> AsyncIterator[tuple[str, TorchEngine, Metrics]]:  # noqa: F811
    info = await tiny_engine.load()
    metrics = Metrics()
    backend = EngineBackend(tiny_engine, info, name="tiny-worker", price_prompt=2, price_completion=10)
    app = OpenAIApp(backend, ApiSettings(max_body=64 * 1024, max_tokens_limit=200), metrics)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_api, app, "127.0.0.1", 0)
        yield f"http://{host}:{port}", tiny_engine, metrics
        nursery.cancel_scope.cancel()


def _openai_chat(base: str, stream: bool) -> tuple[str, object]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
    msgs = [{"role": "user", "content": "def add"}]
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)  # type: ignore[arg-type]
        return r.choices[0].message.content or "", r
    parts = []
    last = None
    for ev in client.chat.completions.create(
        model="tiny",
        messages=msgs,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        last = ev
        if ev.choices and ev.choices[0].delta.content:
            parts.append(ev.choices[0].delta.content)
    return "".join(parts), last


async def test_openai_client_streamed_and_not(api: tuple[str, TorchEngine, Metrics]) -> None:
    base, _, metrics = api
    with trio.fail_after(60):
        text, resp = await trio.to_thread.run_sync(_openai_chat, base, False)
        streamed, last = await trio.to_thread.run_sync(_openai_chat, base, True)
    assert text
    assert streamed == text  # greedy: the same answer both ways
    usage = resp.usage  # type: ignore[attr-defined]
    assert usage.completion_tokens > 0
    extra = resp.model_extra  # type: ignore[attr-defined]
    assert extra["cocoon"]["tier"] == "local"
    assert extra["cocoon"]["worker"] == "tiny-worker"
    assert usage.model_extra["cost_nanoton"] == usage.prompt_tokens * 2 + usage.completion_tokens * 10
    assert last is not None
    assert last.usage.completion_tokens == usage.completion_tokens  # type: ignore[attr-defined]
    assert metrics.completion_tokens.value() == 2 * usage.completion_tokens


async def test_models_and_completions_endpoint(api: tuple[str, TorchEngine, Metrics]) -> None:
    base, _, _ = api
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        models = (await c.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        r = await c.post(
            "/v1/completions", json={"model": "tiny", "prompt": "def add", "max_tokens": 8, "temperature": 0}
        )
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] <= 8
        metrics = (await c.get("/metrics")).text
        assert "cocoon_completion_tokens_total" in metrics
        assert 'cocoon_http_responses_total{path="/v1/completions",status="200"} 1' in metrics


async def test_raw_sse_stream(api: tuple[str, TorchEngine, Metrics]) -> None:
    base, _, _ = api
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=base, timeout=30) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([chunk async for chunk in r.aiter_raw()]).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-1]["cocoon"]["cost_nanoton"] > 0
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "missing_model"),
        (
            json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "model_not_found",
        ),
        (
            json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}
            ).encode(),
            400,
            "max_tokens_too_large",
        ),
        (json.dumps({"model": "tiny", "messages": "hello"}).encode(), 400, "invalid_messages"),
        (
            json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "invalid_messages",
        ),
        (
            json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}
            ).encode(),
            400,
            "invalid_type",
        ),
        (
            json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}).encode(),
            400,
            "unsupported_n",
        ),
        (b"x" * 70_000, 413, "request_too_large"),
    ],
)
async def test_garbage_requests_get_openai_errors(
    api: tuple[str, TorchEngine, Metrics], body: bytes, status: int, code: str
) -> None:
    base, _, _ = api
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        r = await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status
        err = r.json()["error"]
        assert err["code"] == code
        assert err["message"]
        # the node keeps serving
        ok = await c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
        )
        assert ok.status_code == 200


async def test_prompt_longer_than_context_is_a_400(api: tuple[str, TorchEngine, Metrics]) -> None:
    base, _, _ = api
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        r = await c.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "def add(a, b): return a + b " * 200, "max_tokens": 5},
        )
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_client_disconnect_cancels_generation(api: tuple[str, TorchEngine, Metrics]) -> None:
    base, engine, _ = api
    body = {"model": "tiny", "prompt": "def", "max_tokens": 200, "stream": True, "stop": ["never-happens"]}
    before = engine.stats().cancelled
    with trio.fail_after(30):
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            async for _ in r.aiter_raw():
                break  # read one event, then hang up
        while engine.stats().cancelled == before or engine.stats().running:
            await engine.wait_idle()
    assert engine.stats().cancelled == before + 1


async def test_api_key_is_required_when_set(tiny_engine: TorchEngine, tmp_path: Path) -> None:  # noqa: F811
    info = await tiny_engine.load()
    app = OpenAIApp(EngineBackend(tiny_engine, info), ApiSettings(api_key="s3cret"), Metrics())
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_api, app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as c:
            r = await c.get("/v1/models")
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            r = await c.get("/v1/models", headers={"authorization": "Bearer s3cret"})
            assert r.status_code == 200
        nursery.cancel_scope.cancel()
