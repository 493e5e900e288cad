"""Framed streams, the trio shell: wire messages over any byte stream.

A :class:`FramedStream` wraps a libp2p ``INetStream`` (or an in-memory
:func:`memory_stream_pair` for unit tests) and moves whole wire messages:

- ``send(msg)`` / ``receive()``: one registered message per frame.
- ``receive()`` returns ``None`` at a clean end of stream (the peer closed at a
  frame boundary); a reset, a connection loss or an end of stream mid-frame
  raise :class:`~overlay.errors.StreamBroken`.
- an oversized or undecodable frame raises the codec's error and resets only
  this stream; the connection keeps serving its other streams.
- an :class:`~overlay.wire.ErrorFrame` from the peer is returned like any
  message; :func:`expect` turns it into :class:`~overlay.errors.RemoteError`.

Every wait is the caller's to bound (``trio.fail_after``); ``request`` bounds
itself with ``timeout``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

from . import wire
from .errors import (
    DecodeError,
    RemoteError,
    StreamBroken,
    StreamClosed,
    TimeoutError_,
)
from .framing import DEFAULT_MAX_FRAME, Coalescer, FrameDecoder, encode_frame

__all__ = [
    "ByteStream",
    "CoalescingWriter",
    "FramedStream",
    "MessageStream",
    "MemoryByteStream",
    "expect",
    "memory_stream_pair",
]

log = logging.getLogger(__name__)
_M = TypeVar("_M")
_READ_SIZE = 64 * 1024


class ByteStream(Protocol):
    """The part of libp2p's ``INetStream`` we use."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


class MessageStream(Protocol):
    """A duplex stream of wire messages: what services are written against.

    :class:`FramedStream` is one; the confidential-compute layer wraps one in a
    sealed stream with the same shape, so services never know the difference.
    """

    peer_id: str

    async def send(self, msg: object) -> None: ...

    async def receive(self) -> object | None: ...

    async def aclose(self) -> None: ...

    async def reset(self) -> None: ...


def _is_eof(exc: BaseException) -> bool:
    return isinstance(exc, EOFError) or type(exc).__name__ in {"StreamEOF", "MuxedStreamEOF"}


class FramedStream:
    """Wire messages over a byte stream, with a maximum frame size."""

    def __init__(self, raw: ByteStream, *, max_frame: int = DEFAULT_MAX_FRAME, peer_id: str = "") -> None:
        self.raw = raw
        self.peer_id = peer_id
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._frames: list[bytes] = []
        self._eof = False
        self._closed = False
        self._send_lock = trio.Lock()

    # ---- sending

    async def send(self, msg: object) -> None:
        await self.send_raw(wire.encode(msg, max_size=self.max_frame))

    async def send_raw(self, payload: bytes) -> None:
        """Send one already-encoded frame payload."""
        await self.send_frames([payload])

    async def send_frames(self, payloads: list[bytes]) -> None:
        """Send several frames in one write (fewer yamux window updates)."""
        if self._closed:
            raise StreamClosed("stream already closed by us")
        data = b"".join(encode_frame(p, self.max_frame) for p in payloads)
        async with self._send_lock:
            try:
                await self.raw.write(data)
            except trio.Cancelled:
                raise
            except Exception as e:
                raise StreamBroken(f"write to {self.peer_id or 'peer'} failed: {type(e).__name__}") from e

    # ---- receiving

    async def receive_raw(self) -> bytes | None:
        """The next frame payload, or None at a clean end of stream."""
        while not self._frames:
            if self._eof:
                return None
            try:
                data = await self.raw.read(_READ_SIZE)
            except trio.Cancelled:
                raise
            except Exception as e:
                if _is_eof(e):
                    data = b""
                else:
                    raise StreamBroken(f"{self.peer_id or 'peer'} went away: {type(e).__name__}") from e
            if not data:
                self._eof = True
                if self._decoder.buffered:
                    raise StreamBroken(f"{self.peer_id or 'peer'} ended the stream mid-frame")
                continue
            try:
                self._frames.extend(self._decoder.feed(data))
            except DecodeError:
                await self.reset()
                raise
        return self._frames.pop(0)

    async def receive(self) -> object | None:
        """The next message, or None at a clean end of stream."""
        payload = await self.receive_raw()
        if payload is None:
            return None
        try:
            return wire.decode(payload, max_size=self.max_frame)
        except DecodeError:
            await self.reset()
            raise

    async def receive_as(self, cls: type[_M]) -> _M:
        """The next message, which must be a ``cls`` (an ErrorFrame raises RemoteError)."""
        msg = await self.receive()
        if msg is None:
            raise StreamBroken(f"{self.peer_id or 'peer'} closed the stream before answering")
        return expect(cls, msg)

    def __aiter__(self) -> FramedStream:
        return self

    async def __anext__(self) -> object:
        msg = await self.receive()
        if msg is None:
            raise StopAsyncIteration
        return msg

    # ---- closing

    async def aclose(self) -> None:
        """Close our side cleanly (the peer reads a clean end of stream)."""
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await self.raw.close()
            except Exception as e:  # closing a dead stream is not an error worth raising
                log.debug("close failed: %s", e, extra={"peer_id": self.peer_id})

    async def reset(self) -> None:
        """Abort the stream (the peer sees StreamBroken)."""
        self._closed = True
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await self.raw.reset()
            except Exception as e:
                log.debug("reset failed: %s", e, extra={"peer_id": self.peer_id})

    async def request(self, msg: object, response: type[_M], timeout: float = 10.0) -> _M:
        """Send ``msg`` and wait at most ``timeout`` seconds for one ``response``."""
        with trio.move_on_after(timeout):
            await self.send(msg)
            return await self.receive_as(response)
        raise TimeoutError_(f"no answer from {self.peer_id or 'peer'} within {timeout} s")


