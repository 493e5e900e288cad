"""The worker's generation service and the client's helper, over any MessageStream.

One stream serves one generation (see :mod:`inference.messages`)::

    handle(stream)                              generate(stream, request)
      receive GenerateRequest  <--------------    send GenerateRequest
      engine.generate_stream -> pump --+
                                       | bounded channel (backpressure)
      sender: coalesce, send  ---------+------>   validate counts, yield chunks
      watcher: EOF / reset / CancelGeneration     (early exit resets the stream)

Three tasks per stream on the worker side:

- the *pump* iterates the engine and puts chunks into a channel of
  ``queue_chunks`` slots.  When the sender is blocked (slow reader, full
  transport window), the pump blocks, the engine keeps this request's
  tokens in its own buffer and, when that is full, leaves it out of the batch:
  a slow reader slows only its own generation;
- the *sender* merges chunks that arrive within ``coalesce_s`` of each
  other (up to ``max_chunk_tokens`` tokens) into one message; the first
  chunk and the final one go out at once;
- the *watcher* reads the client's side: an end of stream, a reset or a
  broken frame cancel the generation (the engine frees its cache slot at
  once); :class:`CancelGeneration` asks the engine to stop, and the client
  still gets a final chunk with reason ``cancelled``.

Errors before the first chunk become one :class:`~overlay.wire.ErrorFrame`
with a stable code; the stream is then closed and the worker goes on
serving.  The service only needs ``send / receive / aclose / reset`` and
``peer_id``, so the confidential-compute layer can hand it a sealed stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing

import attrs
import trio

from overlay import wire
from overlay.errors import (
    DecodeError,
    InferenceError,
    RemoteError,
    RemoteProtocolError,
    StreamBroken,
    TransportError,
)
from overlay.streams import MessageStream

from .engine import Engine, UnknownModel, error_code
from .messages import (
    FINISH_REASONS,
    CancelGeneration,
    Chunk,
    FinalChunk,
    GenerateRequest,
    TokenChunk,
)

__all__ = [
    "PROTOCOL_ID",
    "BillingViolation",
    "ChunkValidator",
    "GenerationService",
    "ServiceStats",
    "generate",
    "merge_chunks",
]

PROTOCOL_ID = "/cocoon/generate/1.0.0"

log = logging.getLogger(__name__)


class BillingViolation(RemoteProtocolError):
    """A worker's chunks do not add up (counts, ids, limits): never pay for them."""


def merge_chunks(a: TokenChunk, b: Chunk) -> Chunk:
    """``a`` followed by ``b`` as one chunk (a FinalChunk stays final)."""
    ids = a.token_ids + b.token_ids
    text = a.text + b.text
    if isinstance(b, FinalChunk):
        return attrs.evolve(b, token_ids=ids, text=text)
    return TokenChunk(a.request_id, ids, text, b.completion_tokens)


@attrs.frozen
class ServiceStats:
    served: int  # generations that ended with a final chunk
    errors: int  # requests answered with an ErrorFrame
    disconnects: int  # clients that went away mid-generation
    messages: int  # chunk messages sent
    tokens: int  # completion tokens sent


