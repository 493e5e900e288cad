"""The wire codec: one versioned msgpack envelope for every message of the project.

A message is a frozen ``attrs`` class registered with :func:`message` under a
unique integer tag.  Its fields are typed with a small vocabulary (``int``,
``float``, ``str``, ``bytes``, ``bool``, ``X | None``, ``tuple[X, ...]`` and
nested attrs structs) and every ``str``/``bytes``/``tuple`` field has a hard
size limit (defaults below, per-field override with :func:`field`).

Envelope::

    msgpack array [WIRE_VERSION, tag, [field_1, field_2, ...]]

Fields travel positionally, in declaration order; nested structs travel as
arrays of their own fields.  A decoder ignores extra trailing fields, so a
newer peer may append optional fields.  Encoding is deterministic, so
``encode(body)`` is also the canonical form that signatures cover.

Tag ranges (one per package, so packages never collide)::

    1-99     overlay (error frames, pings, stream control)
    100-199  inference (generation requests, token chunks)
    200-299  market (offers, candidacies, verdicts, match requests)
    300-399  confidential compute (claims, reports, sealed frames)
    400-499  ton (channel states, receipts, chain RPC)
    500-599  node (status, API glue)

Every failure to decode raises :class:`~overlay.errors.DecodeError` (or a
subclass); random bytes never raise anything else.

Fast paths: a message whose fields are all ``int`` (unsigned), ``bool`` or ``bytes`` can be
registered with :func:`fast_path` (a sealed stream's chunks are). :class:`FastPath` packs and
parses its envelope by hand, in msgpack's shortest forms, so its bytes are exactly what the
generic codec writes; :func:`encode` and :func:`decode` use it, and any other form (a negative
int, a longer encoding) goes through the generic codec, which reads both.
"""

from __future__ import annotations

import math
import struct
import types
import typing
from collections.abc import Callable
from typing import ClassVar, TypeVar, Union

import attrs
import msgpack

from .errors import (
    DecodeError,
    FrameTooLarge,
    LocalProtocolError,
    UnknownMessageType,
    WrongVersion,
)

__all__ = [
    "MAX_BYTES",
    "MAX_FRAME_SIZE",
    "MAX_ITEMS",
    "MAX_STR",
    "WIRE_VERSION",
    "ErrorFrame",
    "FastPath",
    "Message",
    "decode",
    "decode_as",
    "encode",
    "fast_path",
    "field",
    "limits",
    "message",
    "registered",
]

WIRE_VERSION = 1
MAX_FRAME_SIZE = 1 << 20  # bytes: hard limit of one encoded message (1 MiB)
MAX_BYTES = 64 * 1024  # bytes: default limit of one bytes field
MAX_STR = 4 * 1024  # characters: default limit of one str field
MAX_ITEMS = 256  # default limit of one tuple field's length
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1

_M = TypeVar("_M")

Encoder = Callable[[object], object]
Decoder = Callable[[object], object]


class Message(typing.Protocol):
    """What every registered message looks like to the type checker."""

    TAG: ClassVar[int]


def field(
    *,
    max_len: int | None = None,
    max_items: int | None = None,
    default: object = attrs.NOTHING,
) -> typing.Any:
    """An attrs field with wire limits: ``max_len`` for str/bytes, ``max_items`` for tuples."""
    meta: dict[str, int] = {}
    if max_len is not None:
        meta["max_len"] = max_len
    if max_items is not None:
        meta["max_items"] = max_items
    return attrs.field(default=default, metadata={"wire": meta})


def limits(*, max_len: int | None = None, max_items: int | None = None) -> dict[str, dict[str, int]]:
    """Wire limits as attrs metadata: ``x: str = attrs.field(metadata=wire.limits(max_len=64))``.

    Unlike :func:`field`, this keeps mypy's attrs plugin exact about which fields have defaults.
    """
    meta: dict[str, int] = {}
    if max_len is not None:
        meta["max_len"] = max_len
    if max_items is not None:
        meta["max_items"] = max_items
    return {"wire": meta}


_BY_TAG: dict[int, type] = {}
_BY_CLS: dict[type, int] = {}
_CODECS: dict[type, tuple[Encoder, Decoder]] = {}


def message(tag: int) -> Callable[[type[_M]], type[_M]]:
    """Register an attrs class under ``tag``; use above ``@attrs.frozen``."""

    def register(cls: type[_M]) -> type[_M]:
        if not attrs.has(typing.cast(type, cls)):
            raise TypeError(f"{cls.__name__} must be an attrs class")
        if not 0 < tag < 1 << 16:
            raise ValueError(f"tag {tag} out of range")
        other = _BY_TAG.get(tag)
        if other is not None and other is not cls:
            raise ValueError(f"tag {tag} already used by {other.__name__}")
        _BY_TAG[tag] = cls
        _BY_CLS[cls] = tag
        cls.TAG = tag  # type: ignore[attr-defined]
        return cls

    return register


