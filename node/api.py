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
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import attrs
import trio

from inference.messages import ChatMessage
from overlay.errors import BadRequest, InferenceError, MarketError, NodeError

from .metrics import Metrics

__all__ = [
    "ApiError",
    "ApiSettings",
    "CompletionBackend",
    "Event",
    "EventSender",
    "CompletionRequest",
    "Completed",
    "ModelCard",
    "OpenAIApp",
    "TextDelta",
    "WorkerUse",
    "completion_events",
    "parse_request",
]

log = logging.getLogger(__name__)
Scope = dict[str, object]
Message = dict[str, object]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ApiError(NodeError):
    """An error answered to an HTTP client in OpenAI's format."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", code: str, param: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param or None,
                "code": self.code,
            }
        }


@attrs.frozen
class ApiSettings:
    api_key: str = ""  # when set, "Authorization: Bearer <key>" is required
    max_body: int = 1 << 20  # bytes of one request body
    default_max_tokens: int = 256  # when a request names none
    max_tokens_limit: int = 4096  # refuse larger max_tokens before asking the network


@attrs.frozen
class ModelCard:
    id: str
    owned_by: str = "cocoon"
    workers: int = 0  # live offers
    min_price_completion: int = 0  # nanoTON per completion token: p10 of live offers
    median_price_completion: int = 0
    p90_price_completion: int = 0
    capacity: int = 0  # concurrent requests offered in all
    fills: int = 0  # matches served recently


@attrs.frozen
class CompletionRequest:
    """One parsed request, chat or raw text."""

    model: str
    max_tokens: int
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    max_price_completion: int | None = None  # nanoTON per token (cocoon extension)
    min_tier: str | None = None  # cocoon extension


@attrs.frozen
class TextDelta:
    text: str
    tokens: int  # completion tokens this delta carries


@attrs.frozen
class WorkerUse:
    peer_id: str
    tier: str
    completion_tokens: int
    cost_nanoton: int


@attrs.frozen
class Completed:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cost_nanoton: int
    workers: tuple[WorkerUse, ...]
    ttft_s: float = 0.0
    worker_decode_tok_s: float = 0.0  # the serving engine's own decode speed for this request
    worker_ttft_s: float = 0.0  # the serving engine's own time to first token (prefill, queueing)


Event = TextDelta | Completed
EventSender = trio.MemorySendChannel[Event]


class CompletionBackend(Protocol):
    """What the API asks: the models on offer, and a completion's events.

    ``complete`` sends TextDeltas and then one Completed into ``events``, or
    raises a NodeError.  The API runs it in a task of its own and reads the
    channel, so no nursery or cancel scope ever spans a generator's yield.
    """

    def models(self) -> list[ModelCard]: ...

    async def complete(self, request: CompletionRequest, events: EventSender) -> None: ...


@asynccontextmanager
async def completion_events(
    backend: CompletionBackend, request: CompletionRequest
) -> AsyncIterator[AsyncIterator[Event]]:
    """Run ``backend.complete`` in a task; yield an iterator of its events that re-raises its error."""
    send, recv = trio.open_memory_channel[Event](64)
    failure: list[NodeError] = []

    async def produce() -> None:
        async with send:
            try:
                await backend.complete(request, send)
            except NodeError as e:
                failure.append(e)

    async def consume() -> AsyncIterator[Event]:
        async with recv:
            async for ev in recv:
                yield ev

    body_error: BaseException | None = None
    events = consume()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        try:
            yield events
        except BaseException as e:  # re-raised below, outside the nursery (no ExceptionGroup)
            body_error = e
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
    if failure:
        raise failure[0]


# --------------------------------------------------------------------------- request parsing


def _field(obj: dict[str, object], name: str, kinds: tuple[type, ...], default: object = None) -> object:
    value = obj.get(name, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' has the wrong type", code="invalid_type", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' has the wrong type", code="invalid_type", param=name)
    return value


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ApiError(400, f"{where}: only text content parts are supported", code="invalid_content")
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", code="invalid_content")


def parse_request(body: bytes, *, chat: bool, settings: ApiSettings) -> CompletionRequest:
    """An OpenAI request body -> CompletionRequest; ApiError(400) naming the bad field otherwise."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = _field(obj, "model", (str,))
    if not model:
        raise ApiError(400, "'model' is required", code="missing_model", param="model")
    n = _field(obj, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", code="unsupported_n", param="n")
    max_tokens = _field(obj, "max_completion_tokens", (int,)) or _field(obj, "max_tokens", (int,))
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
    assert isinstance(max_tokens, int)
    if max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be at least 1", code="invalid_max_tokens", param="max_tokens")
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"'max_tokens' is {max_tokens}, the limit is {settings.max_tokens_limit}",
            code="max_tokens_too_large",
            param="max_tokens",
        )
    temperature = _field(obj, "temperature", (int, float), 1.0)
    top_p = _field(obj, "top_p", (int, float), 1.0)
    assert isinstance(temperature, int | float)
    assert isinstance(top_p, int | float)
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(
            400, "'temperature' must be between 0 and 2", code="invalid_temperature", param="temperature"
        )
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, "'top_p' must be in (0, 1]", code="invalid_top_p", param="top_p")
    seed = _field(obj, "seed", (int,))
    stop_raw = obj.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw) and len(stop_raw) <= 4:
        stop = tuple(stop_raw)
    else:
        raise ApiError(400, "'stop' must be a string or up to 4 strings", code="invalid_stop", param="stop")
    stream = _field(obj, "stream", (bool,), False)
    opts = _field(obj, "stream_options", (dict,))
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage") is True)
    max_price = _field(obj, "max_price_nanoton", (int,))
    min_tier = _field(obj, "min_tier", (str,))
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    if chat:
        raw = obj.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ApiError(
                400, "'messages' must be a non-empty list", code="invalid_messages", param="messages"
            )
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in {
                "system",
                "developer",
                "user",
                "assistant",
                "tool",
            }:
                raise ApiError(
                    400, f"messages[{i}] needs a valid role", code="invalid_messages", param="messages"
                )
            role = "system" if m["role"] == "developer" else str(m["role"])
            out.append(ChatMessage(role=role, content=_content_text(m.get("content", ""), f"messages[{i}]")))
        messages = tuple(out)
    else:
        raw_prompt = obj.get("prompt")
        if isinstance(raw_prompt, list) and len(raw_prompt) == 1 and isinstance(raw_prompt[0], str):
            raw_prompt = raw_prompt[0]
        if not isinstance(raw_prompt, str):
            raise ApiError(400, "'prompt' must be a string", code="invalid_prompt", param="prompt")
        prompt = raw_prompt
    return CompletionRequest(
        model=str(model),
        max_tokens=max_tokens,
        messages=messages,
        prompt=prompt,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed if isinstance(seed, int) else None,
        stop=stop,
        stream=bool(stream),
        include_usage=include_usage,
        max_price_completion=max_price if isinstance(max_price, int) else None,
        min_tier=min_tier if isinstance(min_tier, str) else None,
    )


