"""GGUF files: a fast metadata reader and torch dequantizers.

The ``gguf`` package's ``GGUFReader`` builds a numpy memmap view for every
element of every metadata array, which takes seconds for a 49k-token
vocabulary.  :func:`read_gguf` parses the same layout (documented in the
ggml repository, ``docs/gguf.md``) with :mod:`struct` over one ``mmap`` and
bounds-checks every read, so a corrupt or truncated file raises
:class:`~overlay.errors.ModelLoadError` naming the file.

Tensor data stays in the mapping until :meth:`GGUFFile.dequantize` turns one
tensor into float32.  F32, F16, BF16, Q8_0, Q4_0 and Q4_1 have vectorized
torch paths here; every other type the ``gguf`` package knows (K-quants,
IQ-quants) goes through ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from overlay.errors import ModelLoadError

__all__ = ["GGUFFile", "GGUFTensor", "read_gguf"]

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
_MAX_STRING = 1 << 24  # bytes: one metadata string (a chat template is a few KB)
_MAX_ARRAY = 1 << 24  # items: one metadata array (vocabularies are ~10^5)

# value type -> (struct format, numpy dtype) for fixed-size scalars
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<u1"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@attrs.frozen
class GGUFTensor:
    """One tensor's directory entry: ``shape`` is numpy order (rows, cols)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # bytes from the start of the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over the mapping."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path}: truncated GGUF header (needs {n} bytes at {self.pos})")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise ModelLoadError(f"{self.path}: GGUF string of {n} bytes at {self.pos}")
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def _strings(self, n: int) -> list[str]:
        """``n`` length-prefixed strings (a vocabulary: the hot loop of opening a file)."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        unpack = _U64.unpack_from
        out: list[str] = []
        for _ in range(n):
            if pos + 8 > size:
                raise ModelLoadError(f"{self.path}: truncated GGUF string array at {pos}")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > _MAX_STRING or pos + length > size:
                raise ModelLoadError(f"{self.path}: bad GGUF string of {length} bytes at {pos}")
            out.append(buf[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return out

    def value(self, vtype: int) -> object:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("<I")
            n = self.scalar("<Q")
            if n > _MAX_ARRAY:
                raise ModelLoadError(f"{self.path}: GGUF array of {n} items")
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype][1])
                self.need(n * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return arr.astype(bool) if etype == 7 else arr
            if etype == _STRING:
                return self._strings(n)
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            raise ModelLoadError(f"{self.path}: unknown GGUF array element type {etype}")
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype}")


def _block_sizes(ggml_type: int, path: Path, name: str) -> tuple[int, int]:
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        return gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ModelLoadError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None


class GGUFFile:
    """An open GGUF file: ``metadata`` (key -> value) and ``tensors`` (name -> entry)."""

    def __init__(
        self, path: Path, buf: mmap.mmap, metadata: dict[str, object], tensors: dict[str, GGUFTensor]
    ):
        self.path = path
        self._buf = buf
        self.metadata = metadata
        self.tensors = tensors

    def close(self) -> None:
        try:
            self._buf.close()
        except BufferError:  # a caller still holds a raw() view; the mapping goes with it
            pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, name: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The tensor's bytes as a uint8 array (a view of the mapping: copy before closing)."""
        t = self.tensors[name]
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def dequantize(self, name: str) -> torch.Tensor:
        """The tensor as a float32 torch tensor of ``shape`` (rows, cols)."""
        try:
            t = self.tensors[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: tensor {name!r} missing") from None
        data = torch.from_numpy(self.raw(name).copy())
        fn = _DEQUANT.get(t.ggml_type)
        if fn is not None:
            out = fn(data)
        else:
            import gguf

            arr = gguf.quants.dequantize(self.raw(name), gguf.GGMLQuantizationType(t.ggml_type))
            out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        return out.reshape(t.shape)


# --------------------------------------------------------------------------- dequantizers (bytes -> f32)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    blocks = b.view(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes per block -> 32 values: low nibbles first, then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    blocks = b.view(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    q = _nibbles(blocks[:, 2:])
    return ((q - 8.0) * d).reshape(-1)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    blocks = b.view(-1, 20)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    q = _nibbles(blocks[:, 4:])
    return (q * d + m).reshape(-1)


_DEQUANT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    0: lambda b: b.view(torch.float32).clone(),
    1: _f16,
    2: _q4_0,
    3: _q4_1,
    8: _q8_0,
    30: lambda b: b.view(torch.bfloat16).float(),
}


# --------------------------------------------------------------------------- reader


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and index a GGUF file; raises ModelLoadError naming the file on any defect."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelLoadError(f"{p}: {size} bytes is too short for a GGUF file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot open: {e.strerror or e}") from e
    try:
        return _index(p, buf)
    except BaseException:
        buf.close()
        raise


def _index(p: Path, buf: mmap.mmap) -> GGUFFile:
    cur = _Cursor(buf, p)
    cur.need(4)
    if buf[:4] != _MAGIC:
        raise ModelLoadError(f"{p}: not a GGUF file (magic {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ModelLoadError(f"{p}: unsupported GGUF version {version}")
    n_tensors = cur.scalar("<Q")
    n_kv = cur.scalar("<Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise ModelLoadError(f"{p}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    entries: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelLoadError(f"{p}: tensor {name!r} has {n_dims} dimensions")
        dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
        entries.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ModelLoadError(f"{p}: bad general.alignment {align!r}")
    data_start = (cur.pos + align - 1) // align * align
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, ggml_type, offset in entries:
        block, type_size = _block_sizes(ggml_type, p, name)
        n = 1
        for d in dims:
            n *= d
        if dims[0] % block:
            raise ModelLoadError(f"{p}: tensor {name!r} row of {dims[0]} not a multiple of {block}")
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise ModelLoadError(
                f"{p}: truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, file has {len(buf)}"
            )
        tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ggml_type, start, nbytes)
    return GGUFFile(p, buf, metadata, tensors)