def registered() -> dict[int, type]:
    """A copy of the registry (tag -> class), for tests and tools."""
    return dict(_BY_TAG)


# --------------------------------------------------------------------------- schema


def _fail(path: str, what: str) -> typing.NoReturn:
    raise DecodeError(f"{path}: {what}")


def _scalar(kind: type, limit: int, path: str) -> tuple[Encoder, Decoder]:
    def check(v: object) -> object:
        if kind is int:
            if type(v) is not int:
                _fail(path, f"expected int, got {type(v).__name__}")
            if not _INT_MIN <= v <= _INT_MAX:
                _fail(path, "int out of range")
        elif kind is float:
            if type(v) is int:
                v = float(v)
            if type(v) is not float:
                _fail(path, f"expected float, got {type(v).__name__}")
            if not math.isfinite(v):
                _fail(path, "float not finite")
        elif kind is bool:
            if type(v) is not bool:
                _fail(path, f"expected bool, got {type(v).__name__}")
        elif kind is str:
            if type(v) is not str:
                _fail(path, f"expected str, got {type(v).__name__}")
            if len(v) > limit:
                _fail(path, f"str longer than {limit}")
        elif kind is bytes:
            if type(v) is not bytes:
                _fail(path, f"expected bytes, got {type(v).__name__}")
            if len(v) > limit:
                _fail(path, f"bytes longer than {limit}")
        return v

    return check, check


def _compile_type(tp: object, meta: dict[str, int], path: str) -> tuple[Encoder, Decoder]:
    origin = typing.get_origin(tp)
    if tp in (int, float, bool):
        return _scalar(typing.cast(type, tp), 0, path)
    if tp is str:
        return _scalar(str, meta.get("max_len", MAX_STR), path)
    if tp is bytes:
        return _scalar(bytes, meta.get("max_len", MAX_BYTES), path)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"{path}: only `X | None` unions are supported")
        enc, dec = _compile_type(args[0], meta, path)

        def enc_opt(v: object) -> object:
            return None if v is None else enc(v)

        def dec_opt(v: object) -> object:
            return None if v is None else dec(v)

        return enc_opt, dec_opt
    if origin is tuple:
        targs = typing.get_args(tp)
        if len(targs) != 2 or targs[1] is not Ellipsis:
            raise TypeError(f"{path}: only tuple[X, ...] is supported")
        limit = meta.get("max_items", MAX_ITEMS)
        inner_meta = {k: v for k, v in meta.items() if k != "max_items"}
        ienc, idec = _compile_type(targs[0], inner_meta, path + "[]")

        def enc_seq(v: object) -> object:
            if not isinstance(v, tuple | list):
                _fail(path, "expected a sequence")
            if len(v) > limit:
                _fail(path, f"more than {limit} items")
            return [ienc(x) for x in v]

        def dec_seq(v: object) -> object:
            if not isinstance(v, tuple | list):
                _fail(path, f"expected array, got {type(v).__name__}")
            if len(v) > limit:
                _fail(path, f"more than {limit} items")
            return tuple(idec(x) for x in v)

        return enc_seq, dec_seq
    if isinstance(tp, type) and attrs.has(tp):
        return _struct_codec(tp)
    raise TypeError(f"{path}: unsupported wire type {tp!r}")


def _struct_codec(cls: type) -> tuple[Encoder, Decoder]:
    cached = _CODECS.get(cls)
    if cached is not None:
        return cached
    # Placeholder for recursive structs: resolved through the cache at call time.
    _CODECS[cls] = (lambda v: _CODECS[cls][0](v), lambda v: _CODECS[cls][1](v))
    hints = typing.get_type_hints(cls)
    fields = attrs.fields(cls)
    compiled: list[tuple[str, Encoder, Decoder, bool]] = []
    for f in fields:
        meta = dict(f.metadata.get("wire", {}))
        enc, dec = _compile_type(hints[f.name], meta, f"{cls.__name__}.{f.name}")
        compiled.append((f.name, enc, dec, f.default is not attrs.NOTHING))
    n_required = sum(1 for c in compiled if not c[3])
    name = cls.__name__

    def enc_struct(v: object) -> object:
        if type(v) is not cls:
            raise DecodeError(f"{name}: expected {name}, got {type(v).__name__}")
        return [e(getattr(v, n)) for n, e, _, _ in compiled]

    def dec_struct(v: object) -> object:
        if not isinstance(v, tuple | list):
            _fail(name, f"expected array, got {type(v).__name__}")
        if len(v) < n_required:
            _fail(name, f"{len(v)} fields, {n_required} required")
        kwargs = {n: d(x) for (n, _, d, _), x in zip(compiled, v, strict=False)}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:  # attrs validators of the message itself
            raise DecodeError(f"{name}: {e}") from e

    _CODECS[cls] = (enc_struct, dec_struct)
    return enc_struct, dec_struct


