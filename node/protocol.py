"""The node's own protocol ids and messages (tags 510-529): how a sealed, paid generation runs.

One sealed stream (``/cocoon/generate/sealed/1``) carries one generation::

    client                                          worker
      SealedRequest(GenerateRequest)  ----------->   (opens it with its epoch keys)
                        <--------------------------  PromptQuote(prompt_tokens)
      [payment session opens on /cocoon/pay/1, keyed by the request id]
                        <--------------------------  TokenChunk* , FinalChunk
                                                     (each chunk waits for credit: metering)

``request_id`` is the hex of the payment session id, so the worker finds the
session that pays for this generation.  The client checks the quoted prompt
count against a bound it computes itself (:func:`prompt_token_bound`), pays
for the prompt, then for each token it actually received.
"""

from __future__ import annotations

import attrs

from overlay import wire

__all__ = [
    "GENERATE_SEALED",
    "PromptQuote",
    "prompt_token_bound",
]

GENERATE_SEALED = "/cocoon/generate/sealed/1"
TEMPLATE_SLACK = 96  # tokens a chat template may add beyond the turns (a default system prompt)


@wire.message(510)
@attrs.frozen
class PromptQuote:
    """The worker's count of prompt tokens (what the payment session prepays)."""

    request_id: str = attrs.field(metadata=wire.limits(max_len=64))
    prompt_tokens: int


def prompt_token_bound(prompt: str | None, messages: tuple[tuple[str, str], ...]) -> int:
    """The most prompt tokens an honest worker can count for this input.

    A byte-level BPE never needs more than one token per UTF-8 byte; a chat
    template adds special tokens and role names per turn, and some templates
    add a default system prompt (SmolLM2's is about 20 tokens): allowed for by
    a fixed ``TEMPLATE_SLACK``.  A dishonest worker can overcharge by at most
    that slack, once per request.
    """
    if prompt is not None:
        return len(prompt.encode()) + 8
    return sum(len(c.encode()) + len(r.encode()) + 16 for r, c in messages) + TEMPLATE_SLACK
