"""The dense forward pass: Llama in fp32 / fp16 / bf16 on any torch device (the ``cuda`` engine's model).

:class:`DenseLlama` has :class:`~inference.llama.LlamaModel`'s interface
(``prefill``, ``decode``, ``move_slot`` over a fixed pool of KV-cache
slots) and the same weight layout from :mod:`inference.loader` (fused
qkv with interleaved RoPE rows and the attention scale folded into q, fused
gate/up), but nothing in it is CPU-specific, so the CUDA engine and its CPU
smoke tests run the very same code:

- weights, KV cache and RoPE tables live on the weights' device in their
  dtype; logits come back as float32;
- RoPE is real arithmetic on interleaved pairs (``a cos - b sin``,
  ``a sin + b cos``), the same products Hugging Face computes on its
  rotate-half layout (no complex dtypes, which fp16/bf16 lack);
- attention is ``torch.nn.functional.scaled_dot_product_attention``: prefill
  from position 0 is ``is_causal`` (flash kernels on a GPU), a later prompt
  chunk takes a boolean mask; a decode step puts each KV group's query heads
  in the query-length axis (``[B, kv, heads/kv, d]`` against ``[B, kv, span, d]``),
  so grouped-query attention reads each cached K/V once and needs no repeat;
- the KV cache is zero-filled at allocation, so masked positions never hold
  NaN (0 * NaN would poison the output);
- on CUDA, decode steps over slots ``0..B-1`` are captured as CUDA graphs,
  one per batch size and attention span bucket (256, 512, ... positions,
  masked), replayed with the step's tokens and positions copied into static
  inputs; the final norm, head and sampling run eagerly.  A failed capture
  turns graphs off and logs why; non-contiguous slots run eagerly.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .llama import DenseLinear, Fp32Linear, Linear, LlamaConfig, LlamaWeights, rope_table

__all__ = ["DenseLlama", "span_bucket"]

log = logging.getLogger(__name__)

_Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def span_bucket(span: int, context: int, smallest: int = 256) -> int:
    """The span a captured decode graph covers: a power of two from ``smallest``, at most ``context``."""
    b = smallest
    while b < span:
        b *= 2
    return min(b, context)


def _weight(f: Linear, what: str) -> torch.Tensor:
    if isinstance(f, DenseLinear | Fp32Linear):
        return f.weight
    raise ValueError(f"{what}: the dense path needs fp32/fp16/bf16 weights, not {type(f).__name__}")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [..., heads, d] by ``cos``/``sin`` [..., 1, d / 2]."""
    pairs = x.view(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


@attrs.define
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    tokens: torch.Tensor  # static inputs
    positions: torch.Tensor
    hidden: torch.Tensor  # static output: the last hidden state [B, hidden]


class DenseLlama:
    """Forward passes over a fixed pool of KV-cache slots, in the weights' dtype and on their device."""

    def __init__(
        self,
        cfg: LlamaConfig,
        weights: LlamaWeights,
        *,
        slots: int,
        context: int,
        cuda_graphs: bool = True,
        max_graphs: int = 96,
    ) -> None:
        if weights.embed_scale is not None:
            raise ValueError("the dense path needs fp32/fp16/bf16 embeddings, not int8")
        self.cfg = cfg
        self.slots = slots
        self.context = context
        head = _weight(weights.lm_head, "lm_head")
        self.device = head.device
        self.dtype = head.dtype
        dev, dt = self.device, self.dtype

        def vec(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=dev, dtype=dt).contiguous()

        self.layers: list[_Layer] = [
            (
                vec(lw.attn_norm),
                _weight(lw.qkv, f"layer {i} qkv"),
                _weight(lw.o, f"layer {i} o"),
                vec(lw.ffn_norm),
                _weight(lw.gate_up, f"layer {i} gate_up"),
                _weight(lw.down, f"layer {i} down"),
            )
            for i, lw in enumerate(weights.layers)
        ]
        self.embed = weights.embed.to(device=dev, dtype=dt)
        self.norm = vec(weights.norm)
        self.head = head
        kv, d = cfg.num_kv_heads, cfg.head_dim
        shape = (cfg.num_layers, slots, kv, context, d)
        self.k_cache = torch.zeros(shape, dtype=dt, device=dev)
        self.v_cache = torch.zeros(shape, dtype=dt, device=dev)
        self._k = list(self.k_cache.unbind(0))
        self._v = list(self.v_cache.unbind(0))
        freqs = rope_table(cfg, context)  # complex64 [context, d / 2]
        self._cos = freqs.real.to(device=dev, dtype=dt).contiguous()
        self._sin = freqs.imag.to(device=dev, dtype=dt).contiguous()
        self._arange = torch.arange(context, device=dev)
        self._rows = torch.arange(slots, device=dev)
        self.use_graphs = cuda_graphs and dev.type == "cuda"
        self.max_graphs = max_graphs
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        self.graph_replays = 0

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # ---------------------------------------------------------------- cache housekeeping

    def ensure_initialized(self, slot: int, upto: int) -> None:
        """Nothing to do: the cache is zero-filled at allocation."""

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of ``src`` into ``dst``."""
        if length:
            self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    # ---------------------------------------------------------------- forward passes

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return F.linear(F.rms_norm(x, (cfg.hidden_size,), self.norm, cfg.rms_norm_eps), self.head).float()

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``tokens`` (1-D) at positions ``start..`` of ``slot``; float32 logits of the last, [vocab]."""
        cfg = self.cfg
        tok = tokens.to(self.device)
        t = int(tok.shape[0])
        end = start + t
        h_, kv_, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        nq, nqk = h_ * d, (h_ + kv_) * d
        hid, eps, inter = (cfg.hidden_size,), cfg.rms_norm_eps, cfg.intermediate_size
        cos, sin = self._cos[start:end, None], self._sin[start:end, None]
        mask = None
        if start:
            mask = self._arange[:end].unsqueeze(0) <= self._arange[start:end].unsqueeze(1)  # [t, end]
        x = self.embed[tok]
        for i, (an, wqkv, wo, fn, wgu, wd) in enumerate(self.layers):
            qkv = F.linear(F.rms_norm(x, hid, an, eps), wqkv)
            qk = _rope(qkv[:, :nqk].view(t, h_ + kv_, d), cos, sin)
            kc, vc = self._k[i][slot], self._v[i][slot]
            kc[:, start:end] = qk[:, h_:].transpose(0, 1)
            vc[:, start:end] = qkv[:, nqk:].view(t, kv_, d).transpose(0, 1)
            o = F.scaled_dot_product_attention(
                qk[:, :h_].transpose(0, 1).unsqueeze(0),
                kc[:, :end].unsqueeze(0),
                vc[:, :end].unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None and t > 1,
                scale=1.0,
                enable_gqa=True,
            )
            x = x + F.linear(o[0].transpose(0, 1).reshape(t, nq), wo)
            gu = F.linear(F.rms_norm(x, hid, fn, eps), wgu)
            x = x + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], wd)
        return self._logits(x[-1:])[0]

    def _decode_core(
        self, tok: torch.Tensor, pos: torch.Tensor, sl: torch.Tensor | None, span: int, masked: bool
    ) -> torch.Tensor:
        """All layers for one token per row; ``sl`` None means slots ``0..B-1`` (graph-capturable)."""
        cfg = self.cfg
        b = int(tok.shape[0])
        h_, kv_, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = h_ // kv_
        nq, nqk = h_ * d, (h_ + kv_) * d
        hid, eps, inter = (cfg.hidden_size,), cfg.rms_norm_eps, cfg.intermediate_size
        rows = self._rows[:b] if sl is None else sl
        cos, sin = self._cos[pos].unsqueeze(1), self._sin[pos].unsqueeze(1)
        mask = None
        if masked:  # rows of different lengths (or a padded span): hide each row's future
            mask = (self._arange[:span].unsqueeze(0) <= pos.unsqueeze(1)).view(b, 1, 1, span)
        x = self.embed[tok]
        for i, (an, wqkv, wo, fn, wgu, wd) in enumerate(self.layers):
            qkv = F.linear(F.rms_norm(x, hid, an, eps), wqkv)
            qk = _rope(qkv[:, :nqk].view(b, h_ + kv_, d), cos, sin)
            kc, vc = self._k[i], self._v[i]
            kc[rows, :, pos] = qk[:, h_:]
            vc[rows, :, pos] = qkv[:, nqk:].view(b, kv_, d)
            if sl is None:
                keys, values = kc[:b, :, :span], vc[:b, :, :span]
            else:
                keys, values = kc.index_select(0, sl)[:, :, :span], vc.index_select(0, sl)[:, :, :span]
            o = F.scaled_dot_product_attention(
                qk[:, :h_].reshape(b, kv_, g, d), keys, values, attn_mask=mask, scale=1.0
            )
            x = x + F.linear(o.reshape(b, nq), wo)
            gu = F.linear(F.rms_norm(x, hid, fn, eps), wgu)
            x = x + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], wd)
        return x

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One token for each of ``slots`` at ``positions``; float32 logits [B, vocab]."""
        b = len(slots)
        span = max(positions) + 1
        contiguous = slots == list(range(b))
        if self.use_graphs and contiguous:
            entry = self._graph_for(b, span_bucket(span, self.context), tokens, positions)
            if entry is not None:
                entry.tokens.copy_(tokens, non_blocking=True)
                entry.positions.copy_(torch.tensor(positions), non_blocking=True)
                entry.graph.replay()
                self.graph_replays += 1
                return self._logits(entry.hidden)
        tok = tokens.to(self.device)
        pos = torch.tensor(positions, device=self.device)
        sl = None if contiguous else torch.tensor(slots, device=self.device)
        x = self._decode_core(tok, pos, sl, span, masked=min(positions) != span - 1)
        return self._logits(x)

    # ---------------------------------------------------------------- CUDA graphs (device == "cuda" only)

    def _graph_for(self, b: int, span: int, tokens: torch.Tensor, positions: list[int]) -> _Graph | None:
        entry = self._graphs.get((b, span))
        if entry is not None or len(self._graphs) >= self.max_graphs:
            return entry
        try:
            entry = self._capture(b, span, tokens, positions)
        except Exception as e:  # an unsupported op or driver: run eagerly from now on
            log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(e).__name__, e)
            self.use_graphs = False
            return None
        self._graphs[(b, span)] = entry
        return entry

    def _capture(self, b: int, span: int, tokens: torch.Tensor, positions: list[int]) -> _Graph:
        """Capture one decode step; the warm-up runs write exactly this step's K/V, so they are harmless."""
        cuda: Any = torch.cuda
        tok = tokens.to(self.device).clone()
        pos = torch.tensor(positions, device=self.device)
        if self._pool is None:
            self._pool = cuda.graph_pool_handle()
        side = cuda.Stream(self.device)
        side.wait_stream(cuda.current_stream(self.device))
        with cuda.stream(side):
            for _ in range(2):
                self._decode_core(tok, pos, None, span, masked=True)
        cuda.current_stream(self.device).wait_stream(side)
        graph = cuda.CUDAGraph()
        with cuda.graph(graph, pool=self._pool):
            hidden = self._decode_core(tok, pos, None, span, masked=True)
        log.debug("captured a decode graph for batch %d, span %d", b, span)
        return _Graph(graph, tok, pos, hidden)