def map_error(exc: BaseException) -> ApiError:
    """Our error tree -> an HTTP status and an OpenAI error object."""
    if isinstance(exc, ApiError):
        return exc
    name = type(exc).__name__
    if name == "UnknownModel":
        return ApiError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, BadRequest):
        code = {
            "ContextLengthExceeded": "context_length_exceeded",
            "MaxTokensTooLarge": "max_tokens_too_large",
            "InvalidSampling": "invalid_sampling",
        }.get(name, "bad_request")
        return ApiError(400, str(exc), code=code)
    if name == "Overloaded":
        return ApiError(503, str(exc), type_="server_error", code="overloaded")
    if isinstance(exc, MarketError):
        return ApiError(503, str(exc), type_="server_error", code="no_worker_available")
    if isinstance(exc, InferenceError | NodeError):
        return ApiError(
            502,
            f"the network could not complete the request: {exc}",
            type_="server_error",
            code="upstream_error",
        )
    return ApiError(500, "internal error", type_="server_error", code="internal")


# --------------------------------------------------------------------------- the ASGI app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _cocoon(done: Completed) -> dict[str, object]:
    return {
        "workers": [attrs.asdict(w) for w in done.workers],
        "worker": done.workers[-1].peer_id if done.workers else None,
        "tier": done.workers[-1].tier if done.workers else None,
        "cost_nanoton": done.cost_nanoton,
        "ttft_ms": round(done.ttft_s * 1000, 2),
        "worker_decode_tok_s": round(done.worker_decode_tok_s, 2),
        "worker_ttft_ms": round(done.worker_ttft_s * 1000, 2),
    }


def _usage(done: Completed) -> dict[str, object]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "cost_nanoton": done.cost_nanoton,
    }


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
                    "finish_reason": _finish(done.finish_reason),
                    "logprobs": None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": content,
                    "finish_reason": _finish(done.finish_reason),
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
                    "usage": _usage(done),
                    "cocoon": _cocoon(done),
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
                        last = chunk({} if chat else "", _finish(ev.finish_reason))
                        last["usage"] = _usage(ev)
                        last["cocoon"] = _cocoon(ev)
                        await event(last)
                        if req.include_usage:
                            usage_only = {
                                "id": rid,
                                "object": obj,
                                "created": created,
                                "model": req.model,
                                "choices": [],
                            }
                            usage_only["usage"] = _usage(ev)
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


async def serve_api(
    app: object,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on host:port (0 = any free port) until cancelled; reports (host, port)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1.0

    async def started(binds: list[str]) -> None:
        return None

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))  # type: ignore[arg-type]
        bound = binds[0].rsplit(":", 1)
        host_out = bound[0].replace("http://", "").strip("[]")
        task_status.started((host_out, int(bound[1])))
