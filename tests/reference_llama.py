"""A plain-torch Llama on the Hugging Face layout, for diagnosing engines (tests only; no transformers).

It runs a prompt the way exllamav2's and exllamav3's generators do (the
prompt but its last token as one chunk, then one token at a time) and can
drop the causal mask of that chunk, the fault of exllamav2 0.3.2's SDPA path.
``greedy`` returns the logits of the first step and the greedy ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["greedy"]


def greedy(
    model_dir: Path,
    ids: list[int],
    n: int,
    *,
    causal_prompt: bool = True,
    rope_theta: float | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[int]]:
    """(float32 logits of the first generated token [vocab], ``n`` greedy ids)."""
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    sd = {
        k: v.to(device=device, dtype=dtype)
        for k, v in load_file(str(model_dir / "model.safetensors")).items()
    }
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    keys = ("num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers")
    h, kvh, d, layers = (int(cfg[k]) for k in keys)
    theta = rope_theta or cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device).float() / d))
    cache_k: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    cache_v: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def norm(x: torch.Tensor, w: str) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), sd[w], float(cfg["rms_norm_eps"]))

    def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # rotate-half, cos/sin in fp32 then cast
        ang = pos[:, None].float() * inv[None]
        emb = torch.cat([ang, ang], -1)
        c, s = emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)
        return x * c + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * s

    def forward(toks: list[int], start: int, causal: bool) -> torch.Tensor:
        t = len(toks)
        pos = torch.arange(start, start + t, device=device)
        x = sd["model.embed_tokens.weight"][torch.tensor(toks, device=device)]
        for i in range(layers):
            p = f"model.layers.{i}."
            a = norm(x, p + "input_layernorm.weight")
            q = rope((a @ sd[p + "self_attn.q_proj.weight"].T).view(t, h, d), pos)
            cache_k[i].append(rope((a @ sd[p + "self_attn.k_proj.weight"].T).view(t, kvh, d), pos))
            cache_v[i].append((a @ sd[p + "self_attn.v_proj.weight"].T).view(t, kvh, d))
            k = torch.cat(cache_k[i]).repeat_interleave(h // kvh, 1).transpose(0, 1)
            v = torch.cat(cache_v[i]).repeat_interleave(h // kvh, 1).transpose(0, 1)
            mask = torch.arange(start + t, device=device)[None] <= pos[:, None] if causal else None
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask)
            x = x + o.transpose(0, 1).reshape(t, h * d) @ sd[p + "self_attn.o_proj.weight"].T
            a = norm(x, p + "post_attention_layernorm.weight")
            gate, up = a @ sd[p + "mlp.gate_proj.weight"].T, a @ sd[p + "mlp.up_proj.weight"].T
            x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
        return (norm(x[-1], "model.norm.weight") @ sd["lm_head.weight"].T).float()

    with torch.no_grad():
        if len(ids) > 1:
            forward(ids[:-1], 0, causal_prompt)
        logits = first = forward(ids[-1:], len(ids) - 1, True)
        out: list[int] = []
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = forward(out[-1:], len(ids) + len(out) - 1, True)
    return first, out
