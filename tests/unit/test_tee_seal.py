"""The pure sealing core: HPKE request, numbered chunks, mandatory final; every attack is a SealError."""

from __future__ import annotations

import hashlib

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.tee import new_epoch_keys
from node.tee.claims import EpochKeys
from node.tee.messages import SealedChunk, SealedRequest
from node.tee.seal import (
    CHUNK_PAD,
    ChunkCipher,
    ReplayGuard,
    chunk_parts,
    decode_frame,
    encode_chunk,
    open_request,
    seal_request,
)
from overlay import wire
from overlay.errors import DecodeError, SealError


def _keys(epoch: int = 1) -> EpochKeys:
    return new_epoch_keys(
        tier="none",
        peer_id="worker",
        model_id="tiny",
        model_hash=hashlib.sha256(b"w").digest(),
        epoch=epoch,
        epoch_beacon=bytes(32),
        issued_at=0,
        not_after=10**9,
    )


KEYS = _keys()


def test_round_trip_both_directions() -> None:
    req, client = seal_request(KEYS.claims, b"the prompt")
    assert req.claims_hash == KEYS.claims_hash
    request, worker = open_request(req, KEYS)
    assert request == b"the prompt"
    assert client.stream_id == worker.stream_id == hashlib.sha256(req.sealed).digest()[:16]
    for i in range(5):
        assert client.recv.open(worker.send.seal(b"tok%d" % i)) == b"tok%d" % i
    assert client.recv.open(worker.send.seal(b"", final=True)) == b""
    client.recv.check_end()
    assert worker.recv.open(client.send.seal(b"cancel")) == b"cancel"
    with pytest.raises(SealError):
        worker.recv.check_end()  # the client has not finished


def test_padding_hides_small_length_differences() -> None:
    _, worker = open_request(seal_request(KEYS.claims, b"x")[0], KEYS)
    sizes = {len(worker.send.seal(b"a" * n).box) for n in range(CHUNK_PAD - 1)}
    assert sizes == {CHUNK_PAD + 16}
    req_small, _ = seal_request(KEYS.claims, b"a")
    req_big, _ = seal_request(KEYS.claims, b"a" * 200)
    assert len(req_small.sealed) == len(req_big.sealed)


def test_request_sealed_to_other_claims() -> None:
    other = _keys(epoch=2)
    req, _ = seal_request(KEYS.claims, b"p")
    with pytest.raises(SealError):
        open_request(req, other)  # the worker holds other claims
    relabelled = attrs.evolve(req, claims_hash=other.claims_hash)
    with pytest.raises(SealError):
        open_request(relabelled, other)  # HPKE info binds the claims hash; other key too
    same_key_other_claims = attrs.evolve(other, enc_key=KEYS.enc_key)
    with pytest.raises(SealError):
        open_request(attrs.evolve(req, claims_hash=other.claims_hash), same_key_other_claims)  # info alone


def test_tampered_request() -> None:
    req, _ = seal_request(KEYS.claims, b"p")
    for i in (0, 31, 32, len(req.sealed) - 1):  # the encapsulated key, the ciphertext, the tag
        bad = bytearray(req.sealed)
        bad[i] ^= 1
        with pytest.raises(SealError):
            open_request(attrs.evolve(req, sealed=bytes(bad)), KEYS)
    with pytest.raises(SealError):
        open_request(attrs.evolve(req, sealed=req.sealed[:40]), KEYS)


def _pair() -> tuple[ChunkCipher, ChunkCipher, list[SealedChunk]]:
    req, client = seal_request(KEYS.claims, b"p")
    _, worker = open_request(req, KEYS)
    chunks = [worker.send.seal(b"m%d" % i) for i in range(3)] + [worker.send.seal(b"", final=True)]
    return worker.send, client.recv, chunks


def test_truncation_reorder_replay_and_flag_flips() -> None:
    _, recv, chunks = _pair()
    recv.open(chunks[0])
    with pytest.raises(SealError, match="replayed"):
        recv.open(chunks[0])
    with pytest.raises(SealError, match="reordered"):
        recv.open(chunks[2])
    with pytest.raises(SealError):
        recv.check_end()  # truncated
    _, recv, chunks = _pair()
    with pytest.raises(SealError):
        recv.open(attrs.evolve(chunks[0], final=True))  # the final flag is in the AAD
    _, recv, chunks = _pair()
    with pytest.raises(SealError):
        recv.open(attrs.evolve(chunks[1], seq=0))  # renumbered
    _, recv, chunks = _pair()
    for c in chunks:
        recv.open(c)
    with pytest.raises(SealError, match="after the final"):
        recv.open(chunks[0])
    recv.check_end()


