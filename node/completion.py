"""What the HTTP API asks of the network, and what it gets back (no HTTP here).

A :class:`CompletionBackend` (the client node's network backend, or a local engine in tests and
benchmarks) lists :class:`ModelCard` s and runs one :class:`CompletionRequest`, sending
:class:`TextDelta` s and then one :class:`Completed` into an :data:`EventSender`;
:func:`completion_events` runs it in a task of its own and hands the events to the API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import attrs
import trio

from inference.messages import ChatMessage
from overlay.errors import NodeError

__all__ = [
    "Completed",
    "CompletionBackend",
    "CompletionRequest",
    "Event",
    "EventSender",
    "ModelCard",
    "TextDelta",
    "WorkerUse",
    "completion_events",
]


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
    path: str = "direct"  # how the client reached the worker: direct | relayed


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
