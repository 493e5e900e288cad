"""The Llama-family forward pass in plain torch, with a preallocated KV cache.

No transformers at run time.  What is supported: GQA, RoPE (no scaling),
RMSNorm, SwiGLU, tied or separate output embeddings.  The layout is tuned
for decode on a CPU, where a step is bound by the bytes of weights read and
by Python overhead per layer:

- q/k/v are one matrix, gate/up one matrix (4 matmuls per layer, not 7);
- q and k rows are stored in the *interleaved* RoPE order (as GGUF stores
  them; Hugging Face weights are permuted at load), so RoPE is one complex
  multiply over q and k together;
- the 1/sqrt(head_dim) attention scale is folded into the q rows;
- linear layers are either fp32 (``F.linear``) or int8 with per-row scales
  through fbgemm's dynamic-quantized linear (:class:`Int8Linear`), which reads
  a quarter of the bytes;
- the KV cache is one tensor per layer for K and V, ``[slots, kv_heads,
  context, head_dim]``; a decode step over slots ``0..B-1`` reads them as
  views;
- the decode step's layer loop runs in TorchScript (:mod:`inference.kernels`),
  which removes most of the Python and binding overhead per op.

KV-cache memory is committed lazily; :meth:`LlamaModel.ensure_initialized`
zeroes cache rows before they are first read, so a masked position never
holds garbage (0 * NaN would poison the output).

:class:`LlamaModel` never touches Python threads or trio: the CPU engine
calls it from its one model thread.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F

from overlay.errors import ModelLoadError

from .kernels import decode_layers, qlinear

__all__ = [
    "DENSE_DTYPES",
    "DenseLinear",
    "Fp32Linear",
    "Int8Linear",
    "LayerWeights",
    "LlamaConfig",
    "LlamaModel",
    "LlamaWeights",
    "Linear",
    "hf_to_interleaved",
    "make_linear",
    "rope_table",
]

Linear = Callable[[torch.Tensor], torch.Tensor]


@attrs.frozen
class LlamaConfig:
    """Model hyperparameters (from config.json or GGUF metadata)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float  # RoPE base frequency (SmolLM2: 1e5)
    rms_norm_eps: float
    max_position: int  # tokens: the context length the model was trained for
    tie_word_embeddings: bool

    def validate(self, source: str) -> None:
        ints = (self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers)
        if min(ints) <= 0 or self.num_heads <= 0 or self.num_kv_heads <= 0 or self.max_position <= 0:
            raise ModelLoadError(f"{source}: non-positive dimension in {self}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{source}: {self.num_heads} heads not a multiple of {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"{source}: head_dim {self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0:
            raise ModelLoadError(f"{source}: rope_theta {self.rope_theta} must be positive")


class Int8Linear:
    """``y = x @ W.T`` with W as int8 + per-row scales, through fbgemm's dynamic-quantized linear.

    fbgemm quantizes the input to 7 bits per call; :func:`inference.kernels.qlinear`
    gives every row its own range.  A row decoded alone and in a batch can
    differ in the last bits; the fp32 kind is batch-invariant.  The loader
    smooths activation outliers into the weights first (:mod:`inference.smooth`).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.guard = torch.zeros(1, self.in_features)
        self.guard[0, 0] = 1.0
        self.guard[0, -1] = -1.0 if self.in_features > 1 else 1.0
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 marks quantized tensor *creation* deprecated; fbgemm's packed
            # linear is still the fastest int8 matmul for CPU decode (see bench/inference.py).
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = qlinear(x, self.packed, self.guard)
        return y


class Fp32Linear:
    """``y = x @ W.T`` in float32."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


#: weight kinds of the dense path (:mod:`inference.dense`) and their dtypes
DENSE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DenseLinear:
    """``y = x @ W.T`` in the weight's dtype on its device (the dense path: fp32/fp16/bf16, CPU or CUDA)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device: str | torch.device) -> None:
        self.weight = weight.detach().to(device=device, dtype=dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def make_linear(weight: torch.Tensor, kind: str, device: str = "cpu") -> Linear:
    """A linear layer of ``kind`` ("int8", "fp32", "fp16", "bf16") for an [out, in] weight.

    int8 and fp32 on the CPU are the layouts of :class:`LlamaModel`'s TorchScript
    decode; fp16 / bf16, or any kind on another device, are :class:`DenseLinear`.
    """
    if kind == "int8":
        if device != "cpu":
            raise ValueError("int8 weights run on the CPU only")
        return Int8Linear(weight)
    if kind == "fp32" and device == "cpu":
        return Fp32Linear(weight)
    if kind in DENSE_DTYPES:
        return DenseLinear(weight, DENSE_DTYPES[kind], device)
    raise ValueError(f"unknown weight kind {kind!r}")


def rope_table(cfg: LlamaConfig, n: int) -> torch.Tensor:
    """RoPE rotations for positions ``0..n-1``: complex64 [n, head_dim / 2] (interleaved pairs)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's rotate-half RoPE layout to interleaved pairs."""
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, 2, d // 2, inp).transpose(1, 2).reshape(out, inp)


@attrs.define
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Linear  # rows: q (scaled, interleaved), k (interleaved), v
    o: Linear
    ffn_norm: torch.Tensor
    gate_up: Linear  # rows: gate, up
    down: Linear


@attrs.define
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden] float32, or int8 with embed_scale
    embed_scale: torch.Tensor | None  # [vocab] per-row scales when embed is int8
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: Linear


class LlamaModel:
    """Forward passes over a fixed pool of KV-cache slots."""

    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights, *, slots: int, context: int) -> None:
        self.cfg = cfg
        self.w = weights
        self.slots = slots
        self.context = context
        kv, d = cfg.num_kv_heads, cfg.head_dim
        shape = (cfg.num_layers, slots, kv, context, d)
        # torch.empty commits pages only when written; see ensure_initialized.
        self.k_cache = torch.empty(shape)
        self.v_cache = torch.empty(shape)
        self._k = list(self.k_cache.unbind(0))
        self._v = list(self.v_cache.unbind(0))
        self.initialized = [0] * slots  # per slot: positions [0, n) hold finite values
        self._freqs = rope_table(cfg, context)
        self._arange = torch.arange(context)
        # flat per-layer lists for the TorchScript decode loop (kernels.decode_layers)
        self._attn_norms = [lw.attn_norm for lw in weights.layers]
        self._ffn_norms = [lw.ffn_norm for lw in weights.layers]
        linears = [f for lw in weights.layers for f in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        self._int8 = all(isinstance(f, Int8Linear) for f in linears)
        if not self._int8 and not all(isinstance(f, Fp32Linear) for f in linears):
            raise ValueError("all layers must use the same linear kind")
        int8s = [f for f in linears if isinstance(f, Int8Linear)]
        self._packed = [f.packed for f in int8s]
        self._guards = [f.guard for f in int8s]
        self._dense = [f.weight for f in linears if isinstance(f, Fp32Linear)]

    # ---------------------------------------------------------------- cache housekeeping

    def ensure_initialized(self, slot: int, upto: int) -> None:
        """Zero never-written cache positions of ``slot`` below ``upto``."""
        lo = self.initialized[slot]
        if upto > lo:
            self.k_cache[:, slot, :, lo:upto].zero_()
            self.v_cache[:, slot, :, lo:upto].zero_()
            self.initialized[slot] = upto

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of ``src`` into ``dst``."""
        if length:
            self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]
        self.initialized[dst] = max(self.initialized[dst], length)

    # ---------------------------------------------------------------- forward passes

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.w.embed_scale is None:
            return self.w.embed[tokens]
        return self.w.embed[tokens].float().mul_(self.w.embed_scale[tokens, None])

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``tokens`` (1-D) at positions ``start..`` of ``slot``; logits of the last one, [vocab]."""
        cfg = self.cfg
        t = int(tokens.shape[0])
        end = start + t
        self.ensure_initialized(slot, start)
        h_, kv_, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        nqk = (h_ + kv_) * d
        eps = cfg.rms_norm_eps
        hid = (cfg.hidden_size,)
        inter = cfg.intermediate_size
        freqs = self._freqs[start:end].unsqueeze(1)
        mask = self._arange[:end].unsqueeze(0) <= self._arange[start:end].unsqueeze(1)  # [t, end]
        x = self._embed(tokens)
        for i, lw in enumerate(self.w.layers):
            h = F.rms_norm(x, hid, lw.attn_norm, eps)
            qkv = lw.qkv(h)
            qk = torch.view_as_real(
                torch.view_as_complex(qkv[:, :nqk].reshape(t, h_ + kv_, d // 2, 2)) * freqs
            )
            q = qk[:, :h_].reshape(t, h_, d).transpose(0, 1).unsqueeze(0)
            kc, vc = self._k[i][slot], self._v[i][slot]
            kc[:, start:end] = qk[:, h_:].reshape(t, kv_, d).transpose(0, 1)
            vc[:, start:end] = qkv[:, nqk:].reshape(t, kv_, d).transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q,
                kc[:, :end].unsqueeze(0),
                vc[:, :end].unsqueeze(0),
                attn_mask=mask,
                scale=1.0,
                enable_gqa=True,
            )
            x = x + lw.o(o[0].transpose(0, 1).reshape(t, h_ * d))
            h = F.rms_norm(x, hid, lw.ffn_norm, eps)
            gu = lw.gate_up(h)
            x = x + lw.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        self.initialized[slot] = max(self.initialized[slot], end)
        x = F.rms_norm(x[-1:], hid, self.w.norm, eps)
        return self.w.lm_head(x)[0]

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One token for each of ``slots`` at ``positions``; logits [B, vocab]."""
        cfg = self.cfg
        b = len(slots)
        span = max(positions) + 1
        for slot in slots:
            self.ensure_initialized(slot, span)
        pos = torch.tensor(positions)
        mask = None
        if min(positions) != span - 1:  # rows of different lengths: hide each row's future
            mask = torch.zeros(b, 1, 1, span)
            future = self._arange[:span].unsqueeze(0) > pos.unsqueeze(1)
            mask.masked_fill_(future.view(b, 1, 1, span), -math.inf)
        x = decode_layers(
            self._embed(tokens),
            self._freqs[pos].unsqueeze(1),
            mask,
            self._k,
            self._v,
            torch.tensor(slots),
            pos,
            slots == list(range(b)),
            span,
            self._attn_norms,
            self._ffn_norms,
            self._packed,
            self._guards,
            self._dense,
            self._int8,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
        )
        for slot in slots:
            self.initialized[slot] = max(self.initialized[slot], span)
        return self.w.lm_head(F.rms_norm(x, (cfg.hidden_size,), self.w.norm, cfg.rms_norm_eps))
