"""SealedStream: a :class:`~overlay.streams.MessageStream` sealed end to end (trio shell).

Wraps a :class:`~overlay.streams.FramedStream`; services written against
``MessageStream`` (the worker's generation service) run unchanged inside it.

- client: ``SealedStream.client(framed, claims)``; the first ``send`` seals the
  request with HPKE to ``claims.enc_pk`` (a ``SealedRequest``), later sends and
  all receives are numbered ChaCha20-Poly1305 chunks.
- worker: ``await SealedStream.accept(framed, lookup)`` reads the request,
  finds the epoch keys by its claims hash (``ReportProvider.keys_for``), opens
  it; the first ``receive()`` returns the request.
- ``aclose()`` sends the final chunk, then closes; ``receive()`` returns None
  only after the peer's final chunk and a clean end of stream.  The worker's
  final chunk carries a :class:`~node.tee.messages.TranscriptSignature` by its
  attested Ed25519 key over chained hashes of everything sent and received;
  the client checks it and keeps it as ``stream.transcript`` (evidence a
  third party can verify with the claims).  A clean end
  without a final chunk, a forged, replayed, reordered or spliced chunk, or a
  plaintext frame mid-stream raise :class:`~overlay.errors.SealError` and reset
  the stream.  A plaintext ``ErrorFrame`` before any sealed chunk (the worker
  could not open the request) raises ``RemoteError``; it is unauthenticated and
  only ever aborts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from overlay import wire
from overlay.errors import DecodeError, RemoteError, SealError, StreamBroken
from overlay.streams import FramedStream, MessageStream

from .claims import EpochKeys
from .messages import Claims, SealedChunk, SealedRequest, TranscriptSignature
from .seal import (
    ReplayGuard,
    Session,
    Transcript,
    check_transcript,
    open_request,
    seal_request,
    sign_transcript,
)

__all__ = ["KeyLookup", "SealedStream"]

log = logging.getLogger(__name__)

KeyLookup = Callable[[bytes], EpochKeys | None]


class SealedStream:
    """A message stream whose payloads only the two ends can read."""

    def __init__(
        self,
        framed: FramedStream,
        *,
        claims: Claims | None = None,
        session: Session | None = None,
        keys: EpochKeys | None = None,
    ) -> None:
        self.framed = framed
        self.peer_id: str = framed.peer_id
        self._claims = claims  # client side: whom we seal to
        self._keys = keys  # worker side: the epoch keys that opened the request
        self._session = session
        self._sent = Transcript(keep_history=keys is None)
        self._received = Transcript()
        self.transcript: TranscriptSignature | None = None  # client side, once the worker's final verified
        self._first: object | None = None
        self._started = trio.Event()
        if session is not None:
            self._started.set()
        self._send_lock = trio.Lock()
        self._got_chunk = False
        self._final_sent = False
        self._dead = False

    @property
    def stream_id(self) -> bytes:
        """SHA-256(sealed request)[:16]; b"" until the request went out."""
        return b"" if self._session is None else self._session.stream_id

    # ---- opening

    @classmethod
    def client(cls, framed: FramedStream, claims: Claims) -> SealedStream:
        """The client end, sealing to ``claims`` (already verified by the caller)."""
        return cls(framed, claims=claims)

    @classmethod
    async def accept(
        cls, framed: FramedStream, lookup: KeyLookup, *, replay: ReplayGuard | None = None
    ) -> SealedStream:
        """The worker end: read and open the request; on failure an ErrorFrame to the peer, then SealError."""
        msg = await framed.receive()
        if msg is None:
            raise StreamBroken(f"{framed.peer_id or 'peer'} closed before sending a request")
        try:
            if not isinstance(msg, SealedRequest):
                raise SealError(f"expected a SealedRequest, got {type(msg).__name__}")
            keys = lookup(msg.claims_hash)
            if keys is None:
                raise SealError("request sealed to claims this worker does not hold (other or expired epoch)")
            payload, session = open_request(msg, keys)
            if replay is not None:
                replay.check(msg)
            first = wire.decode(payload)
        except (SealError, DecodeError) as e:
            log.info("refused a sealed request: %s", e, extra={"peer_id": framed.peer_id})
            try:
                await framed.send(wire.ErrorFrame(code="seal_error", message=str(e)[:200]))
                await framed.aclose()
            except StreamBroken:
                pass
            raise SealError(str(e)) from e
        stream = cls(framed, session=session, keys=keys)
        stream._received.add(payload)
        stream._first = first
        return stream

    # ---- MessageStream

    async def send(self, msg: object) -> None:
        data = wire.encode(msg, max_size=self.framed.max_frame)
        async with self._send_lock:
            if self._session is None:
                assert self._claims is not None
                request, self._session = seal_request(self._claims, data)
                self._sent.add(data)
                await self.framed.send(request)
                self._started.set()
                return
            frame = self._session.send.seal_frame(data)
            self._sent.add(data)
            await self.framed.send_raw(frame)

    async def receive(self) -> object | None:
        """The next message; None after the peer's final chunk and a clean end of stream."""
        if self._first is not None:
            first, self._first = self._first, None
            return first
        await self._started.wait()
        assert self._session is not None
        recv = self._session.recv
        while True:
            payload = await self.framed.receive_raw()
            try:
                if payload is None:
                    recv.check_end()
                    return None
                data = recv.open_frame(payload)
                if data is None:
                    data = recv.open(self._not_fast(payload))
                if recv.finished:
                    self._end(data)
                    continue  # after the final chunk: read the clean end of stream
            except SealError:
                await self.reset()
                raise
            self._got_chunk = True
            self._received.add(data)
            return wire.decode(data)

    def _end(self, data: bytes) -> None:
        """The peer's final chunk: the client checks the worker's transcript signature in it."""
        if self._keys is not None:  # worker side: the client's final is bare
            if data:
                raise SealError("data in the client's final chunk")
            return
        assert self._claims is not None
        assert self._session is not None
        try:
            t = wire.decode_as(TranscriptSignature, data)
        except DecodeError as e:
            raise SealError(f"the worker's final chunk holds no transcript signature: {e}") from e
        check_transcript(
            t, self._claims, stream_id=self._session.stream_id, received=self._received, sent=self._sent
        )
        self.transcript = t

    def _not_fast(self, payload: bytes) -> SealedChunk:
        """A frame off the fast path: a chunk in another msgpack form, or an early ErrorFrame (raised)."""
        try:
            msg = wire.decode(payload)
        except DecodeError as e:
            raise SealError(f"unsealed garbage in a sealed stream: {e}") from e
        if isinstance(msg, SealedChunk):
            return msg
        if isinstance(msg, wire.ErrorFrame) and not self._got_chunk:
            raise RemoteError(msg.code, msg.message)
        raise SealError(f"unsealed {type(msg).__name__} in a sealed stream")

    async def aclose(self) -> None:
        """Send our final chunk (if the stream started), then close our side."""
        async with self._send_lock:
            if self._session is not None and not self._final_sent and not self._dead:
                self._final_sent = True
                final = b""
                if self._keys is not None:
                    t = sign_transcript(self._keys, self._session.stream_id, self._sent, self._received)
                    final = wire.encode(t)
                try:
                    await self.framed.send_raw(self._session.send.seal_frame(final, final=True))
                except (StreamBroken, SealError) as e:
                    log.debug("final chunk not sent: %s", e, extra={"peer_id": self.peer_id})
        await self.framed.aclose()

    async def reset(self) -> None:
        self._dead = True
        await self.framed.reset()

    def __aiter__(self) -> SealedStream:
        return self

    async def __anext__(self) -> object:
        msg = await self.receive()
        if msg is None:
            raise StopAsyncIteration
        return msg


def _is_message_stream(stream: SealedStream) -> MessageStream:
    return stream  # mypy checks that SealedStream satisfies the MessageStream protocol
