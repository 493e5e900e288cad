"""The client's OpenAI-compatible HTTP API (an ASGI app served by hypercorn on trio).

Endpoints::

    GET  /v1/models             models offered on the network
    POST /v1/chat/completions   chat (``stream: true`` -> server-sent events)
    POST /v1/completions        raw text completion (same streaming rules)
    GET  /metrics               Prometheus text exposition
    GET  /healthz               liveness

Every response carries OpenAI's shapes plus what this network adds: ``usage``
has ``cost_nanoton``, and a top-level ``cocoon`` object names the worker(s),
their confidentiality tier and what each was paid.  Errors use OpenAI's format
``{"error": {"message", "type", "param", "code"}}`` with the usual status codes;
an error after a stream has started is sent as a final SSE event.  A client
that disconnects cancels its generation (and stops paying for it).

The app knows nothing about the network: it calls a :class:`CompletionBackend`
(the client node's network backend, or a local engine in tests and benchmarks).

This module is the ASGI app (routing, bodies, SSE); what it asks the network is in
:mod:`node.completion`, OpenAI's request, error and usage formats in :mod:`node.apiformat`,
hypercorn serving in :mod:`node.asgi`. Their public names are re-exported here.
"""

from __future__ import annotations

import json
import logging
import secrets
import time

import trio

from overlay.errors import NodeError

from .apiformat import ApiError as ApiError
from .apiformat import ApiSettings as ApiSettings
from .apiformat import cocoon_object, finish_reason, map_error, usage_object
from .apiformat import parse_request as parse_request
from .asgi import Receive, Scope, Send
from .asgi import serve_api as serve_api
from .completion import Completed as Completed
from .completion import CompletionBackend as CompletionBackend
from .completion import CompletionRequest as CompletionRequest
from .completion import Event as Event
from .completion import EventSender as EventSender
from .completion import ModelCard as ModelCard
from .completion import TextDelta as TextDelta
from .completion import WorkerUse as WorkerUse
from .completion import completion_events as completion_events
from .metrics import Metrics

__all__ = [
    "ApiError",
    "ApiSettings",
    "Completed",
    "CompletionBackend",
    "CompletionRequest",
    "Event",
    "EventSender",
    "ModelCard",
    "OpenAIApp",
    "TextDelta",
    "WorkerUse",
    "completion_events",
    "parse_request",
    "serve_api",
]

log = logging.getLogger(__name__)