def test_splicing_between_streams_and_directions() -> None:
    _, recv_a, _ = _pair()
    send_b, _, chunks_b = _pair()
    with pytest.raises(SealError):
        recv_a.open(chunks_b[0])  # same seq, another stream
    _, client = seal_request(KEYS.claims, b"p")
    with pytest.raises(SealError):
        client.recv.open(client.send.seal(b"reflected"))  # our own chunk reflected back
    with pytest.raises(SealError):
        send_b.seal(b"more")  # a finished direction refuses to seal


def test_replay_guard() -> None:
    guard = ReplayGuard(capacity=2)
    reqs = [seal_request(KEYS.claims, b"p")[0] for _ in range(3)]
    guard.check(reqs[0])
    with pytest.raises(SealError, match="replayed"):
        guard.check(reqs[0])
    guard.check(reqs[1])
    guard.check(reqs[2])  # evicts reqs[0]
    guard.check(reqs[0])


def test_fast_framing_is_the_wire_encoding() -> None:
    for seq, final, box in [(0, False, b""), (2**40, True, b"x" * 300), (7, False, bytes(70000))]:
        c = SealedChunk(seq=seq, final=final, box=box)
        assert encode_chunk(c) == wire.encode(c)
        assert decode_frame(encode_chunk(c)) == c
        assert chunk_parts(wire.encode(c)) == (seq, final, box)
    req = SealedRequest(claims_hash=bytes(64), sealed=b"s")
    assert chunk_parts(wire.encode(req)) is None
    assert decode_frame(wire.encode(req)) == req
    assert chunk_parts(wire.encode(SealedChunk(seq=1, final=False, box=b"x"))[:-1]) is None
    with pytest.raises(DecodeError):
        decode_frame(wire.encode(SealedChunk(seq=1, final=False, box=b"xy"))[:-1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_any_payloads_round_trip(payloads: list[bytes]) -> None:
    req, client = seal_request(KEYS.claims, b"p")
    _, worker = open_request(req, KEYS)
    for p in payloads:
        assert client.recv.open_frame(worker.send.seal_frame(p)) == p
    assert client.recv.open_frame(worker.send.seal_frame(b"", final=True)) == b""
    client.recv.check_end()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 255), st.sampled_from(["seq", "final", "box"]))
def test_any_tampering_is_a_seal_error(pos: int, mask: int, field: str) -> None:
    _, recv, chunks = _pair()
    c = chunks[1]
    recv.open(chunks[0])
    if field == "seq":
        bad = attrs.evolve(c, seq=c.seq ^ mask)
    elif field == "final":
        bad = attrs.evolve(c, final=not c.final)
    else:
        box = bytearray(c.box)
        box[pos % len(box)] ^= mask
        bad = attrs.evolve(c, box=bytes(box))
    with pytest.raises(SealError):
        recv.open(bad)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_frames_decode_or_raise_typed(data: bytes) -> None:
    try:
        decode_frame(data)
    except DecodeError:
        pass  # the only error garbage may raise


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.integers(0, 300), st.integers(0, 2**63 - 1), st.sampled_from([127, 128, 255, 256, 65535, 65536])
    ),
    st.booleans(),
    st.one_of(st.binary(max_size=300), st.sampled_from([255, 256, 65535, 65536]).map(bytes)),
)
def test_hand_framing_matches_msgpack(seq: int, final: bool, box: bytes) -> None:
    c = SealedChunk(seq=seq, final=final, box=box)
    frame = wire.encode(c)
    assert encode_chunk(c) == frame
    assert chunk_parts(frame) == (seq, final, box)
    assert chunk_parts(frame + b"\0") is None
    assert chunk_parts(frame[:-1]) is None


def test_non_shortest_chunk_takes_the_slow_path() -> None:
    import msgpack

    c = SealedChunk(seq=1, final=False, box=b"x")
    long_form = b"\x93\x01\xcd\x01\x41\x93\xd0\x01\xc2\xc4\x01x"  # seq as int8: valid msgpack, not ours
    assert msgpack.unpackb(long_form) == [1, 321, [1, False, b"x"]]
    assert chunk_parts(long_form) is None
    assert decode_frame(long_form) == c


def test_out_of_range_chunks() -> None:
    _, recv, _ = _pair()
    for seq in (-1, -(2**63), 2**63, 2**64 - 1):
        with pytest.raises(SealError, match="out of range"):
            recv.open(SealedChunk(seq=seq, final=False, box=b"x" * 16))
