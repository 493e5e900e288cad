"""Fast paths of the wire codec agree with the generic codec byte for byte, and each decodes
what the other wrote (a sealed stream's chunks, and a test message with every fast kind)."""

from __future__ import annotations

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.tee.messages import MAX_SEALED, SealedChunk
from overlay import wire
from overlay.errors import DecodeError, LocalProtocolError


@wire.message(97)
@attrs.frozen
class _Flat:
    a: int
    flag: bool
    blob: bytes = attrs.field(metadata=wire.limits(max_len=300))
    b: int


FLAT = wire.fast_path(_Flat)
CHUNK = wire.fast_path(SealedChunk)
INTS = st.one_of(
    st.integers(0, 300),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 2**32 - 1, 2**32, 2**64 - 1]),
    st.integers(-(2**63), -1),  # no fast form: the generic codec writes these
)
BLOBS = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([0, 255, 256, 65535, 65536]).map(bytes),
)


def _generic(msg: object) -> bytes | None:
    try:
        return wire.encode(msg, fast=False)
    except LocalProtocolError:
        return None


def _both_ways(msg: object, fp: wire.FastPath, fields: tuple[object, ...]) -> None:
    generic = _generic(msg)
    fast = fp.pack(*fields)
    if fast is not None:  # the fast form exists: the very same bytes
        assert fast == generic
    if generic is None:  # over a limit: both refuse
        with pytest.raises(LocalProtocolError):
            wire.encode(msg)
        return
    assert wire.encode(msg) == generic
    assert wire.decode(generic) == msg  # fast decoder (or its fallback) reads the generic bytes
    assert wire.decode(generic, fast=False) == msg  # the generic decoder reads the fast bytes
    if all(not isinstance(v, int) or isinstance(v, bool) or v >= 0 for v in fields):
        assert fp.parts(generic) == fields


@settings(max_examples=300, deadline=None)
@given(INTS, st.booleans(), BLOBS, INTS)
def test_a_flat_message_fast_and_generic_agree(a: int, flag: bool, blob: bytes, b: int) -> None:
    _both_ways(_Flat(a, flag, blob, b), FLAT, (a, flag, blob, b))


@settings(max_examples=300, deadline=None)
@given(INTS, st.booleans(), st.one_of(BLOBS, st.sampled_from([MAX_SEALED, MAX_SEALED + 1]).map(bytes)))
def test_sealed_chunks_fast_and_generic_agree(seq: int, final: bool, box: bytes) -> None:
    _both_ways(SealedChunk(seq=seq, final=final, box=box), CHUNK, (seq, final, box))


def _longer(form: int, value: int, size: int) -> bytes:
    return bytes((form,)) + value.to_bytes(size, "big")


@pytest.mark.parametrize(
    "a_bytes",
    [_longer(0xCC, 5, 1), _longer(0xCD, 200, 2), _longer(0xCE, 60000, 4), _longer(0xCF, 2**31, 8)],
)
def test_longer_forms_are_left_to_the_generic_codec(a_bytes: bytes) -> None:
    """msgpack also allows non-shortest forms: the fast parser declines them, the generic codec
    reads them, and both decoders give the same message."""
    value = int.from_bytes(a_bytes[1:], "big")
    data = FLAT.prefix + a_bytes + b"\xc3" + b"\xc5\x00\x02hi" + b"\x07"
    assert FLAT.parts(data) is None
    assert wire.decode(data) == wire.decode(data, fast=False) == _Flat(value, True, b"hi", 7)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_any_bytes_after_a_fast_prefix_decode_the_same_either_way(head: bytes, tail: bytes) -> None:
    data = FLAT.prefix + head + tail
    try:
        generic: object = wire.decode(data, fast=False)
    except DecodeError as e:
        generic = type(e)
    try:
        fast: object = wire.decode(data)
    except DecodeError as e:
        fast = type(e)
    assert fast == generic


def test_only_flat_messages_get_a_fast_path() -> None:
    with pytest.raises(TypeError):
        wire.fast_path(wire.ErrorFrame)  # str fields
    assert wire.fast_path(SealedChunk) is CHUNK  # registered once
    assert msgpack.unpackb(CHUNK.prefix + b"\x00\xc2\xc4\x00") == [1, 321, [0, False, b""]]