class OpenAIApp:
    """The ASGI application."""

    def __init__(self, backend: CompletionBackend, settings: ApiSettings, metrics: Metrics) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method = str(scope.get("method", "GET"))
        path = str(scope.get("path", "/"))
        started = time.perf_counter()
        status = 500
        try:
            status = await self._route(method, path, scope, receive, send)
        except ApiError as e:
            status = e.status
            await self._json(send, e.status, e.body())
        finally:
            self.metrics.observe_http(path, status, time.perf_counter() - started)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, method: str, path: str, scope: Scope, receive: Receive, send: Send) -> int:
        if path == "/healthz":
            await self._json(send, 200, {"status": "ok"})
            return 200
        if path == "/metrics" and method == "GET":
            body = self.metrics.render().encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return 200
        if not path.startswith("/v1/"):
            raise ApiError(404, f"no route {path}", code="not_found")
        self._check_key(scope)
        if path == "/v1/models":
            if method != "GET":
                raise ApiError(405, "use GET", code="method_not_allowed")
            data = [
                {
                    "id": m.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": m.owned_by,
                    "cocoon": {
                        "workers": m.workers,
                        "capacity": m.capacity,
                        "min_price_completion": m.min_price_completion,
                        "median_price_completion": m.median_price_completion,
                        "p90_price_completion": m.p90_price_completion,
                        "fills": m.fills,
                    },
                }
                for m in self.backend.models()
            ]
            await self._json(send, 200, {"object": "list", "data": data})
            return 200
        if path in ("/v1/chat/completions", "/v1/completions"):
            if method != "POST":
                raise ApiError(405, "use POST", code="method_not_allowed")
            body = await self._read_body(scope, receive)
            req = parse_request(body, chat=path == "/v1/chat/completions", settings=self.settings)
            self.metrics.requests.inc()
            return await self._complete(req, path == "/v1/chat/completions", receive, send)
        raise ApiError(404, f"no route {path}", code="not_found")

    def _check_key(self, scope: Scope) -> None:
        if not self.settings.api_key:
            return
        headers = dict(scope.get("headers", []))  # type: ignore[call-overload]
        auth = headers.get(b"authorization", b"").decode("latin-1")
        expected = f"Bearer {self.settings.api_key}"
        if not secrets.compare_digest(auth.encode(), expected.encode()):
            raise ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer ...)",
                type_="authentication_error",
                code="invalid_api_key",
            )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        headers = dict(scope.get("headers", []))  # type: ignore[call-overload]
        length = headers.get(b"content-length")
        limit = self.settings.max_body
        if length is not None:
            try:
                if int(length) > limit:
                    raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
            except ValueError as e:
                raise ApiError(400, "bad Content-Length", code="invalid_request") from e
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ApiError(400, "client went away", code="client_disconnected")
            chunk = msg.get("body", b"")
            assert isinstance(chunk, bytes)
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def _json(self, send: Send, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _complete(self, req: CompletionRequest, chat: bool, receive: Receive, send: Send) -> int:
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if not req.stream:
            text: list[str] = []
            done: Completed | None = None
            try:
                async with completion_events(self.backend, req) as events:
                    async for ev in events:
                        if isinstance(ev, TextDelta):
                            text.append(ev.text)
                        else:
                            done = ev
            except NodeError as e:
                err = map_error(e)
                self.metrics.errors.inc()
                await self._json(send, err.status, err.body())
                return err.status
            if done is None:
                raise ApiError(
                    502,
                    "the worker ended without a final answer",
                    type_="server_error",
                    code="upstream_error",
                )
            self.metrics.completed(done)
            content = "".join(text)
            choice: dict[str, object]
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason(done.finish_reason),
                    "logprobs": None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": content,
                    "finish_reason": finish_reason(done.finish_reason),
                    "logprobs": None,
                }
            await self._json(
                send,
                200,
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": req.model,
                    "choices": [choice],
                    "usage": usage_object(done),
                    "cocoon": cocoon_object(done),
                },
            )
            return 200
        return await self._stream(req, chat, rid, created, receive, send)

    async def _stream(
        self, req: CompletionRequest, chat: bool, rid: str, created: int, receive: Receive, send: Send
    ) -> int:
        obj = "chat.completion.chunk" if chat else "text_completion"
        started = False

        async def event(payload: object) -> None:
            nonlocal started
            if not started:
                started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream"),
                            (b"cache-control", b"no-cache"),
                        ],
                    }
                )
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await send(
                {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}
            )

        def chunk(delta: dict[str, object] | str, finish: str | None) -> dict[str, object]:
            choice: dict[str, object]
            if chat:
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}

        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        log.info("API client disconnected; cancelling its generation")
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_disconnect)
            try:
                first = True
                async with completion_events(self.backend, req) as events:
                    async for ev in events:
                        if isinstance(ev, TextDelta):
                            if chat:
                                delta: dict[str, object] | str = {"content": ev.text}
                                if first:
                                    delta = {"role": "assistant", "content": ev.text}
                            else:
                                delta = ev.text
                            first = False
                            await event(chunk(delta, None))
                            continue
                        self.metrics.completed(ev)
                        last = chunk({} if chat else "", finish_reason(ev.finish_reason))
                        last["usage"] = usage_object(ev)
                        last["cocoon"] = cocoon_object(ev)
                        await event(last)
                        if req.include_usage:
                            usage_only = {
                                "id": rid,
                                "object": obj,
                                "created": created,
                                "model": req.model,
                                "choices": [],
                            }
                            usage_only["usage"] = usage_object(ev)
                            await event(usage_only)
            except NodeError as e:
                err = map_error(e)
                self.metrics.errors.inc()
                if not started:
                    await self._json(send, err.status, err.body())
                    nursery.cancel_scope.cancel()
                    return err.status
                await event(err.body())
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()
        return 200