class CoalescingWriter:
    """Sends small items (tokens) so that items arriving within ``max_delay`` share one frame.

    ``await put(item)`` queues an item (backpressure: at most ``buffer`` queued);
    :meth:`run` (start it in a nursery) takes whatever is queued, waits up to
    ``max_delay`` for more (or until ``max_items``), and sends one frame made by
    ``pack(items)``.  ``aclose()`` flushes what is left and ends ``run``.
    """

    def __init__(
        self,
        stream: FramedStream,
        pack: Callable[[list[bytes]], bytes],
        *,
        max_delay: float = 0.002,
        max_items: int = 64,
        buffer: int = 256,
    ) -> None:
        self.stream = stream
        self.pack = pack
        self.max_items = max_items
        self._policy = Coalescer(max_delay, max_items)
        self._send, self._recv = trio.open_memory_channel[bytes](buffer)
        self.frames_sent = 0
        self.items_sent = 0

    async def put(self, item: bytes) -> None:
        await self._send.send(item)

    async def aclose(self) -> None:
        await self._send.aclose()

    async def run(self) -> None:
        async with self._recv:
            while True:
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return
                batch = [first]
                flush = self._policy.add(trio.current_time())
                closed = False
                while not flush:
                    try:
                        batch.append(self._recv.receive_nowait())
                        flush = self._policy.add(trio.current_time())
                        continue
                    except trio.WouldBlock:
                        pass
                    except trio.EndOfChannel:
                        closed = True
                        break
                    deadline = self._policy.deadline()
                    assert deadline is not None
                    with trio.move_on_at(deadline):
                        try:
                            batch.append(await self._recv.receive())
                        except trio.EndOfChannel:
                            closed = True
                            break
                        flush = self._policy.add(trio.current_time())
                        continue
                    flush = True
                self._policy.flushed()
                await self.stream.send_raw(self.pack(batch))
                self.frames_sent += 1
                self.items_sent += len(batch)
                if closed:
                    return


def expect(cls: type[_M], msg: object) -> _M:
    """``msg`` as a ``cls``; an ErrorFrame becomes RemoteError, anything else DecodeError."""
    if isinstance(msg, cls):
        return msg
    if isinstance(msg, wire.ErrorFrame):
        raise RemoteError(msg.code, msg.message)
    raise DecodeError(f"expected {cls.__name__}, got {type(msg).__name__}")


# --------------------------------------------------------------------------- in-memory streams


class MemoryByteStream:
    """One end of an in-memory duplex byte stream with EOF and reset, for unit tests."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes | None],
        recv: trio.MemoryReceiveChannel[bytes | None],
    ) -> None:
        self._send = send
        self._recv = recv
        self.peer: MemoryByteStream | None = None
        self._reset = False
        self._buf = b""

    async def read(self, n: int | None = None) -> bytes:
        if self._reset:
            raise StreamBroken("stream was reset")
        if not self._buf:
            try:
                item = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                item = None
            if item is None:
                if self._reset:
                    raise StreamBroken("stream was reset")
                return b""
            self._buf = item
        n = len(self._buf) if n is None else n
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    async def write(self, data: bytes) -> None:
        if self._reset:
            raise StreamBroken("stream was reset")
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise StreamBroken("peer is gone") from e

    async def close(self) -> None:
        await self._send.aclose()

    async def reset(self) -> None:
        self._reset = True
        await self._send.aclose()
        await self._recv.aclose()
        if self.peer is not None:
            self.peer._reset = True


def memory_stream_pair(buffer: float = math.inf) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected in-memory byte streams (``buffer`` chunks of backpressure each way)."""
    a_send, b_recv = trio.open_memory_channel[bytes | None](buffer)
    b_send, a_recv = trio.open_memory_channel[bytes | None](buffer)
    a = MemoryByteStream(a_send, a_recv)
    b = MemoryByteStream(b_send, b_recv)
    a.peer, b.peer = b, a
    return a, b
