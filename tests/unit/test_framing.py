"""Stream framing core and the in-memory FramedStream shell."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import wire
from overlay.errors import (
    DecodeError,
    FrameTooLarge,
    LocalProtocolError,
    RemoteError,
    StreamBroken,
    TimeoutError_,
)
from overlay.framing import Coalescer, FrameDecoder, encode_frame, uvarint
from overlay.streams import CoalescingWriter, FramedStream, expect, memory_stream_pair


@wire.message(92)
@attrs.frozen
class _Ping:
    n: int


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=300), max_size=20), cuts=st.lists(st.integers(1, 50), max_size=40))
def test_any_chunking_yields_the_same_frames(frames: list[bytes], cuts: list[int]) -> None:
    data = b"".join(encode_frame(f) for f in frames)
    dec = FrameDecoder(max_size=1000)
    out: list[bytes] = []
    pos = 0
    for c in cuts:
        out += dec.feed(data[pos : pos + c])
        pos += c
    out += dec.feed(data[pos:])
    assert out == frames
    assert dec.buffered == 0


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_only_raises_decode_errors(data: bytes) -> None:
    try:
        FrameDecoder(max_size=100).feed(data)
    except DecodeError:
        pass


def test_oversized_frame_refused_from_its_header() -> None:
    dec = FrameDecoder(max_size=100)
    with pytest.raises(FrameTooLarge):
        dec.feed(uvarint(101))  # refused before any payload is buffered
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 101, max_size=100)
    with pytest.raises(DecodeError, match="too long"):
        FrameDecoder(max_size=1 << 70).feed(b"\xff" * 11)
    with pytest.raises(DecodeError, match="non-minimal"):
        FrameDecoder().feed(b"\x80\x00")


def test_uvarint_round_trip() -> None:
    for n in (0, 1, 127, 128, 300, 1 << 20, (1 << 63) - 1):
        enc = uvarint(n)
        dec = FrameDecoder(max_size=1 << 64)
        assert dec.feed(enc) == ([b""] if n == 0 else [])
        assert dec.buffered == (0 if n == 0 else 1)  # header parsed, waiting for n payload bytes
    with pytest.raises(LocalProtocolError):
        uvarint(-1)


def test_coalescer_flushes_on_count_and_deadline() -> None:
    c = Coalescer(max_delay=0.002, max_items=3)
    assert c.deadline() is None
    assert not c.add(0.0)
    assert c.deadline() == pytest.approx(0.002)
    assert not c.add(0.001)
    assert c.add(0.0015)  # third item
    c.flushed()
    assert not c.add(1.0)
    assert c.add(1.003)  # deadline passed


async def test_framed_messages_and_clean_eof() -> None:
    a, b = memory_stream_pair()
    fa, fb = FramedStream(a, peer_id="A"), FramedStream(b, peer_id="B")
    await fa.send(_Ping(1))
    await fa.send_frames([wire.encode(_Ping(2)), wire.encode(_Ping(3))])
    await fa.aclose()
    with trio.fail_after(5):
        assert [m async for m in fb] == [_Ping(1), _Ping(2), _Ping(3)]
        assert await fb.receive() is None


async def test_reset_mid_stream_is_a_typed_error() -> None:
    a, b = memory_stream_pair()
    fa, fb = FramedStream(a), FramedStream(b)
    await a.write(encode_frame(wire.encode(_Ping(1)))[:3])  # half a frame, then the peer vanishes
    await fa.reset()
    with trio.fail_after(5), pytest.raises(StreamBroken):
        await fb.receive()


async def test_eof_mid_frame_is_broken_not_clean() -> None:
    a, b = memory_stream_pair()
    fb = FramedStream(b)
    await a.write(encode_frame(b"0123456789")[:4])
    await a.close()
    with trio.fail_after(5), pytest.raises(StreamBroken, match="mid-frame"):
        await fb.receive_raw()


async def test_oversized_frame_resets_only_that_stream() -> None:
    a, b = memory_stream_pair()
    fb = FramedStream(b, max_frame=64)
    await a.write(uvarint(65))
    with trio.fail_after(5), pytest.raises(FrameTooLarge):
        await fb.receive()
    with pytest.raises(StreamBroken):
        await a.write(b"more")  # the stream was reset


async def test_error_frames_and_wrong_types() -> None:
    a, b = memory_stream_pair()
    fa, fb = FramedStream(a), FramedStream(b)
    await fa.send(wire.ErrorFrame("unknown_model", "no such model"))
    with trio.fail_after(5), pytest.raises(RemoteError) as ei:
        await fb.receive_as(_Ping)
    assert ei.value.code == "unknown_model"
    with pytest.raises(DecodeError):
        expect(_Ping, object())
    await fa.send(wire.ErrorFrame("x", "y"))
    await fa.aclose()
    with trio.fail_after(5):
        assert isinstance(await fb.receive(), wire.ErrorFrame)
        with pytest.raises(StreamBroken, match="before answering"):
            await fb.receive_as(_Ping)


async def test_request_times_out_typed() -> None:
    a, _b = memory_stream_pair()
    fa = FramedStream(a, peer_id="slow")
    with trio.fail_after(5), pytest.raises(TimeoutError_):
        await fa.request(_Ping(1), _Ping, timeout=0.05)


async def test_coalescing_writer_batches_close_items(autojump_clock: trio.testing.MockClock) -> None:
    a, b = memory_stream_pair()
    writer = CoalescingWriter(FramedStream(a), b"|".join, max_delay=0.002, max_items=4)
    reader = FramedStream(b)
    async with trio.open_nursery() as n:
        n.start_soon(writer.run)
        for t in (b"a", b"b", b"c"):  # arrive together: one frame
            await writer.put(t)
        await trio.sleep(0.01)
        for t in (b"d", b"e", b"f", b"g", b"h"):  # more than max_items: two frames
            await writer.put(t)
        await trio.sleep(0.01)
        await writer.put(b"i")
        await writer.aclose()  # flushes the last item
    frames = []
    while (f := await reader.receive_raw()) is not None:
        frames.append(f)
        if f.endswith(b"i"):
            break
    assert frames == [b"a|b|c", b"d|e|f|g", b"h", b"i"]
    assert writer.items_sent == 9
    assert writer.frames_sent == 4
