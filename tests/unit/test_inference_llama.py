# ruff: noqa: F811  (pytest fixtures imported from tests.inference_fixtures)
"""The Llama forward pass and the loaders: consistency, batching, cache moves, parity, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from inference.llama import LlamaModel
from inference.loader import LoadedModel, load_model
from overlay.errors import ModelLoadError
from tests.inference_fixtures import tiny_model_dir  # noqa: F401


@pytest.fixture(scope="module")
def fp32(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, weights="fp32")


def _prompt(lm: LoadedModel) -> list[int]:
    return lm.tokenizer.encode_chat([("user", "What is the capital of France?")])


def test_chunked_prefill_and_decode_agree_with_one_prefill(fp32: LoadedModel) -> None:
    ids = _prompt(fp32)
    whole = LlamaModel(fp32.config, fp32.weights, slots=2, context=128)
    ref = whole.prefill(0, torch.tensor(ids), 0)
    chunked = LlamaModel(fp32.config, fp32.weights, slots=2, context=128)
    chunked.prefill(1, torch.tensor(ids[:7]), 0)
    chunked.prefill(1, torch.tensor(ids[7:20]), 7)
    torch.testing.assert_close(chunked.prefill(1, torch.tensor(ids[20:]), 20), ref, rtol=0, atol=1e-5)
    # decoding the last prompt token == prefilling it
    step = LlamaModel(fp32.config, fp32.weights, slots=1, context=128)
    step.prefill(0, torch.tensor(ids[:-1]), 0)
    torch.testing.assert_close(
        step.decode([0], torch.tensor(ids[-1:]), [len(ids) - 1])[0], ref, rtol=0, atol=1e-5
    )


def test_batched_decode_equals_single_decode(fp32: LoadedModel) -> None:
    ids = _prompt(fp32)
    prompts = [ids, ids[:9], ids[3:30]]
    batch = LlamaModel(fp32.config, fp32.weights, slots=4, context=128)
    for s, p in enumerate(prompts):
        batch.prefill(s, torch.tensor(p), 0)
    nxt = torch.tensor([5, 6, 7])
    out = batch.decode([0, 1, 2], nxt, [len(p) for p in prompts])
    for s, p in enumerate(prompts):
        single = LlamaModel(fp32.config, fp32.weights, slots=1, context=128)
        single.prefill(0, torch.tensor(p), 0)
        ref = single.decode([0], nxt[s : s + 1], [len(p)])[0]
        torch.testing.assert_close(out[s], ref, rtol=0, atol=1e-5)
    # non-contiguous slots take the gather path and give the same rows
    out2 = batch.decode([0, 2], torch.tensor([5, 7]), [len(prompts[0]), len(prompts[2])])
    torch.testing.assert_close(out2, out[[0, 2]], rtol=0, atol=1e-5)


def test_move_slot_keeps_the_sequence(fp32: LoadedModel) -> None:
    ids = _prompt(fp32)
    m = LlamaModel(fp32.config, fp32.weights, slots=3, context=128)
    m.prefill(2, torch.tensor(ids), 0)
    ref = m.decode([2], torch.tensor([9]), [len(ids)])[0]
    m.move_slot(2, 0, len(ids) + 1)
    m.prefill(2, torch.tensor([4, 4, 4]), 0)  # overwrite the old slot
    torch.testing.assert_close(m.decode([0], torch.tensor([9]), [len(ids)])[0], ref, rtol=0, atol=1e-6)


def test_int8_weights_track_fp32(tiny_model_dir: Path, fp32: LoadedModel) -> None:
    q = load_model(tiny_model_dir, weights="int8")
    ids = _prompt(fp32)
    a = LlamaModel(fp32.config, fp32.weights, slots=1, context=128).prefill(0, torch.tensor(ids), 0)
    b = LlamaModel(q.config, q.weights, slots=1, context=128).prefill(0, torch.tensor(ids), 0)
    assert q.weights.embed.dtype == torch.int8
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert cos > 0.995
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_parity_with_transformers(tiny_model_dir: Path, fp32: LoadedModel) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    ids = _prompt(fp32)
    extra = [5, 6, 7]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids + extra])).logits[0, len(ids) - 1 :]
    m = LlamaModel(fp32.config, fp32.weights, slots=1, context=128)
    ours = [m.prefill(0, torch.tensor(ids), 0)]
    for i, t in enumerate(extra):
        ours.append(m.decode([0], torch.tensor([t]), [len(ids) + i])[0])
    torch.testing.assert_close(torch.stack(ours), theirs, rtol=0, atol=1e-4)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_model_directories(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model_dir, tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match=r"config\.json.*architecture"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ModelLoadError, match="rope scaling"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(ModelLoadError, match="multiple"):
        load_model(d)
    (d / "config.json").write_text("{")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(d)


def test_truncated_safetensors_names_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model_dir, tmp_path / "b")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    for cut in (5, 100, len(data) - 10):
        weights.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=str(weights)):
            load_model(d)
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(d)


def test_rope_theta_from_rope_parameters(tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers 5 writes rope_theta only under rope_parameters; we read it there too."""
    d = _copy(tiny_model_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_model(d, weights="fp32").config.rope_theta == 100000.0


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_python_fallback_of_the_kernels_matches_torchscript(
    tiny_model_dir: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TorchScript (no sources, or a torch without it) the same functions run as Python."""
    import inference.kernels as kernels
    import inference.llama as llama

    lm = load_model(tiny_model_dir, weights=kind)

    def logits() -> torch.Tensor:
        m = LlamaModel(lm.config, lm.weights, slots=3, context=64)
        last = m.prefill(0, torch.tensor([5, 6, 7, 8, 9]), 0)
        for s in (1, 2):
            m.prefill(s, torch.tensor([5, 6, 7, 8][: s + 2]), 0)
        return torch.cat([last[None], m.decode([0, 1, 2], torch.tensor([9, 9, 9]), [5, 3, 4])])

    scripted = logits()
    monkeypatch.setattr(llama, "decode_layers", kernels._decode_layers)
    monkeypatch.setattr(llama, "qlinear", kernels._qlinear)
    torch.testing.assert_close(logits(), scripted, rtol=0, atol=1e-6)