# --------------------------------------------------------------------------- codec


def encode(msg: object, *, max_size: int = MAX_FRAME_SIZE, fast: bool = True) -> bytes:
    """Encode a registered message into one envelope; raises LocalProtocolError if it breaks a limit.
    ``fast=False``: never the message's fast path (the same bytes, by the generic codec)."""
    cls = type(msg)
    fp = _FAST.get(cls) if fast else None
    if fp is not None:
        quick = fp.pack_message(msg)
        if quick is not None and len(quick) <= max_size:
            return quick
    tag = _BY_CLS.get(cls)
    if tag is None:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message")
    enc, _ = _struct_codec(cls)
    try:
        body = enc(msg)
    except DecodeError as e:
        raise LocalProtocolError(f"cannot encode: {e}") from e
    data: bytes = msgpack.packb([WIRE_VERSION, tag, body], use_bin_type=True, strict_types=False)
    if len(data) > max_size:
        raise LocalProtocolError(f"{cls.__name__} is {len(data)} bytes, over the {max_size} limit")
    return data


def _no_ext(code: int, data: bytes) -> object:
    raise DecodeError(f"msgpack ext type {code} not allowed")


def decode(data: bytes, *, max_size: int = MAX_FRAME_SIZE, fast: bool = True) -> object:
    """Decode one envelope; every failure is a DecodeError (or subclass). ``fast=False``: never
    a fast path (the generic codec alone)."""
    if len(data) > max_size:
        raise FrameTooLarge(f"frame of {len(data)} bytes over the {max_size} limit")
    if fast and _FAST_PREFIXES:
        fp = _FAST_PREFIXES.get(data[:4]) or _FAST_PREFIXES.get(data[:6])
        if fp is not None:
            parts = fp.parts(data)
            if parts is not None:
                return fp.build(parts)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=1 << 16,
            max_map_len=0,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except DecodeError:
        raise
    except Exception as e:  # msgpack raises a zoo of types on garbage
        raise DecodeError(f"not a msgpack envelope: {type(e).__name__}") from e
    if not isinstance(obj, tuple) or len(obj) != 3:
        raise DecodeError("envelope must be [version, tag, body]")
    version, tag, body = obj
    if type(version) is not int:
        raise DecodeError("envelope version must be an int")
    if version != WIRE_VERSION:
        raise WrongVersion(f"wire version {version}, we speak {WIRE_VERSION}")
    if type(tag) is not int:
        raise DecodeError("envelope tag must be an int")
    cls = _BY_TAG.get(tag)
    if cls is None:
        raise UnknownMessageType(f"unknown message tag {tag}")
    _, dec = _struct_codec(cls)
    return dec(body)


def decode_as(cls: type[_M], data: bytes, *, max_size: int = MAX_FRAME_SIZE) -> _M:
    """Decode and check the message is a ``cls``; anything else is a DecodeError."""
    msg = decode(data, max_size=max_size)
    if not isinstance(msg, cls):
        raise DecodeError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg


# --------------------------------------------------------------------------- fast paths

_FAST: dict[type, FastPath] = {}
_FAST_PREFIXES: dict[bytes, FastPath] = {}
_U8, _U16, _U32, _U64 = (struct.Struct(f">{c}") for c in "BHIQ")
_FIXINTS = tuple(bytes((i,)) for i in range(0x80))
_UINT_FORMS = {0xCC: _U8, 0xCD: _U16, 0xCE: _U32, 0xCF: _U64}
_BIN_FORMS = {0xC4: _U8, 0xC5: _U16, 0xC6: _U32}
_FLAGS = (b"\xc2", b"\xc3")


def _pack_uint(v: int) -> bytes:
    if v < 0x80:
        return _FIXINTS[v]
    if v <= 0xFF:
        return b"\xcc" + _U8.pack(v)
    if v <= 0xFFFF:
        return b"\xcd" + _U16.pack(v)
    if v <= 0xFFFFFFFF:
        return b"\xce" + _U32.pack(v)
    return b"\xcf" + _U64.pack(v)


def _bin_header(n: int) -> bytes:
    return (
        b"\xc4" + _U8.pack(n)
        if n <= 0xFF
        else b"\xc5" + _U16.pack(n)
        if n <= 0xFFFF
        else b"\xc6" + _U32.pack(n)
    )


