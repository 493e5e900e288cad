"""The decode step's layer loop, compiled with TorchScript.

Why TorchScript: on a CPU a decode step of a small model runs ~20 tensor
ops per layer, and calling fbgemm's int8 linear from Python costs ~20 us of
binding overhead per call (its packed weights are a TorchBind object, which
pybind converts with C++ exceptions on every call).  The same loop run by
the TorchScript interpreter calls it in well under a microsecond and cuts
the per-op overhead of everything else; measured on SmolLM2-135M, one
thread: ~25 ms -> ~17 ms per token (``bench/inference.py`` measures it).

``torch.jit.script`` is deprecated in torch 2.13 (a DeprecationWarning, which
we silence here) but works; the project pins torch.  If it is ever removed,
:func:`decode_layers` falls back to running the same function as Python.

The function is written in the TorchScript subset: no closures, typed
arguments, linear layers chosen by the ``int8`` flag (fbgemm packed weights)
or fp32 weight tensors.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["decode_layers"]

log = logging.getLogger(__name__)


def _decode_layers(
    x: torch.Tensor,
    freqs: torch.Tensor,
    mask: Optional[torch.Tensor],  # noqa: UP045 (TorchScript needs Optional)
    kcs: list[torch.Tensor],
    vcs: list[torch.Tensor],
    sl: torch.Tensor,
    pos: torch.Tensor,
    contiguous: bool,
    span: int,
    attn_norms: list[torch.Tensor],
    ffn_norms: list[torch.Tensor],
    packed: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    dense: list[torch.Tensor],
    int8: bool,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    inter: int,
    eps: float,
) -> torch.Tensor:
    """All layers for one token per row of ``x`` [B, hidden]; returns the last hidden state."""
    b = x.size(0)
    g = n_heads // n_kv
    nq = n_heads * head_dim
    nqk = (n_heads + n_kv) * head_dim
    hid = [x.size(1)]
    for i in range(len(kcs)):
        h = torch.rms_norm(x, hid, attn_norms[i], eps)
        if int8:
            qkv = torch.ops.quantized.linear_dynamic(h, packed[4 * i], True)
        else:
            qkv = F.linear(h, dense[4 * i])
        # RoPE on q and k at once, in place (rows are stored in interleaved pair order)
        qk = torch.view_as_complex(qkv[:, :nqk].view(b, n_heads + n_kv, head_dim // 2, 2))
        qk.mul_(freqs)
        kc = kcs[i]
        vc = vcs[i]
        idx: list[Optional[torch.Tensor]] = [sl, None, pos]  # noqa: UP045
        kc.index_put_(idx, qkv[:, nq:nqk].view(b, n_kv, head_dim))
        vc.index_put_(idx, qkv[:, nqk:].view(b, n_kv, head_dim))
        if contiguous:
            keys = kc[:b, :, :span]
            values = vc[:b, :, :span]
        else:
            keys = kc.index_select(0, sl)[:, :, :span]
            values = vc.index_select(0, sl)[:, :, :span]
        s = torch.matmul(qkv[:, :nq].view(b, n_kv, g, head_dim), keys.transpose(-1, -2))
        if mask is not None:
            s = s + mask
        o = torch.matmul(torch.softmax(s, dim=-1), values).view(b, nq)
        if int8:
            x = x + torch.ops.quantized.linear_dynamic(o, packed[4 * i + 1], True)
        else:
            x = x + F.linear(o, dense[4 * i + 1])
        h = torch.rms_norm(x, hid, ffn_norms[i], eps)
        if int8:
            gu = torch.ops.quantized.linear_dynamic(h, packed[4 * i + 2], True)
        else:
            gu = F.linear(h, dense[4 * i + 2])
        a = F.silu(gu[:, :inter]) * gu[:, inter:]
        if int8:
            x = x + torch.ops.quantized.linear_dynamic(a, packed[4 * i + 3], True)
        else:
            x = x + F.linear(a, dense[4 * i + 3])
    return x


def _compile() -> Any:
    src = _decode_layers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(src)
    except Exception as e:  # TorchScript gone or broken: same function, Python speed
        log.warning("TorchScript unavailable (%s); decode runs as Python", e)
        return src


decode_layers: Any = _compile()
