"""The batching core (inference.scheduler), driven without a model: Hypothesis state machine.

A simulated KV cache records which token sits at each position of each slot;
every plan is checked against it, so slot compaction (moves), chunked
prefill, backpressure and cancellation can never feed a sequence someone
else's cache.  Billing is checked on every chunk.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from inference.messages import FinalChunk, GenerateRequest, TokenChunk
from inference.scheduler import Plan, Scheduler, _stop_prefix_len
from inference.tiny import write_tiny_model
from inference.tokenizer import Tokenizer, tokenizer_from_hf_dir

VOCAB = 400
EOS = 2
_TOK: list[Tokenizer] = []


def tokenizer() -> Tokenizer:
    if not _TOK:
        import tempfile

        _TOK.append(tokenizer_from_hf_dir(write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")))
    return _TOK[0]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(slots=st.integers(1, 4), buffered=st.integers(1, 6), chunk=st.integers(2, 16))
    def setup(self, slots: int, buffered: int, chunk: int) -> None:
        self.sched = Scheduler(
            tokenizer(),
            vocab_size=VOCAB,
            slots=slots,
            context=96,
            max_tokens=40,
            rng=random.Random(0),
            prefill_chunk=chunk,
            max_buffered=buffered,
        )
        self.cache: dict[int, list[int | None]] = {s: [None] * 96 for s in range(slots)}
        self.now = 0.0
        self.n = 0
        self.received: dict[str, int] = {}  # rid -> token ids taken so far
        self.finals: dict[str, FinalChunk] = {}
        self.max_tokens: dict[str, int] = {}

    @rule(words=st.integers(1, 20), max_tokens=st.integers(1, 30), stop=st.booleans())
    def submit(self, words: int, max_tokens: int, stop: bool) -> None:
        rid = f"r{self.n}"
        self.n += 1
        req = GenerateRequest(
            request_id=rid,
            model="m",
            prompt="word " * words,
            max_tokens=max_tokens,
            temperature=0.0,
            stop_token_ids=(7,) if stop else (),
            ignore_eos=not stop,
        )
        self.sched.submit(req, self.now)
        self.received[rid] = 0
        self.max_tokens[rid] = max_tokens

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        self.now += 1.0
        plan = self.sched.plan(self.now)
        if plan is None:
            assert not self.sched.has_work()
            return
        self._check_against_cache(plan)
        n_sampled = (1 if plan.specs[0] is not None else 0) if plan.kind == "prefill" else len(plan.rids)
        sampled = [data.draw(st.sampled_from([5, 7, 11, 13, EOS, 99])) for _ in range(n_sampled)]
        self.sched.apply(plan, sampled, self.now)

    def _check_against_cache(self, plan: Plan) -> None:
        for src, dst, n in plan.moves:
            self.cache[dst][:n] = self.cache[src][:n]
        for i, rid in enumerate(plan.rids):
            seq = self.sched.seqs[rid]
            full = seq.prompt + seq.generated
            slot = plan.slots[i if plan.kind == "decode" else 0]
            assert seq.slot == slot
            if plan.kind == "prefill":
                start = plan.positions[0]
                assert list(plan.tokens) == seq.prompt[start : start + len(plan.tokens)]
                assert self.cache[slot][:start] == full[:start]
                self.cache[slot][start : start + len(plan.tokens)] = list(plan.tokens)
            else:
                pos = plan.positions[i]
                assert plan.tokens[i] == full[pos] == seq.generated[-1]
                assert self.cache[slot][:pos] == full[:pos]
                assert len(seq.pending_ids) < self.sched.max_buffered  # paused ones are left out
                self.cache[slot][pos] = plan.tokens[i]

    @precondition(lambda self: bool(self.received))
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.received)))
        chunk = self.sched.take(rid, self.now)
        if chunk is None:
            return
        assert rid not in self.finals
        self.received[rid] += len(chunk.token_ids)
        assert chunk.completion_tokens == self.received[rid]  # the billing invariant
        assert chunk.completion_tokens <= self.max_tokens[rid]
        if isinstance(chunk, FinalChunk):
            self.finals[rid] = chunk
            if chunk.finish_reason == "length":
                assert chunk.completion_tokens == self.max_tokens[rid]
            if chunk.finish_reason == "stop_token":
                assert chunk.token_ids[-1] in (7, EOS)  # stop_token_ids, or EOS when not ignored
        else:
            assert isinstance(chunk, TokenChunk)
            assert chunk.token_ids

    @precondition(lambda self: bool(self.received))
    @rule(data=st.data(), discard=st.booleans())
    def cancel(self, data: st.DataObject, discard: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.received)))
        if discard:
            self.sched.discard(rid)
            self.received.pop(rid)
        else:
            self.sched.cancel(rid)

    @invariant()
    def slots_are_compact_and_owned(self) -> None:
        if not hasattr(self, "sched"):
            return
        held = [s for s in self.sched.by_slot if s is not None]
        assert all(s.finish_reason is None for s in held)
        assert all(self.sched.by_slot[s.slot] is s for s in held if s.slot is not None)
        stats = self.sched.statistics()
        assert stats.running + stats.free_slots == self.sched.n_slots
        assert stats.waiting == len(self.sched.waiting)


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_everything_finishes_when_readers_keep_up() -> None:
    sched = Scheduler(
        tokenizer(), vocab_size=VOCAB, slots=2, context=128, max_tokens=64, rng=random.Random(1)
    )
    rids = []
    for i in range(5):
        req = GenerateRequest(
            f"q{i}", "m", 10 + i, prompt="hello " * (3 + i), temperature=0.0, ignore_eos=True
        )
        sched.submit(req, 0.0)
        rids.append(req.request_id)
    got = {r: 0 for r in rids}
    finals: dict[str, FinalChunk] = {}
    kinds = []
    for step in range(500):
        plan = sched.plan(float(step))
        if plan is None:
            break
        kinds.append(plan.kind)
        n = (1 if plan.specs[0] else 0) if plan.kind == "prefill" else len(plan.rids)
        sched.apply(plan, [5] * n, float(step))
        for r in rids:
            c = sched.take(r, float(step))
            if c is not None:
                got[r] += len(c.token_ids)
                if isinstance(c, FinalChunk):
                    finals[r] = c
    assert sorted(finals) == sorted(rids)
    assert all(finals[r].completion_tokens == got[r] == 10 + i for i, r in enumerate(rids))
    assert "prefill" in kinds
    assert "decode" in kinds
    assert sched.statistics().free_slots == 2
    assert max(f.queue_s for f in finals.values()) > 0


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("hello wor", ("world",), 3), ("abc", ("x",), 0), ("a<", ("<|im_end|>",), 1), ("ab", ("abc", "bx"), 2)],
)
def test_stop_prefix_hold_back(text: str, stops: tuple[str, ...], held: int) -> None:
    assert _stop_prefix_len(text, stops) == held
