"""Wire messages of the generation protocol (tags 100-199).

One stream carries one generation::

    client                                   worker
      GenerateRequest  ------------------->
                       <-------------------  TokenChunk*   (cumulative completion_tokens)
                       <-------------------  FinalChunk    (usage, finish reason)
      [CancelGeneration  ---------------->   (optional; so does closing or resetting the stream)]

or, instead of chunks, one :class:`overlay.wire.ErrorFrame` whose ``code`` is
one of :data:`ERROR_CODES`.  The client keeps its side open until the final
chunk: an end of stream from the client means it went away.

The engines speak the same types: :class:`GenerateRequest` is the engine's
request, :class:`TokenChunk` / :class:`FinalChunk` its output.  The billing
invariant: the ``token_ids`` of every chunk of a generation (the final one
included) add up to ``FinalChunk.completion_tokens``, the terminating stop
token counted.
"""

from __future__ import annotations

import attrs

from overlay import wire

__all__ = [
    "ERROR_CODES",
    "FINISH_REASONS",
    "CancelGeneration",
    "ChatMessage",
    "Chunk",
    "FinalChunk",
    "GenerateRequest",
    "TokenChunk",
]


def _w(*, max_len: int | None = None, max_items: int | None = None) -> dict[str, dict[str, int]]:
    """Wire limits as attrs metadata (keeps mypy's attrs plugin exact about defaults)."""
    meta: dict[str, int] = {}
    if max_len is not None:
        meta["max_len"] = max_len
    if max_items is not None:
        meta["max_items"] = max_items
    return {"wire": meta}


MAX_PROMPT_CHARS = 256 * 1024  # characters of one prompt or one chat message
MAX_CHUNK_TOKENS = 1024  # token ids in one chunk message
MAX_CONTINUATION = 16384  # token ids a resumed request may carry

#: finish reasons of a FinalChunk
FINISH_REASONS = frozenset({"stop_token", "stop_string", "length", "cancelled", "error"})

#: stable codes of the ErrorFrames a worker answers with
ERROR_CODES = frozenset(
    {
        "unknown_model",
        "context_length_exceeded",
        "max_tokens_too_large",
        "invalid_sampling",
        "bad_request",
        "overloaded",
        "generation_failed",
        "device_lost",
        "internal",
    }
)


@attrs.frozen
class ChatMessage:
    """One turn of a chat: role is system | user | assistant | tool."""

    role: str = attrs.field(metadata=_w(max_len=16))
    content: str = attrs.field(metadata=_w(max_len=MAX_PROMPT_CHARS))


@wire.message(100)
@attrs.frozen
class GenerateRequest:
    """Generate a completion for ``prompt`` (raw text) or ``messages`` (rendered with the chat template).

    Exactly one of ``prompt`` / ``messages`` is set.  ``temperature`` 0 means
    greedy; ``top_k`` 0 and ``top_p`` 1.0 disable those filters; ``seed`` makes
    sampling reproducible.  Generation stops at an EOS / end-of-turn token
    (unless ``ignore_eos``), at one of ``stop`` (not emitted), at one of
    ``stop_token_ids``, or after ``max_tokens``.

    ``continuation`` resumes a generation another worker began (it died
    mid-stream): the token ids the client already received are appended to
    the rendered prompt, count as prompt tokens, and are not sent again;
    ``max_tokens`` counts only the new tokens.
    """

    request_id: str = attrs.field(metadata=_w(max_len=64))
    model: str = attrs.field(metadata=_w(max_len=256))
    max_tokens: int
    prompt: str | None = attrs.field(default=None, metadata=_w(max_len=MAX_PROMPT_CHARS))
    messages: tuple[ChatMessage, ...] = attrs.field(default=(), metadata=_w(max_items=256))
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = attrs.field(default=(), metadata=_w(max_items=16, max_len=256))
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), metadata=_w(max_items=16))
    ignore_eos: bool = False
    continuation: tuple[int, ...] = attrs.field(default=(), metadata=_w(max_items=MAX_CONTINUATION))


@wire.message(101)
@attrs.frozen
class TokenChunk:
    """Tokens generated since the previous chunk.

    ``text`` may be "" while a partial character or a possible stop string is held back.
    """

    request_id: str = attrs.field(metadata=_w(max_len=64))
    token_ids: tuple[int, ...] = attrs.field(metadata=_w(max_items=MAX_CHUNK_TOKENS))
    text: str = attrs.field(metadata=_w(max_len=64 * 1024))
    completion_tokens: int  # cumulative, this chunk included


@wire.message(102)
@attrs.frozen
class FinalChunk:
    """The last message of a generation: its remaining tokens and text, and the usage."""

    request_id: str = attrs.field(metadata=_w(max_len=64))
    token_ids: tuple[int, ...] = attrs.field(metadata=_w(max_items=MAX_CHUNK_TOKENS))
    text: str = attrs.field(metadata=_w(max_len=64 * 1024))
    completion_tokens: int  # cumulative = total billed completion tokens
    prompt_tokens: int
    finish_reason: str = attrs.field(metadata=_w(max_len=16))
    ttft_s: float  # seconds from request arrival to the first token
    decode_tok_per_s: float  # completion tokens after the first / their decode time
    queue_s: float = 0.0  # seconds the request waited for a batch slot


@wire.message(103)
@attrs.frozen
class CancelGeneration:
    """The client does not want more tokens; the worker answers with a FinalChunk (reason cancelled)."""

    request_id: str = attrs.field(metadata=_w(max_len=64))


Chunk = TokenChunk | FinalChunk
