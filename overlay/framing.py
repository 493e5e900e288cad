"""Stream framing, the pure core: unsigned-varint length prefix + payload.

No I/O here.  :class:`FrameDecoder` takes bytes as they arrive and returns
whole frames; it refuses a frame as soon as its header announces more than the
limit, before buffering the payload.  :class:`Coalescer` decides when small
items (tokens) that arrive close together should share one frame.
"""

from __future__ import annotations

from .errors import DecodeError, FrameTooLarge, LocalProtocolError

__all__ = ["DEFAULT_MAX_FRAME", "Coalescer", "FrameDecoder", "encode_frame", "uvarint"]

DEFAULT_MAX_FRAME = 1 << 20  # bytes
_MAX_VARINT_BYTES = 10


def uvarint(n: int) -> bytes:
    """Encode a non-negative int as an unsigned LEB128 varint."""
    if n < 0:
        raise LocalProtocolError("varint must be non-negative")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_frame(payload: bytes, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame: varint(len(payload)) || payload."""
    if len(payload) > max_size:
        raise LocalProtocolError(f"frame of {len(payload)} bytes over the {max_size} limit")
    return uvarint(len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser.  ``feed(data)`` returns the frames completed by ``data``."""

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being read

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame (0 at a frame boundary)."""
        return len(self._buf) + (1 if self._need is not None else 0)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                parsed = self._parse_header()
                if parsed is None:
                    return frames
                self._need = parsed
            if len(self._buf) < self._need:
                return frames
            frames.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None

    def _parse_header(self) -> int | None:
        n = 0
        for i, b in enumerate(self._buf[:_MAX_VARINT_BYTES]):
            n |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if i > 0 and b == 0:
                    raise DecodeError("non-minimal varint frame length")
                if n > self.max_size:
                    raise FrameTooLarge(f"frame of {n} bytes announced, limit {self.max_size}")
                del self._buf[: i + 1]
                return n
            if n > self.max_size:
                raise FrameTooLarge(f"frame length over the {self.max_size} limit")
        if len(self._buf) >= _MAX_VARINT_BYTES:
            raise DecodeError("frame length varint too long")
        return None


class Coalescer:
    """Decides when buffered items are flushed as one frame.

    Items are held until ``max_items`` are buffered, or ``max_delay`` seconds
    passed since the first held item.  Pure: the shell passes ``now`` and asks
    ``deadline()`` when it should wake up.
    """

    def __init__(self, max_delay: float = 0.002, max_items: int = 64) -> None:
        self.max_delay = max_delay
        self.max_items = max_items
        self._first_at: float | None = None
        self._count = 0

    def add(self, now: float) -> bool:
        """Record one item; True when the buffer should be flushed now."""
        if self._first_at is None:
            self._first_at = now
        self._count += 1
        return self._count >= self.max_items or now - self._first_at >= self.max_delay

    def deadline(self) -> float | None:
        """When the held items must go out at the latest (None when empty)."""
        return None if self._first_at is None else self._first_at + self.max_delay

    def flushed(self) -> None:
        self._first_at = None
        self._count = 0
