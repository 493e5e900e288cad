"""SmoothQuant for the int8 path: move activation outliers into the weights before quantizing.

fbgemm's int8 linear quantizes each input row to 7 bits with one range, so a
few large channels (LLM activations have them, mostly in fixed channels)
leave the rest with coarse steps.  For each linear we divide input channel
``j`` by ``s_j = max|x_j|^a / max|W_:j|^(1-a)`` (a = 0.5) and multiply column
``j`` of W by it, which leaves the product unchanged and balances the two
ranges (Xiao et al., *SmoothQuant*, 2022).  The division is folded into what
produces the input, so decoding costs nothing extra:

- q/k/v and gate/up read RMSNorm outputs: the norm weights are divided;
- o reads the attention output, a mix of V rows: the V rows are divided
  (one scale per V channel, shared by the query heads of its group);
- down reads ``silu(gate) * up``: the up rows are divided.

``max|x_j|`` comes from one fp32 pass over :data:`CALIBRATION_TEXT` at load
time, one layer at a time (only that layer's fp32 weights are alive).
Measured on SmolLM2-135M (int8 vs fp32 logits, 230 tokens of held-out text):
KL 0.063 -> 0.028 nats/token, greedy agreement 90 % -> 96 %.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from .llama import LlamaConfig

__all__ = ["CALIBRATION_TEXT", "LayerTensors", "calibrate_layer", "smooth_layer"]

ALPHA = 0.5

#: a little of everything a chat model sees: template markers, prose, code, numbers
CALIBRATION_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Tell me about the history of Rome in two sentences, then add 12345 and 678.<|im_end|>\n"
    "<|im_start|>assistant\nRome grew from a small city on the Tiber into an empire that ruled the "
    "Mediterranean for centuries; Augustus, Trajan and Marcus Aurelius are among its best known "
    "emperors. 12345 + 678 = 13023.\n\ndef add(a, b):\n    return a + b\n\nprint(add(12345, 678))  "
    "# 13023<|im_end|>\n<|im_start|>user\nMerci ! Et la capitale de l'Italie ?<|im_end|>\n"
)


@attrs.define
class LayerTensors:
    """One layer's fp32 weights in the engine's layout (q scaled, q/k rows interleaved)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor


def calibrate_layer(
    h: torch.Tensor, t: LayerTensors, cfg: LlamaConfig, freqs: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's output for hidden states ``h`` [T, hidden], and max |input| per channel of its linears."""
    n, hd, nh, nkv = h.shape[0], cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    hid = (cfg.hidden_size,)
    x1 = F.rms_norm(h, hid, t.attn_norm, cfg.rms_norm_eps)
    rot = freqs[:n].unsqueeze(1)
    q = torch.view_as_real(torch.view_as_complex((x1 @ t.q.T).reshape(n, nh, hd // 2, 2)) * rot)
    k = torch.view_as_real(torch.view_as_complex((x1 @ t.k.T).reshape(n, nkv, hd // 2, 2)) * rot)
    v = (x1 @ t.v.T).reshape(n, nkv, hd)
    attn = F.scaled_dot_product_attention(
        q.reshape(n, nh, hd).transpose(0, 1).unsqueeze(0),
        k.reshape(n, nkv, hd).transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        scale=1.0,
        enable_gqa=True,
    )
    o = attn[0].transpose(0, 1).reshape(n, nh * hd)
    h2 = h + o @ t.o.T
    x2 = F.rms_norm(h2, hid, t.ffn_norm, cfg.rms_norm_eps)
    a = F.silu(x2 @ t.gate.T) * (x2 @ t.up.T)
    out = h2 + a @ t.down.T
    stats = {
        "qkv": x1.abs().amax(0),
        "o": o.abs().amax(0),
        "gate_up": x2.abs().amax(0),
        "down": a.abs().amax(0),
    }
    return out, stats


def _factors(x_max: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    w_max = w.abs().amax(dim=0).clamp_min(1e-5)
    return (x_max.clamp_min(1e-5) ** ALPHA / w_max ** (1 - ALPHA)).clamp(1e-2, 1e2)


def smooth_layer(t: LayerTensors, stats: dict[str, torch.Tensor], cfg: LlamaConfig) -> LayerTensors:
    """The same layer with SmoothQuant factors folded in (equal outputs in exact arithmetic)."""
    qkv = torch.cat([t.q, t.k, t.v])
    s = _factors(stats["qkv"], qkv)
    q, k, v = t.q * s, t.k * s, t.v * s
    attn_norm = t.attn_norm / s
    s = _factors(stats["gate_up"], torch.cat([t.gate, t.up]))
    gate, up = t.gate * s, t.up * s
    ffn_norm = t.ffn_norm / s
    # o: one factor per V channel (kv head, dim), shared by the query heads reading it
    group = cfg.num_heads // cfg.num_kv_heads
    s_o = _factors(stats["o"], t.o).reshape(cfg.num_kv_heads, group, cfg.head_dim).amax(dim=1)
    o = t.o * s_o.repeat_interleave(group, dim=0).reshape(-1)
    v = v / s_o.reshape(-1, 1)
    s = _factors(stats["down"], t.down)
    down = t.down * s
    up = up / s.reshape(-1, 1)
    return LayerTensors(q, k, v, o, gate, up, down, attn_norm, ffn_norm)
