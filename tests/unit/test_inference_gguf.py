# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""GGUF reader and dequantizers: parity with the ``gguf`` package, and corrupt files."""

from __future__ import annotations

from pathlib import Path

import attrs
import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.gguf_file import read_gguf
from inference.llama import LlamaModel
from inference.loader import load_model
from overlay.errors import ModelLoadError
from tests.inference_fixtures import tiny_gguf, tiny_model_dir  # noqa: F401

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]


def _write(
    path: Path, arrays: dict[str, tuple[np.ndarray, str]], meta: dict[str, object] | None = None
) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in (meta or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, int(v))  # type: ignore[call-overload]
    for name, (arr, qtype) in arrays.items():
        qt = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_gguf_package(tmp_path: Path, qtype: str) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((8, 64)) * 0.1).astype(np.float32)
    path = _write(tmp_path / "t.gguf", {"w": (arr, qtype)})
    with read_gguf(path) as g:
        t = g.tensors["w"]
        assert t.shape == (8, 64)
        ours = g.dequantize("w")
        ref = gguf.quants.dequantize(g.raw("w"), gguf.GGMLQuantizationType(t.ggml_type)).reshape(8, 64)
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), ref)
    # and the quantization error is what the format promises
    tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 5e-3, "Q5_0": 0.03, "Q4_0": 0.06, "Q4_1": 0.06}[qtype]
    assert np.abs(ours.numpy() - arr).max() <= tol + 1e-7


def test_metadata_strings_arrays_and_alignment(tmp_path: Path) -> None:
    arr = np.arange(64, dtype=np.float32).reshape(2, 32)
    meta = {"x.name": "héllo", "x.list": ["a", "bb", "ccc"], "x.count": 7}
    path = _write(tmp_path / "m.gguf", {"w": (arr, "F32")}, meta)
    with read_gguf(path) as g:
        assert g.metadata["general.architecture"] == "llama"
        assert g.metadata["x.name"] == "héllo"
        assert g.metadata["x.list"] == ["a", "bb", "ccc"]
        assert g.metadata["x.count"] == 7
        assert g.tensors["w"].offset % 32 == 0
        np.testing.assert_array_equal(g.dequantize("w").numpy(), arr)


def test_tiny_gguf_loads_like_the_hf_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An F32 GGUF (q/k permuted as llama.cpp does, tokenizer in metadata) gives the HF logits."""
    from inference.tiny import write_tiny_gguf

    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny-f32.gguf", qtype="F32")
    hf = load_model(tiny_model_dir, weights="fp32")
    gg = load_model(gguf_path, weights="fp32")
    assert gg.format == "gguf"
    assert hf.format == "hf"
    assert gg.config.rms_norm_eps == pytest.approx(hf.config.rms_norm_eps)  # stored as float32
    assert attrs.evolve(gg.config, rms_norm_eps=hf.config.rms_norm_eps) == hf.config
    text = "What is the capital of France? 123 café"
    ids = hf.tokenizer.encode_chat([("user", text)])
    assert gg.tokenizer.encode_chat([("user", text)]) == ids
    assert gg.tokenizer.eos_token_ids == hf.tokenizer.eos_token_ids
    a = LlamaModel(hf.config, hf.weights, slots=1, context=64).prefill(0, torch.tensor(ids), 0)
    b = LlamaModel(gg.config, gg.weights, slots=1, context=64).prefill(0, torch.tensor(ids), 0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_truncated_file_names_the_file(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    for cut in (3, 20, 200, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=str(bad)):
            load_model(bad)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(tmp_path / "missing.gguf")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=4, max_value=4000), junk=st.binary(min_size=1, max_size=16))
def test_corrupted_header_raises_only_model_load_error(
    tiny_gguf: Path, tmp_path: Path, pos: int, junk: bytes
) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[pos : pos + len(junk)] = junk
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    error: ModelLoadError | None = None
    try:
        with read_gguf(bad) as g:
            for name in list(g.tensors)[:3]:
                g.dequantize(name)
    except ModelLoadError as e:  # anything else (IndexError, UnicodeError, ...) fails the test
        error = e
    assert error is None or str(bad) in str(error)