class GenerationService:
    """Serves ``GenerateRequest`` streams with the engines it is given (model id -> engine)."""

    def __init__(
        self,
        engines: Mapping[str, Engine],
        *,
        coalesce_s: float = 0.002,
        max_chunk_tokens: int = 64,
        queue_chunks: int = 2,
        request_timeout: float = 30.0,
        stall_timeout: float = 120.0,
    ) -> None:
        self.engines = dict(engines)
        self.coalesce_s = coalesce_s
        self.max_chunk_tokens = max_chunk_tokens
        self.queue_chunks = queue_chunks
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self._served = self._errors = self._disconnects = self._messages = self._tokens = 0

    def statistics(self) -> ServiceStats:
        return ServiceStats(self._served, self._errors, self._disconnects, self._messages, self._tokens)

    # ------------------------------------------------------------------ entry point

    async def handle(self, stream: MessageStream) -> None:
        """Serve one stream to completion; never raises for anything the peer does."""
        peer = {"peer_id": stream.peer_id}
        try:
            with trio.move_on_after(self.request_timeout) as waited:
                msg = await stream.receive()
            if waited.cancelled_caught:
                await self._refuse(stream, "bad_request", f"no request within {self.request_timeout} s")
                return
            if msg is None:
                return
            if not isinstance(msg, GenerateRequest):
                await self._refuse(
                    stream, "bad_request", f"expected GenerateRequest, got {type(msg).__name__}"
                )
                return
            engine = self.engines.get(msg.model)
            if engine is None:
                err = UnknownModel(f"model {msg.model!r} is not served here; have {sorted(self.engines)}")
                await self._refuse(stream, err.code, str(err))
                return
            await self._serve(stream, engine, msg)
        except DecodeError as e:
            log.info("malformed request: %s", e, extra=peer)
            await self._refuse(stream, "bad_request", f"malformed request: {e}")
        except TransportError as e:
            log.info("stream failed: %s", e, extra=peer)
            await stream.reset()

    async def _refuse(self, stream: MessageStream, code: str, message: str) -> None:
        self._errors += 1
        try:
            with trio.move_on_after(5):
                await stream.send(wire.ErrorFrame(code, message[:1024]))
            await stream.aclose()
        except TransportError:
            await stream.reset()

    # ------------------------------------------------------------------ one generation

    async def _serve(self, stream: MessageStream, engine: Engine, req: GenerateRequest) -> None:
        peer = {"peer_id": stream.peer_id, "request_id": req.request_id}
        send_ch, recv_ch = trio.open_memory_channel[Chunk](self.queue_chunks)
        first: list[Chunk] = []
        gen = engine.generate_stream(req)
        # the first chunk decides between an error frame and a stream of chunks
        try:
            first.append(await gen.__anext__())
        except InferenceError as e:
            await gen.aclose()
            await self._refuse(stream, error_code(e), str(e))
            return
        except StopAsyncIteration:
            await self._refuse(stream, "internal", "the engine produced no output")
            return
        done = False  # the final chunk was sent
        gone = False  # the client went away (or something broke) first
        final_out = False  # the final chunk is being sent

        def final_going() -> None:
            nonlocal final_out
            final_out = True

        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                nonlocal gone
                try:
                    async with aclosing(gen), send_ch:
                        await send_ch.send(first[0])
                        async for chunk in gen:
                            await send_ch.send(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the sender is gone; its task reports why
                except Exception:
                    log.exception("engine failed mid-stream", extra=peer)
                    gone = True
                    nursery.cancel_scope.cancel()

            async def sender() -> None:
                nonlocal done, gone
                try:
                    await self._send_loop(stream, recv_ch, final_going)
                    done = True
                except TransportError as e:
                    log.info("client went away while sending: %s", e, extra=peer)
                    gone = True
                except Exception:
                    log.exception("sending chunks failed", extra=peer)
                    gone = True
                nursery.cancel_scope.cancel()

            async def watcher() -> None:
                nonlocal gone
                try:
                    while True:
                        msg = await stream.receive()
                        if isinstance(msg, CancelGeneration) and msg.request_id == req.request_id:
                            await engine.cancel(req.request_id)
                            continue
                        if msg is not None:
                            log.info("unexpected %s mid-generation", type(msg).__name__, extra=peer)
                        break
                except (TransportError, DecodeError) as e:
                    log.info("client stream failed: %s", e, extra=peer)
                if final_out:  # the client read the final chunk and said goodbye; let the sender finish
                    return
                gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump)
            nursery.start_soon(sender)
            nursery.start_soon(watcher)
        if done and not gone:
            self._served += 1
            await stream.aclose()
        else:
            self._disconnects += 1
            await stream.reset()

    async def _send_loop(
        self, stream: MessageStream, chunks: trio.MemoryReceiveChannel[Chunk], final_going: Callable[[], None]
    ) -> None:
        """Send chunks, merging those that arrive within ``coalesce_s``; returns after the final one."""
        first = True
        carry: Chunk | None = None  # a chunk that did not fit into the previous message
        async with chunks:
            while True:
                if carry is not None:
                    chunk, carry = carry, None
                else:
                    try:
                        chunk = await chunks.receive()
                    except trio.EndOfChannel:
                        raise StreamBroken("the engine stopped without a final chunk") from None
                if not first and isinstance(chunk, TokenChunk):
                    with trio.move_on_after(self.coalesce_s):
                        while isinstance(chunk, TokenChunk) and len(chunk.token_ids) < self.max_chunk_tokens:
                            try:
                                nxt = await chunks.receive()
                            except trio.EndOfChannel:
                                break
                            fits = len(chunk.token_ids) + len(nxt.token_ids) <= self.max_chunk_tokens
                            if isinstance(nxt, TokenChunk) and not fits:
                                carry = nxt
                                break
                            chunk = merge_chunks(chunk, nxt)
                first = False
                if isinstance(chunk, FinalChunk):
                    final_going()
                with trio.move_on_after(self.stall_timeout) as sent:
                    await stream.send(chunk)
                if sent.cancelled_caught:
                    raise StreamBroken(f"client read nothing for {self.stall_timeout} s")
                self._messages += 1
                self._tokens += len(chunk.token_ids)
                if isinstance(chunk, FinalChunk):
                    return


