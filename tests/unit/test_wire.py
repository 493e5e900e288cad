"""The wire codec: round trips for every registered message, limits, and garbage."""

from __future__ import annotations

import importlib
import pkgutil
import types
import typing

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from overlay import wire
from overlay.errors import (
    DecodeError,
    FrameTooLarge,
    LocalProtocolError,
    NodeError,
    UnknownMessageType,
    WrongVersion,
)

PACKAGES = ("overlay", "market", "inference", "ton", "node")


def import_all() -> None:
    """Import every module of the project so every message type is registered."""
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)


import_all()


@wire.message(90)
@attrs.frozen
class _Inner:
    a: int
    b: bytes | None = None


@wire.message(91)
@attrs.frozen
class _Outer:
    items: tuple[_Inner, ...] = wire.field(max_items=3)
    name: str = wire.field(max_len=5, default="x")
    ratio: float = 0.5
    flag: bool = False


def _strategy(tp: object, meta: dict[str, int]) -> st.SearchStrategy[object]:
    origin = typing.get_origin(tp)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(1 << 63), (1 << 64) - 1)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is str:
        return st.text(max_size=min(meta.get("max_len", wire.MAX_STR), 40))
    if tp is bytes:
        return st.binary(max_size=min(meta.get("max_len", wire.MAX_BYTES), 80))
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | _strategy(inner, meta)
    if origin is tuple:
        inner_meta = {k: v for k, v in meta.items() if k != "max_items"}
        return st.lists(
            _strategy(typing.get_args(tp)[0], inner_meta), max_size=min(meta.get("max_items", 4), 4)
        ).map(tuple)
    if isinstance(tp, type) and attrs.has(tp):
        return _struct_strategy(tp)
    raise AssertionError(f"no strategy for {tp!r}")


def _struct_strategy(cls: type) -> st.SearchStrategy[object]:
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: _strategy(hints[f.name], dict(f.metadata.get("wire", {})))
        for f in attrs.fields(cls)  # type: ignore[arg-type]
    }

    def build(kwargs: dict[str, object]) -> object:
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, NodeError):
            return None  # the class's own validators refused these values

    return st.fixed_dictionaries(fields).map(build).filter(lambda m: m is not None)


ALL_TYPES = sorted(wire.registered().items())


def test_registry_covers_every_package() -> None:
    tags = dict(ALL_TYPES)
    assert 1 in tags  # ErrorFrame
    for tag, cls in tags.items():
        assert cls.TAG == tag  # type: ignore[attr-defined]


@pytest.mark.parametrize(("tag", "cls"), ALL_TYPES, ids=[c.__name__ for _, c in ALL_TYPES])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(data=st.data())
def test_round_trip_every_registered_type(tag: int, cls: type, data: st.DataObject) -> None:
    msg = data.draw(_struct_strategy(cls))
    try:
        encoded = wire.encode(msg)
    except LocalProtocolError:
        assume(False)  # a drawn value over a limit the type enforces on encode
        return
    assert wire.decode(encoded) == msg
    assert wire.encode(wire.decode(encoded)) == encoded  # canonical


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except DecodeError:
        pass


@settings(max_examples=500, deadline=None)
@given(
    tag=st.sampled_from([t for t, _ in ALL_TYPES]),
    body=st.lists(st.binary(max_size=8) | st.integers(-(1 << 63), (1 << 64) - 1), max_size=12),
)
def test_wrong_bodies_for_real_tags_raise_decode_error(tag: int, body: list[object]) -> None:
    data = msgpack.packb([wire.WIRE_VERSION, tag, body], use_bin_type=True)
    try:
        wire.decode(data)
    except DecodeError:
        pass


def test_limits_and_typed_errors() -> None:
    ok = _Outer((_Inner(1), _Inner(2, b"z")), "abc", 1.25, True)
    assert wire.decode(wire.encode(ok)) == ok
    with pytest.raises(LocalProtocolError):
        wire.encode(_Outer((_Inner(1),) * 4))  # more items than allowed
    with pytest.raises(LocalProtocolError):
        wire.encode(_Outer((), "toolong"))
    too_many = msgpack.packb([1, 91, [[[1, None]] * 4, "a", 0.5, False]], use_bin_type=True)
    with pytest.raises(DecodeError, match="more than 3 items"):
        wire.decode(too_many)
    with pytest.raises(WrongVersion):
        wire.decode(msgpack.packb([2, 91, []]))
    with pytest.raises(UnknownMessageType):
        wire.decode(msgpack.packb([1, 65000, []]))
    with pytest.raises(FrameTooLarge):
        wire.decode(b"\x00" * (wire.MAX_FRAME_SIZE + 1))
    with pytest.raises(DecodeError, match="expected int"):
        wire.decode(msgpack.packb([1, 90, ["1"]]))
    with pytest.raises(DecodeError, match="expected int"):
        wire.decode(msgpack.packb([1, 90, [True]]))  # a bool is not an int on our wire
    with pytest.raises(DecodeError):
        wire.decode(msgpack.packb([1, 90, []]))  # a required field missing
    with pytest.raises(DecodeError):
        wire.decode(msgpack.packb({"a": 1}))
    with pytest.raises(DecodeError):
        wire.decode(msgpack.packb(msgpack.ExtType(1, b"x")))
    with pytest.raises(LocalProtocolError):
        wire.encode(object())
    with pytest.raises(DecodeError, match="expected _Outer"):
        wire.decode_as(_Outer, wire.encode(_Inner(3)))


def test_extra_trailing_fields_are_ignored() -> None:
    """A newer peer may append fields; an older decoder keeps what it knows."""
    data = msgpack.packb([1, 90, [7, b"b", "a field from the future"]], use_bin_type=True)
    assert wire.decode(data) == _Inner(7, b"b")


def test_duplicate_tag_is_refused() -> None:
    with pytest.raises(ValueError, match="already used"):

        @wire.message(90)
        @attrs.frozen
        class _Clash:
            x: int