class FastPath:
    """The hand-written codec of one message whose fields are unsigned ints, bools and bytes.

    :meth:`pack` returns the envelope the generic codec would write for these values (None when
    a value is outside the fast forms: a negative int, a wrong type); :meth:`parts` returns the
    field values of an envelope in shortest forms within the field limits (None otherwise: the
    generic codec decides). Get one with :func:`fast_path`."""

    def __init__(self, cls: type, kinds: tuple[type, ...], limits: tuple[int, ...]) -> None:
        self.cls = cls
        self.kinds, self.limits = kinds, limits
        self.prefix = (
            b"\x93" + _pack_uint(WIRE_VERSION) + _pack_uint(_BY_CLS[cls]) + bytes((0x90 | len(kinds),))
        )
        self._names = tuple(f.name for f in attrs.fields(cls))

    def pack(self, *values: object) -> bytes | None:
        out = [self.prefix]
        for v, kind, limit in zip(values, self.kinds, self.limits, strict=True):
            if type(v) is not kind:
                return None
            if isinstance(v, bool):
                out.append(_FLAGS[v])
            elif isinstance(v, int):
                if not 0 <= v <= _INT_MAX:
                    return None
                out.append(_pack_uint(v))
            elif isinstance(v, bytes):
                if len(v) > limit:
                    return None
                out += (_bin_header(len(v)), v)
        return b"".join(out)

    def pack_message(self, msg: object) -> bytes | None:
        return self.pack(*(getattr(msg, n) for n in self._names))

    def parts(self, payload: bytes) -> tuple[object, ...] | None:
        p = len(self.prefix)
        if payload[:p] != self.prefix:
            return None
        values: list[object] = []
        try:
            for kind, limit in zip(self.kinds, self.limits, strict=True):
                b = payload[p]
                if kind is int:
                    if b < 0x80:
                        values.append(b)
                        p += 1
                    else:
                        form = _UINT_FORMS[b]
                        v = form.unpack_from(payload, p + 1)[0]
                        if v < 0x80 or (form is not _U8 and v <= (1 << (8 * form.size // 2)) - 1):
                            return None  # not msgpack's shortest form
                        values.append(v)
                        p += 1 + form.size
                elif kind is bool:
                    if b not in (0xC2, 0xC3):
                        return None
                    values.append(b == 0xC3)
                    p += 1
                else:
                    form = _BIN_FORMS[b]
                    n = form.unpack_from(payload, p + 1)[0]
                    start = p + 1 + form.size
                    if (
                        n > limit
                        or start + n > len(payload)
                        or (form is not _U8 and n <= (1 << (8 * form.size // 2)) - 1)
                    ):
                        return None
                    values.append(payload[start : start + n])
                    p = start + n
        except (IndexError, KeyError, struct.error):
            return None
        return tuple(values) if p == len(payload) else None

    def build(self, parts: tuple[object, ...]) -> object:
        try:
            return self.cls(*parts)
        except (TypeError, ValueError) as e:  # attrs validators of the message itself
            raise DecodeError(f"{self.cls.__name__}: {e}") from e


def fast_path(cls: type) -> FastPath:
    """Register (once) and return the fast path of the registered message ``cls``; TypeError
    unless every field is an ``int``, ``bool`` or ``bytes`` without a default."""
    fp = _FAST.get(cls)
    if fp is not None:
        return fp
    if cls not in _BY_CLS:
        raise TypeError(f"{cls.__name__} is not a registered message")
    hints = typing.get_type_hints(cls)
    kinds: list[type] = []
    lims: list[int] = []
    for f in attrs.fields(cls):
        kind = hints[f.name]
        if kind not in (int, bool, bytes) or f.default is not attrs.NOTHING:
            raise TypeError(f"{cls.__name__}.{f.name}: a fast path takes int, bool and bytes fields only")
        kinds.append(kind)
        lims.append(f.metadata.get("wire", {}).get("max_len", MAX_BYTES) if kind is bytes else 0)
    if not 0 < len(kinds) < 16:
        raise TypeError(f"{cls.__name__}: a fast path takes 1 to 15 fields")
    fp = FastPath(cls, tuple(kinds), tuple(lims))
    _FAST[cls] = fp
    _FAST_PREFIXES[fp.prefix] = fp
    return fp


# --------------------------------------------------------------------------- overlay messages


@message(1)
@attrs.frozen
class ErrorFrame:
    """A typed error sent instead of a response; ``code`` is stable, ``message`` is for humans."""

    code: str = field(max_len=64)
    message: str = field(max_len=1024)
