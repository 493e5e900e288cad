"""Continuous batching, the pure core of the CPU engine.

Theory of operation.  Requests are *sequences*; the model has ``slots`` KV
cache rows of ``context`` positions.  A sequence moves through::

    waiting --admit--> prefilling --last prompt chunk--> decoding --stop--> finished
       \\______________________ cancel (any time) _______________________/

The shell loops ``plan(now) -> run the plan in the model thread -> apply(plan,
sampled, now)``.  :meth:`Scheduler.plan` picks one forward pass: a prompt
chunk of the oldest prefilling sequence, or one decode step over every
decoding sequence; when both kinds are pending it alternates, so a new prompt
waits at most one decode step and running streams stall at most one chunk.
Running sequences sit in slots ``0..n-1``: a freed slot is refilled by moving
the highest one down (the move is part of the next plan, done by the model
thread before the forward pass), so a decode step reads its cache as views.

Backpressure: generated tokens and text accumulate per sequence until the
reader :meth:`take`s them as one chunk; a sequence holding ``max_buffered``
untaken tokens is left out of decode steps (paused) until its reader catches
up, so a slow reader slows only itself.

Billing: every sampled token is appended to ``generated`` and to the pending
ids that the next chunk carries, including the stop token, whose text is never
rendered.  The final chunk's ``completion_tokens`` is ``len(generated)``.

No clock, no threads, no awaits: ``now`` is passed in, and randomness comes
from the ``random.Random`` given to the constructor (seeds for requests
without one).
"""

from __future__ import annotations

import random
from collections import deque

import attrs
import torch

from .engine import EngineStats, MalformedRequest, Overloaded, encode_request
from .messages import Chunk, FinalChunk, GenerateRequest, TokenChunk
from .sampling import SampleSpec
from .tokenizer import Detokenizer, Tokenizer

__all__ = ["Plan", "Scheduler", "Sequence"]


@attrs.define(eq=False)
class Sequence:
    """One request's state."""

    req: GenerateRequest
    prompt: list[int]
    spec: SampleSpec
    stop_ids: frozenset[int]
    detok: Detokenizer
    arrived: float
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    generated: list[int] = attrs.Factory(list)
    pending_ids: list[int] = attrs.Factory(list)  # sampled, not yet taken
    pending_text: str = ""  # rendered, safe to emit, not yet taken
    held_text: str = ""  # rendered but possibly the start of a stop string
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finish_reason: str | None = None
    final_sent: bool = False

    @property
    def rid(self) -> str:
        return self.req.request_id

    @property
    def cached(self) -> int:
        """Positions of this sequence already in its cache slot."""
        return self.prefilled + max(len(self.generated) - 1, 0)

    @property
    def decoding(self) -> bool:
        return self.finish_reason is None and self.prefilled == len(self.prompt) and bool(self.generated)


@attrs.frozen(eq=False)
class Plan:
    """One forward pass for the model thread.

    ``kind`` "prefill": ``tokens`` at positions ``start..`` of ``slots[0]``,
    sampling with ``specs[0]`` when it is not None (the last prompt chunk).
    ``kind`` "decode": ``tokens[i]`` at ``positions[i]`` of ``slots[i]``.
    ``moves`` (src, dst, length) are applied to the cache first.
    """

    kind: str
    rids: tuple[str, ...]
    slots: tuple[int, ...]
    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    specs: tuple[SampleSpec | None, ...]
    moves: tuple[tuple[int, int, int], ...]


