"""Wire messages of the generation protocol: round trips, limits, garbage."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.messages import (
    ERROR_CODES,
    FINISH_REASONS,
    MAX_PROMPT_CHARS,
    CancelGeneration,
    ChatMessage,
    FinalChunk,
    GenerateRequest,
    TokenChunk,
)
from overlay import wire
from overlay.errors import DecodeError, LocalProtocolError


def _tag(cls: type) -> int:
    return int(cls.TAG)  # type: ignore[attr-defined]


ids = st.lists(st.integers(0, 1 << 20), max_size=40).map(tuple)
text = st.text(max_size=200)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)

requests = st.builds(
    GenerateRequest,
    request_id=st.text(min_size=1, max_size=64),
    model=st.text(max_size=64),
    max_tokens=st.integers(-5, 1 << 20),
    prompt=st.none() | text,
    messages=st.lists(
        st.builds(ChatMessage, role=st.sampled_from(["user", "system"]), content=text), max_size=5
    ).map(tuple),
    temperature=finite,
    top_p=finite,
    top_k=st.integers(0, 1000),
    seed=st.none() | st.integers(0, (1 << 63) - 1),
    stop=st.lists(st.text(max_size=20), max_size=4).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 1000), max_size=4).map(tuple),
    ignore_eos=st.booleans(),
    continuation=ids,
)
chunks = st.builds(
    TokenChunk,
    request_id=st.text(max_size=64),
    token_ids=ids,
    text=text,
    completion_tokens=st.integers(0, 1 << 40),
)
finals = st.builds(
    FinalChunk,
    request_id=st.text(max_size=64),
    token_ids=ids,
    text=text,
    completion_tokens=st.integers(0, 1 << 30),
    prompt_tokens=st.integers(0, 1 << 30),
    finish_reason=st.sampled_from(sorted(FINISH_REASONS)),
    ttft_s=finite,
    decode_tok_per_s=finite,
    queue_s=finite,
)


@settings(max_examples=200, deadline=None)
@given(msg=st.one_of(requests, chunks, finals, st.builds(CancelGeneration, request_id=st.text(max_size=64))))
def test_round_trip(msg: object) -> None:
    data = wire.encode(msg)
    assert wire.decode(data) == msg
    assert wire.encode(wire.decode(data)) == data  # canonical: what a signature or a seal covers


def test_tags_are_in_the_inference_range() -> None:
    for cls in (GenerateRequest, TokenChunk, FinalChunk, CancelGeneration):
        assert 100 <= _tag(cls) <= 199
    assert {
        "unknown_model",
        "context_length_exceeded",
        "max_tokens_too_large",
        "invalid_sampling",
    } <= ERROR_CODES


def test_limits_are_enforced_both_ways() -> None:
    huge = GenerateRequest("r", "m", 10, prompt="x" * (MAX_PROMPT_CHARS + 1))
    with pytest.raises(LocalProtocolError):
        wire.encode(huge)
    # a forged frame with an oversized prompt is refused by the decoder
    forged = msgpack.packb(
        [wire.WIRE_VERSION, _tag(GenerateRequest), ["r", "m", 10, "x" * (MAX_PROMPT_CHARS + 1)]]
    )
    with pytest.raises(DecodeError, match="prompt"):
        wire.decode(forged)
    too_many = msgpack.packb([wire.WIRE_VERSION, _tag(TokenChunk), ["r", list(range(2000)), "", 2000]])
    with pytest.raises(DecodeError, match="token_ids"):
        wire.decode(too_many)
    wrong_type = msgpack.packb([wire.WIRE_VERSION, _tag(GenerateRequest), ["r", "m", "ten"]])
    with pytest.raises(DecodeError, match="max_tokens"):
        wire.decode(wrong_type)


def test_old_peers_without_new_fields_decode() -> None:
    # a request from a peer that does not know `continuation` (fields travel positionally)
    body = ["r", "m", 10, "hi", [], 1.0, 1.0, 0, None, [], [], False]
    msg = wire.decode(msgpack.packb([wire.WIRE_VERSION, _tag(GenerateRequest), body]))
    assert isinstance(msg, GenerateRequest)
    assert msg.continuation == ()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except DecodeError:
        pass
