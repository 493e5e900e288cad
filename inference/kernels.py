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

__all__ = ["decode_layers", "qlinear"]

log = logging.getLogger(__name__)


def _qlinear(
    x: torch.Tensor,
    packed: torch.classes.quantized.LinearPackedParamsBase,  # type: ignore[name-defined]
    guard: torch.Tensor,
) -> torch.Tensor:
    """``x @ W.T`` through fbgemm's int8 linear, each row quantized on its own range.

    fbgemm quantizes its input with one range per tensor: with several rows
    (a prompt, a batch) one large row would coarsen all others.  Each row is
    scaled to unit max-abs and a guard row (+1 ... -1) pins the range to
    [-1, 1]; the result is scaled back.  One row needs none of this.
    """
    b = x.size(0)
    if b == 1:
        y: torch.Tensor = torch.ops.quantized.linear_dynamic(x, packed, True)
        return y
    m = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    y = torch.ops.quantized.linear_dynamic(torch.cat([x / m, guard]), packed, True)
    return y[:b] * m


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
    guards: list[torch.Tensor],
    dense: list[torch.Tensor],
    int8: bool,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    inter: int,
    eps: float,
) -> torch.Tensor:
    """All layers for one token per row of ``x`` [B, hidden]; returns the last hidden state.

    Linear ``j`` of layer ``i`` (qkv, o, gate_up, down) is entry ``4 * i + j`` of
    the int8 lists (or of ``dense`` for fp32 weights).  qkv and gate/up read
    RMSNorm outputs, whose rows share one scale, so they take fbgemm's
    per-tensor range directly; o and down inputs vary in size from row to row
    and go through :func:`_qlinear` (measured on 8 mixed texts at batch 8: KL
    to fp32 0.090 this way, 0.098 with every linear per-row, 0.153 with none,
    at 25 % less cost than every linear per-row).
    """
    b = x.size(0)
    g = n_heads // n_kv
    nq = n_heads * head_dim
    nqk = (n_heads + n_kv) * head_dim
    hid = [x.size(1)]
    for i in range(len(kcs)):
        j = 4 * i
        h = torch.rms_norm(x, hid, attn_norms[i], eps)
        if int8:
            qkv = torch.ops.quantized.linear_dynamic(h, packed[j], True)
        else:
            qkv = F.linear(h, dense[j])
        # RoPE on q and k at once, in place (rows are stored in interleaved pair order)
        qk = torch.view_as_complex(qkv[:, :nqk].view(b, n_heads + n_kv, head_dim // 2, 2))
        qk.mul_(freqs)
        kc = kcs[i]
        vc = vcs[i]
        kc[sl, :, pos] = qkv[:, nq:nqk].view(b, n_kv, head_dim)
        vc[sl, :, pos] = qkv[:, nqk:].view(b, n_kv, head_dim)
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
            x = x + _qlinear(o, packed[j + 1], guards[j + 1])
        else:
            x = x + F.linear(o, dense[j + 1])
        h = torch.rms_norm(x, hid, ffn_norms[i], eps)
        if int8:
            gu = torch.ops.quantized.linear_dynamic(h, packed[j + 2], True)
        else:
            gu = F.linear(h, dense[j + 2])
        a = F.silu(gu[:, :inter]) * gu[:, inter:]
        if int8:
            x = x + _qlinear(a, packed[j + 3], guards[j + 3])
        else:
            x = x + F.linear(a, dense[j + 3])
    return x


def _compile(fn: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception as e:  # TorchScript gone or broken: same function, Python speed
        log.warning("TorchScript unavailable (%s); %s runs as Python", e, fn.__name__)
        return fn


qlinear: Any = _compile(_qlinear)
decode_layers: Any = _compile(_decode_layers)
