"""Token sampling from a batch of logits: greedy, temperature, top-k, top-p, seeded.

Runs in the model thread.  Each request owns a ``torch.Generator`` (seeded
from the request's ``seed``, or from the engine's random source), so a seeded
request draws the same tokens whatever else is in its batch, given the same
logits.
"""

from __future__ import annotations

import attrs
import torch

__all__ = ["SampleSpec", "sample"]


@attrs.frozen(eq=False)
class SampleSpec:
    """How to pick one row's next token; temperature 0 is greedy."""

    temperature: float
    top_k: int  # 0 = no limit
    top_p: float  # 1.0 = no limit
    generator: torch.Generator | None


def _sample_row(logits: torch.Tensor, spec: SampleSpec) -> int:
    scores = logits.float().cpu() / spec.temperature  # the generators live on the CPU (a no-op there)
    if spec.top_k and spec.top_k < scores.shape[-1]:
        values, index = torch.topk(scores, spec.top_k)
    else:
        values, index = torch.sort(scores, descending=True)
    if spec.top_p < 1.0:
        if spec.top_k:
            values, order = torch.sort(values, descending=True)
            index = index[order]
        probs = torch.softmax(values, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(torch.searchsorted(torch.cumsum(probs, dim=-1), torch.tensor([spec.top_p])).item()) + 1
        values, index = values[:keep], index[:keep]
    probs = torch.softmax(values, dim=-1)
    choice = torch.multinomial(probs, 1, generator=spec.generator)
    return int(index[choice].item())


def sample(logits: torch.Tensor, specs: list[SampleSpec]) -> list[int]:
    """One token id per row of ``logits`` [B, vocab] (on any device; greedy rows never leave it)."""
    greedy = logits.argmax(dim=-1).tolist()
    return [
        g if s.temperature <= 0.0 else _sample_row(logits[i], s)
        for i, (g, s) in enumerate(zip(greedy, specs, strict=True))
    ]