# --------------------------------------------------------------------------- the client side


class ChunkValidator:
    """Checks a worker's chunks against the request (pure): what a paying client relies on."""

    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self.completion_tokens = 0
        self.finished = False

    def check(self, msg: object) -> Chunk:
        """The message as a chunk, or BillingViolation / RemoteProtocolError."""
        if self.finished:
            raise RemoteProtocolError("message after the final chunk")
        if not isinstance(msg, TokenChunk | FinalChunk):
            raise RemoteProtocolError(f"expected a chunk, got {type(msg).__name__}")
        rid = self.request.request_id
        if msg.request_id != rid:
            raise RemoteProtocolError(f"chunk for request {msg.request_id!r}, expected {rid!r}")
        expected = self.completion_tokens + len(msg.token_ids)
        if msg.completion_tokens != expected:
            raise BillingViolation(
                f"completion_tokens {msg.completion_tokens} but {expected} token ids were delivered"
            )
        if expected > self.request.max_tokens:
            raise BillingViolation(
                f"{expected} completion tokens exceed max_tokens {self.request.max_tokens}"
            )
        if any(t < 0 for t in msg.token_ids):
            raise RemoteProtocolError("negative token id")
        if isinstance(msg, TokenChunk) and not msg.token_ids:
            raise RemoteProtocolError("a token chunk without tokens")
        if isinstance(msg, FinalChunk):
            if msg.finish_reason not in FINISH_REASONS:
                raise RemoteProtocolError(f"unknown finish reason {msg.finish_reason!r}")
            if msg.prompt_tokens < 0 or min(msg.ttft_s, msg.decode_tok_per_s, msg.queue_s) < 0:
                raise RemoteProtocolError("negative usage figures")
            self.finished = True
        self.completion_tokens = expected
        return msg


async def generate(stream: MessageStream, request: GenerateRequest) -> AsyncGenerator[Chunk, None]:
    """Send ``request`` and yield the worker's validated chunks, the final one last.

    Raises :class:`~overlay.errors.RemoteError` for the worker's error frame,
    :class:`BillingViolation` when the counts do not add up, and
    :class:`~overlay.errors.StreamBroken` when the worker vanishes first.
    Leaving early resets the stream, which cancels the generation.
    """
    validator = ChunkValidator(request)
    await stream.send(request)
    try:
        while not validator.finished:
            msg = await stream.receive()
            if msg is None:
                raise StreamBroken(f"{stream.peer_id or 'worker'} closed the stream before the final chunk")
            if isinstance(msg, wire.ErrorFrame):
                raise RemoteError(msg.code, msg.message)
            yield validator.check(msg)
    finally:
        if validator.finished:
            await stream.aclose()
        else:
            await stream.reset()