class Scheduler:
    """Admission, slot allocation, step planning, stop detection and chunking."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        vocab_size: int,
        slots: int,
        context: int,
        max_tokens: int,
        rng: random.Random,
        prefill_chunk: int = 256,
        max_buffered: int = 64,
        max_waiting: int = 256,
    ) -> None:
        self.tok = tokenizer
        self.vocab_size = vocab_size
        self.n_slots = slots
        self.context = context
        self.max_tokens = max_tokens
        self.rng = rng
        self.prefill_chunk = prefill_chunk
        self.max_buffered = max_buffered
        self.max_waiting = max_waiting
        self.seqs: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.by_slot: list[Sequence | None] = [None] * slots
        self._moves: list[tuple[int, int, Sequence]] = []  # lengths resolved at plan time
        self._last_kind = "decode"
        self.completed = self.cancelled = self.failed = 0
        self.prompt_tokens = self.completion_tokens = self.steps = 0

    # ------------------------------------------------------------------ requests

    def submit(self, req: GenerateRequest, now: float) -> Sequence:
        """Validate, tokenize and queue a request; raises a BadRequest subclass or Overloaded."""
        prompt = self.encode(req)
        if req.request_id in self.seqs:
            raise MalformedRequest(f"request id {req.request_id!r} is already in flight")
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self.waiting)} requests already queued")
        seed = req.seed if req.seed is not None else self.rng.getrandbits(63)
        gen = None
        if req.temperature > 0:
            gen = torch.Generator().manual_seed(seed)
        spec = SampleSpec(req.temperature, req.top_k, req.top_p, gen)
        stop_ids = set(req.stop_token_ids)
        if not req.ignore_eos:
            stop_ids.update(self.tok.eos_token_ids)
        seq = Sequence(req, prompt, spec, frozenset(stop_ids), Detokenizer(self.tok, req.continuation), now)
        self.seqs[req.request_id] = seq
        self.waiting.append(seq)
        self.prompt_tokens += len(prompt)
        return seq

    def encode(self, req: GenerateRequest) -> list[int]:
        """The request's prompt ids (template + continuation), after every check."""
        return encode_request(
            req, self.tok, vocab_size=self.vocab_size, max_tokens=self.max_tokens, context=self.context
        )

    def cancel(self, rid: str) -> bool:
        """Stop a request; its reader gets a final chunk with reason ``cancelled``."""
        seq = self.seqs.get(rid)
        if seq is None or seq.finish_reason is not None:
            return False
        self._finish(seq, "cancelled")
        return True

    def discard(self, rid: str) -> None:
        """The reader is gone: cancel if running and forget the request."""
        seq = self.seqs.get(rid)
        if seq is None:
            return
        if seq.finish_reason is None:
            self._finish(seq, "cancelled")
        seq.final_sent = True
        self._forget(seq)

    def take(self, rid: str, now: float) -> Chunk | None:
        """Everything generated for ``rid`` since the last take, as one chunk (None if nothing)."""
        seq = self.seqs.get(rid)
        if seq is None or seq.final_sent:
            return None
        if seq.finish_reason is not None:
            seq.final_sent = True
            self._forget(seq)
            return self._final(seq)
        if not seq.pending_ids:
            return None
        ids, text = tuple(seq.pending_ids), seq.pending_text
        seq.pending_ids, seq.pending_text = [], ""
        return TokenChunk(rid, ids, text, len(seq.generated))

    def _final(self, seq: Sequence) -> FinalChunk:
        n = len(seq.generated)
        first, last = seq.first_token, seq.last_token
        ttft = (first - seq.arrived) if first is not None else 0.0
        rate = 0.0
        if first is not None and last is not None and n > 1 and last > first:
            rate = (n - 1) / (last - first)
        queue = (seq.admitted - seq.arrived) if seq.admitted is not None else 0.0
        ids, text = tuple(seq.pending_ids), seq.pending_text
        seq.pending_ids, seq.pending_text = [], ""
        return FinalChunk(
            request_id=seq.rid,
            token_ids=ids,
            text=text,
            completion_tokens=n,
            prompt_tokens=len(seq.prompt),
            finish_reason=seq.finish_reason or "error",
            ttft_s=max(ttft, 0.0),
            decode_tok_per_s=rate,
            queue_s=max(queue, 0.0),
        )

    # ------------------------------------------------------------------ planning

    def _free_slot(self, seq: Sequence) -> None:
        slot = seq.slot
        if slot is None:
            return
        seq.slot = None
        self.by_slot[slot] = None
        last = max((i for i, s in enumerate(self.by_slot) if s is not None), default=-1)
        if last > slot:
            mover = self.by_slot[last]
            assert mover is not None
            self.by_slot[last], self.by_slot[slot] = None, mover
            mover.slot = slot
            self._moves.append((last, slot, mover))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if reason != "stop_string":  # a stop string's held text is dropped with it
            seq.pending_text += seq.held_text + seq.detok.flush()
        seq.held_text = ""
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._free_slot(seq)
        if reason == "cancelled":
            self.cancelled += 1
        elif reason == "error":
            self.failed += 1
        else:
            self.completed += 1

    def _forget(self, seq: Sequence) -> None:
        if self.seqs.get(seq.rid) is seq and seq.final_sent:
            del self.seqs[seq.rid]

    def _admit(self, now: float) -> None:
        while self.waiting and None in self.by_slot:
            seq = self.waiting.popleft()
            slot = self.by_slot.index(None)
            self.by_slot[slot] = seq
            seq.slot = slot
            seq.admitted = now

    def has_work(self) -> bool:
        """Whether :meth:`plan` would return a forward pass."""
        if self.waiting and None in self.by_slot:
            return True
        for s in self.by_slot:
            if s is None or s.finish_reason is not None:
                continue
            if not s.decoding or len(s.pending_ids) < self.max_buffered:
                return True
        return False

    def plan(self, now: float) -> Plan | None:
        """The next forward pass, or None when nothing can run."""
        self._admit(now)
        prefilling = [s for s in self.by_slot if s is not None and s.finish_reason is None and not s.decoding]
        decoding = [
            s for s in self.by_slot if s is not None and s.decoding and len(s.pending_ids) < self.max_buffered
        ]
        if prefilling and (not decoding or self._last_kind == "decode"):
            seq = min(prefilling, key=lambda s: s.arrived)
            start = seq.prefilled
            end = min(len(seq.prompt), start + self.prefill_chunk)
            assert seq.slot is not None
            plan = Plan(
                "prefill",
                (seq.rid,),
                (seq.slot,),
                tuple(seq.prompt[start:end]),
                (start,),
                (seq.spec if end == len(seq.prompt) else None,),
                self._take_moves(),
            )
        elif decoding:
            decoding.sort(key=lambda s: s.slot if s.slot is not None else -1)
            plan = Plan(
                "decode",
                tuple(s.rid for s in decoding),
                tuple(s.slot for s in decoding if s.slot is not None),
                tuple(s.generated[-1] for s in decoding),
                tuple(s.cached for s in decoding),
                tuple(s.spec for s in decoding),
                self._take_moves(),
            )
        else:
            return None
        self._last_kind = plan.kind
        return plan

    def _take_moves(self) -> tuple[tuple[int, int, int], ...]:
        moves = tuple((src, dst, seq.cached) for src, dst, seq in self._moves)
        self._moves = []
        return moves

    # ------------------------------------------------------------------ results

    def apply(self, plan: Plan, sampled: list[int], now: float) -> None:
        """Record a finished forward pass: ``sampled`` has one id per row that sampled."""
        self.steps += 1
        if plan.kind == "prefill":
            seq = self.seqs.get(plan.rids[0])
            if seq is None or seq.finish_reason is not None:
                return
            seq.prefilled = plan.positions[0] + len(plan.tokens)
            if plan.specs[0] is not None:
                self._add_token(seq, sampled[0], now)
            return
        for rid, token in zip(plan.rids, sampled, strict=True):
            seq = self.seqs.get(rid)
            if seq is not None and seq.finish_reason is None:
                self._add_token(seq, token, now)

    def fail(self, plan: Plan) -> None:
        """The forward pass raised: end its sequences with reason ``error``."""
        for rid in plan.rids:
            seq = self.seqs.get(rid)
            if seq is not None and seq.finish_reason is None:
                self._finish(seq, "error")

    def fail_all(self) -> list[str]:
        """End every unfinished request with reason ``error`` (the device is lost); returns their ids."""
        failed = [rid for rid, seq in self.seqs.items() if seq.finish_reason is None]
        for rid in failed:
            self._finish(self.seqs[rid], "error")
        return failed

    def _add_token(self, seq: Sequence, token: int, now: float) -> None:
        seq.generated.append(token)
        seq.pending_ids.append(token)
        self.completion_tokens += 1
        if seq.first_token is None:
            seq.first_token = now
        seq.last_token = now
        if token in seq.stop_ids:
            self._finish(seq, "stop_token")
            return
        text = seq.held_text + seq.detok.add(token)
        for stop in seq.req.stop:
            i = text.find(stop)
            if i >= 0:
                seq.pending_text += text[:i]
                self._finish(seq, "stop_string")
                return
        hold = _stop_prefix_len(text, seq.req.stop)
        seq.pending_text += text[: len(text) - hold]
        seq.held_text = text[len(text) - hold :]
        if len(seq.generated) >= seq.req.max_tokens or seq.cached >= self.context:
            self._finish(seq, "length")

    # ------------------------------------------------------------------ introspection

    def statistics(self) -> EngineStats:
        running = [s for s in self.by_slot if s is not None]
        return EngineStats(
            running=len(running),
            waiting=len(self.waiting),
            paused=sum(1 for s in running if s.decoding and len(s.pending_ids) >= self.max_buffered),
            free_slots=self.n_slots - len(running),
            completed=self.completed,
            cancelled=self.cancelled,
            failed=self.failed,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            steps=self.steps,
        )


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
