"""Model loading: Hugging Face directories and GGUF files -> :class:`LoadedModel`.

Both paths end in the same :class:`~inference.llama.LlamaWeights` layout
(fused qkv with interleaved RoPE rows and the attention scale folded into q,
fused gate/up), built one layer at a time so peak memory stays near the
size of the final weights.  Every defect (missing file, bad JSON, truncated
tensor data, unsupported architecture) raises
:class:`~overlay.errors.ModelLoadError` naming the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

from overlay.errors import ModelLoadError

from .gguf_file import read_gguf
from .llama import (
    DENSE_DTYPES,
    DenseLinear,
    LayerWeights,
    Linear,
    LlamaConfig,
    LlamaWeights,
    hf_to_interleaved,
    make_linear,
    rope_table,
)
from .smooth import CALIBRATION_TEXT, LayerTensors, calibrate_layer, smooth_layer
from .tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir

__all__ = ["LoadedModel", "load_model", "read_hf_config"]

_HF_ARCHS = frozenset({"LlamaForCausalLM", "MistralForCausalLM"})


@attrs.frozen
class LoadedModel:
    config: LlamaConfig
    weights: LlamaWeights
    tokenizer: Tokenizer
    path: Path
    format: str  # "hf" | "gguf"
    n_params: int


def load_model(path: str | Path, *, weights: str = "int8", device: str = "cpu") -> LoadedModel:
    """Load a model directory (config.json + safetensors) or a ``.gguf`` file.

    ``weights``: int8 | fp32 (the CPU layouts) or fp16 | bf16 | fp32 on any
    ``device`` (the dense path); each layer is moved to ``device`` as it is
    built, so host memory peaks near one layer in fp32.
    """
    p = Path(path)
    if p.is_dir():
        return _load_hf(p, weights, device)
    if p.is_file():
        return _load_gguf(p, weights, device)
    raise ModelLoadError(f"{p}: no such model file or directory")


# --------------------------------------------------------------------------- shared assembly

Getter = Callable[[str], torch.Tensor]


def _assemble(
    cfg: LlamaConfig,
    get: Callable[[str, int], torch.Tensor],
    kind: str,
    hf_rope: bool,
    calib_ids: list[int],
    device: str = "cpu",
) -> LlamaWeights:
    """Build the fused weights from ``get(role, layer)`` (layer -1 for global tensors).

    For int8, each layer is first run in fp32 on ``calib_ids`` and smoothed
    (:mod:`inference.smooth`); only one layer's fp32 weights are alive at a time.
    """
    d = cfg.head_dim
    scale = 1.0 / math.sqrt(d)
    embed = get("embed", -1)
    _check(embed, (cfg.vocab_size, cfg.hidden_size), "embeddings")
    h: torch.Tensor | None = None
    freqs = rope_table(cfg, max(len(calib_ids), 1))
    if kind == "int8" and calib_ids:
        h = embed[torch.tensor(calib_ids)].float()
    layers: list[LayerWeights] = []
    for i in range(cfg.num_layers):
        q, k, v = get("q", i), get("k", i), get("v", i)
        if hf_rope:
            q, k = hf_to_interleaved(q, cfg.num_heads), hf_to_interleaved(k, cfg.num_kv_heads)
        _check(q, (cfg.num_heads * d, cfg.hidden_size), f"layer {i} q")
        _check(k, (cfg.num_kv_heads * d, cfg.hidden_size), f"layer {i} k")
        _check(v, (cfg.num_kv_heads * d, cfg.hidden_size), f"layer {i} v")
        o = get("o", i)
        _check(o, (cfg.hidden_size, cfg.num_heads * d), f"layer {i} o")
        gate, up, down = get("gate", i), get("up", i), get("down", i)
        _check(gate, (cfg.intermediate_size, cfg.hidden_size), f"layer {i} gate")
        _check(up, (cfg.intermediate_size, cfg.hidden_size), f"layer {i} up")
        _check(down, (cfg.hidden_size, cfg.intermediate_size), f"layer {i} down")
        t = LayerTensors(
            q * scale,
            k,
            v,
            o,
            gate,
            up,
            down,
            _vec(get("attn_norm", i), cfg.hidden_size, f"layer {i} attn_norm"),
            _vec(get("ffn_norm", i), cfg.hidden_size, f"layer {i} ffn_norm"),
        )
        if h is not None:
            h, stats = calibrate_layer(h, t, cfg, freqs)
            t = smooth_layer(t, stats, cfg)
        layers.append(
            LayerWeights(
                attn_norm=t.attn_norm,
                qkv=make_linear(torch.cat([t.q, t.k, t.v]), kind, device),
                o=make_linear(t.o, kind, device),
                ffn_norm=t.ffn_norm,
                gate_up=make_linear(torch.cat([t.gate, t.up]), kind, device),
                down=make_linear(t.down, kind, device),
            )
        )
    head = embed if cfg.tie_word_embeddings else get("lm_head", -1)
    _check(head, (cfg.vocab_size, cfg.hidden_size), "lm_head")
    lm_head: Linear | None = None
    if kind == "int8":
        s = (embed.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        table, table_scale = torch.round(embed / s[:, None]).to(torch.int8), s
    elif kind == "fp32" and device == "cpu":
        table, table_scale = embed.float().contiguous(), None
    else:  # the dense path: one copy of a tied table serves as embedding and head
        table, table_scale = embed.to(device=device, dtype=DENSE_DTYPES[kind]).contiguous(), None
        if cfg.tie_word_embeddings:
            lm_head = DenseLinear(table, table.dtype, device)
    return LlamaWeights(
        embed=table,
        embed_scale=table_scale,
        layers=layers,
        norm=_vec(get("norm", -1), cfg.hidden_size, "final norm"),
        lm_head=lm_head if lm_head is not None else make_linear(head, kind, device),
    )


def _check(t: torch.Tensor, shape: tuple[int, int], what: str) -> None:
    if tuple(t.shape) != shape:
        raise ModelLoadError(f"{what}: shape {tuple(t.shape)}, expected {shape}")


def _vec(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if tuple(t.shape) != (n,):
        raise ModelLoadError(f"{what}: shape {tuple(t.shape)}, expected ({n},)")
    return t.float().contiguous()


def _count(cfg: LlamaConfig) -> int:
    d = cfg.head_dim
    per_layer = (
        cfg.hidden_size * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
        + 3 * cfg.hidden_size * cfg.intermediate_size
        + 2 * cfg.hidden_size
    )
    emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + emb + cfg.hidden_size


# --------------------------------------------------------------------------- Hugging Face directories


def read_hf_config(model_dir: Path) -> tuple[LlamaConfig, dict[str, object]]:
    """Parse config.json; rope_theta is read top-level or from ``rope_parameters``."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not any(a in _HF_ARCHS for a in archs):
        raise ModelLoadError(f"{path}: architecture {archs} not supported (Llama family only)")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ModelLoadError(f"{path}: attention/MLP biases are not supported")
    rope_params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    assert isinstance(rope_params, dict)
    scaling = raw.get("rope_scaling") or {}
    rtype = (scaling.get("rope_type") or scaling.get("type")) if isinstance(scaling, dict) else None
    rtype = rtype or rope_params.get("rope_type")
    if rtype not in (None, "default"):
        raise ModelLoadError(f"{path}: rope scaling {rtype!r} is not supported")
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        cfg = LlamaConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rope_theta=float(raw.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: bad or missing field: {e}") from e
    cfg.validate(str(path))
    return cfg, raw


def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted({model_dir / str(f) for f in wmap.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: unreadable index: {e}") from e
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights")
    return files


def _calibration_ids(tokenizer: Tokenizer, cfg: LlamaConfig) -> list[int]:
    ids = tokenizer.encode(CALIBRATION_TEXT)
    return [i for i in ids if 0 <= i < cfg.vocab_size][: cfg.max_position]


def _load_hf(model_dir: Path, kind: str, device: str) -> LoadedModel:
    from safetensors import safe_open

    cfg, _ = read_hf_config(model_dir)
    tokenizer = tokenizer_from_hf_dir(model_dir)
    handles: dict[str, tuple[Path, object]] = {}
    opened = []
    for f in _safetensor_files(model_dir):
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:  # SafetensorError, OSError
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors: {e}") from e
        opened.append(h)
        for name in h.keys():  # type: ignore[no-untyped-call]
            handles[name] = (f, h)
    names = {
        "q": "model.layers.{}.self_attn.q_proj.weight",
        "k": "model.layers.{}.self_attn.k_proj.weight",
        "v": "model.layers.{}.self_attn.v_proj.weight",
        "o": "model.layers.{}.self_attn.o_proj.weight",
        "gate": "model.layers.{}.mlp.gate_proj.weight",
        "up": "model.layers.{}.mlp.up_proj.weight",
        "down": "model.layers.{}.mlp.down_proj.weight",
        "attn_norm": "model.layers.{}.input_layernorm.weight",
        "ffn_norm": "model.layers.{}.post_attention_layernorm.weight",
        "embed": "model.embed_tokens.weight",
        "norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }

    def get(role: str, layer: int) -> torch.Tensor:
        name = names[role].format(layer)
        if name not in handles:
            raise ModelLoadError(f"{model_dir}: tensor {name!r} missing from the safetensors files")
        f, h = handles[name]
        try:
            t: torch.Tensor = h.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as e:
            raise ModelLoadError(f"{f}: cannot read tensor {name!r}: {e}") from e
        return t.float()

    w = _assemble(cfg, get, kind, True, _calibration_ids(tokenizer, cfg), device)
    return LoadedModel(cfg, w, tokenizer, model_dir, "hf", _count(cfg))


# --------------------------------------------------------------------------- GGUF files


def _meta_int(meta: dict[str, object], key: str, path: Path, default: int | None = None) -> int:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelLoadError(f"{path}: GGUF key {key!r} missing or not an integer")
    return int(v)


def _load_gguf(path: Path, kind: str, device: str) -> LoadedModel:
    with read_gguf(path) as g:
        meta = g.metadata
        arch = meta.get("general.architecture")
        if arch not in ("llama", "mistral"):
            raise ModelLoadError(f"{path}: GGUF architecture {arch!r} not supported (Llama family only)")
        pre = f"{arch}."
        scaling = meta.get(pre + "rope.scaling.type")
        if scaling not in (None, "none"):
            raise ModelLoadError(f"{path}: rope scaling {scaling!r} is not supported")
        tokenizer = tokenizer_from_gguf(meta, str(path))
        hidden = _meta_int(meta, pre + "embedding_length", path)
        heads = _meta_int(meta, pre + "attention.head_count", path)
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab_default = len(tokens) if isinstance(tokens, list) else None
        theta = meta.get(pre + "rope.freq_base", 10000.0)
        eps = meta.get(pre + "attention.layer_norm_rms_epsilon", 1e-5)
        cfg = LlamaConfig(
            vocab_size=_meta_int(meta, pre + "vocab_size", path, vocab_default),
            hidden_size=hidden,
            intermediate_size=_meta_int(meta, pre + "feed_forward_length", path),
            num_layers=_meta_int(meta, pre + "block_count", path),
            num_heads=heads,
            num_kv_heads=_meta_int(meta, pre + "attention.head_count_kv", path, heads),
            head_dim=_meta_int(meta, pre + "rope.dimension_count", path, hidden // max(heads, 1)),
            rope_theta=float(theta) if isinstance(theta, float | int) else 10000.0,
            rms_norm_eps=float(eps) if isinstance(eps, float | int) else 1e-5,
            max_position=_meta_int(meta, pre + "context_length", path, 2048),
            tie_word_embeddings="output.weight" not in g.tensors,
        )
        cfg.validate(str(path))
        names = {
            "q": "blk.{}.attn_q.weight",
            "k": "blk.{}.attn_k.weight",
            "v": "blk.{}.attn_v.weight",
            "o": "blk.{}.attn_output.weight",
            "gate": "blk.{}.ffn_gate.weight",
            "up": "blk.{}.ffn_up.weight",
            "down": "blk.{}.ffn_down.weight",
            "attn_norm": "blk.{}.attn_norm.weight",
            "ffn_norm": "blk.{}.ffn_norm.weight",
            "embed": "token_embd.weight",
            "norm": "output_norm.weight",
            "lm_head": "output.weight",
        }

        def get(role: str, layer: int) -> torch.Tensor:
            return g.dequantize(names[role].format(layer))

        w = _assemble(cfg, get, kind, False, _calibration_ids(tokenizer, cfg), device)
    return LoadedModel(cfg, w, tokenizer, path, "gguf", _count(cfg))
