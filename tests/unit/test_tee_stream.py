"""SealedStream over in-memory streams, with a relay in the middle that sees (and tampers with) every byte."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio

from node.tee import ReplayGuard, SealedStream, new_epoch_keys
from node.tee.claims import EpochKeys
from overlay import wire
from overlay.errors import RemoteError, SealError, StreamBroken
from overlay.streams import FramedStream, MessageStream, memory_stream_pair

PROMPT = "The launch code is 7-alpha-tango-9; tell nobody."
ANSWER = ["Under", "stood", ", the", " code", " stays", " secret", "."]


@wire.message(397)
@attrs.frozen
class _Prompt:
    text: str


@wire.message(398)
@attrs.frozen
class _Token:
    text: str
    n: int


def _keys(epoch: int = 3) -> EpochKeys:
    return new_epoch_keys(
        tier="none",
        peer_id="worker",
        model_id="tiny",
        model_hash=bytes(32),
        epoch=epoch,
        epoch_beacon=bytes(32),
        issued_at=0,
        not_after=10**10,
    )


KEYS = _keys()

Hook = Callable[[str, int, bytes], list[bytes]]


def _passthrough(direction: str, index: int, frame: bytes) -> list[bytes]:
    return [frame]


class Relay:
    """Forwards frames between two framed streams, recording every byte, optionally tampering."""

    def __init__(self, hook: Hook = _passthrough) -> None:
        self.hook = hook
        self.seen = bytearray()
        self.frames: dict[str, list[bytes]] = {"c2w": [], "w2c": []}

    async def pump(self, src: FramedStream, dst: FramedStream, direction: str) -> None:
        index = 0
        try:
            while (frame := await src.receive_raw()) is not None:
                self.seen += frame
                self.frames[direction].append(frame)
                out = self.hook(direction, index, frame)
                index += 1
                if out:
                    await dst.send_frames(out)
        except StreamBroken:
            await dst.reset()
            return
        await dst.aclose()


async def echo_service(stream: MessageStream) -> None:
    """A service written against MessageStream: one prompt in, numbered tokens out."""
    msg = await stream.receive()
    assert isinstance(msg, _Prompt)
    for i, text in enumerate(ANSWER):
        await stream.send(_Token(text=text, n=i + 1))
    await stream.aclose()


async def _run(
    hook: Hook = _passthrough,
    *,
    client_claims_keys: EpochKeys = KEYS,
    held: EpochKeys = KEYS,
    service: Callable[[MessageStream], Awaitable[None]] = echo_service,
    replay: ReplayGuard | None = None,
) -> tuple[list[object], BaseException | None, BaseException | None, Relay]:
    c_raw, r1 = memory_stream_pair()
    r2, w_raw = memory_stream_pair()
    relay = Relay(hook)
    got: list[object] = []
    errors: dict[str, BaseException | None] = {"client": None, "worker": None}

    async def client() -> None:
        stream = SealedStream.client(FramedStream(c_raw, peer_id="worker"), client_claims_keys.claims)
        try:
            await stream.send(_Prompt(text=PROMPT))
            while (msg := await stream.receive()) is not None:
                got.append(msg)
        except (SealError, RemoteError, StreamBroken) as e:
            errors["client"] = e
        finally:
            await stream.aclose()

    async def worker() -> None:
        framed = FramedStream(w_raw, peer_id="client")
        try:
            stream = await SealedStream.accept(framed, {held.claims_hash: held}.get, replay=replay)
            await service(stream)
        except (SealError, StreamBroken) as e:
            errors["worker"] = e

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            nursery.start_soon(worker)
            nursery.start_soon(relay.pump, FramedStream(r1), FramedStream(r2), "c2w")
            nursery.start_soon(relay.pump, FramedStream(r2), FramedStream(r1), "w2c")
    return got, errors["client"], errors["worker"], relay


async def test_relay_learns_nothing() -> None:
    got, c_err, w_err, relay = await _run()
    assert (c_err, w_err) == (None, None)
    assert [t.text for t in got] == ANSWER  # type: ignore[attr-defined]
    seen = bytes(relay.seen)
    assert len(seen) > 200
    for secret in [PROMPT, "launch code", "7-alpha-tango", *ANSWER[1:6]]:
        assert secret.encode() not in seen
    assert PROMPT.encode() not in seen.replace(b"\0", b"")
    assert len(relay.frames["w2c"]) == len(ANSWER) + 1  # tokens + the final chunk


async def test_truncation_is_detected() -> None:
    def drop_final(direction: str, index: int, frame: bytes) -> list[bytes]:
        return [] if direction == "w2c" and index == len(ANSWER) else [frame]

    got, c_err, _, _ = await _run(drop_final)
    assert isinstance(c_err, SealError)
    assert "truncated" in str(c_err)
    assert len(got) == len(ANSWER)  # every token arrived; only the end is missing


async def test_reordering_and_replay_are_detected() -> None:
    held: list[bytes] = []

    def swap(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "w2c" and index == 1:
            held.append(frame)
            return []
        if direction == "w2c" and index == 2:
            return [frame, held[0]]
        return [frame]

    got, c_err, _, _ = await _run(swap)
    assert isinstance(c_err, SealError)
    assert len(got) == 1

    def dup(direction: str, index: int, frame: bytes) -> list[bytes]:
        return [frame, frame] if direction == "w2c" and index == 2 else [frame]

    got, c_err, _, _ = await _run(dup)
    assert isinstance(c_err, SealError)
    assert "replayed" in str(c_err)


async def test_splicing_between_streams_is_detected() -> None:
    _, _, _, first = await _run()
    foreign = first.frames["w2c"]

    def splice(direction: str, index: int, frame: bytes) -> list[bytes]:
        return [foreign[index]] if direction == "w2c" and index == 2 else [frame]

    got, c_err, _, _ = await _run(splice)
    assert isinstance(c_err, SealError)
    assert len(got) == 2


async def test_injected_plaintext_is_detected() -> None:
    def inject(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "w2c" and index == 3:
            return [wire.encode(_Token(text="forged", n=99)), frame]
        return [frame]

    _, c_err, _, _ = await _run(inject)
    assert isinstance(c_err, SealError)

    def error_frame(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "w2c" and index == 3:
            return [wire.encode(wire.ErrorFrame("overloaded", "go away"))]
        return [frame]

    _, c_err, _, _ = await _run(error_frame)
    assert isinstance(c_err, SealError)  # mid-stream, an unauthenticated error frame is an attack


async def test_request_sealed_to_other_claims() -> None:
    got, c_err, w_err, relay = await _run(held=_keys(epoch=4))
    assert isinstance(w_err, SealError)
    assert isinstance(c_err, RemoteError)
    assert c_err.code == "seal_error"
    assert got == []
    assert PROMPT.encode() not in bytes(relay.seen)


async def test_replayed_request_is_refused() -> None:
    guard = ReplayGuard()
    _, _, _, first = await _run(replay=guard)
    captured = first.frames["c2w"][0]

    def replay_first(direction: str, index: int, frame: bytes) -> list[bytes]:
        return [captured] if direction == "c2w" and index == 0 else [frame]

    _, c_err, w_err, _ = await _run(replay_first, replay=guard)
    assert isinstance(w_err, SealError)
    assert "replayed" in str(w_err)
    assert c_err is not None


async def test_worker_reads_client_messages_and_close() -> None:
    """Both directions are sealed; the client's close is an authenticated final chunk."""
    received: list[object] = []

    async def chatty(stream: MessageStream) -> None:
        received.append(await stream.receive())
        await stream.send(_Token(text="ok", n=1))
        received.append(await stream.receive())  # the client's second message
        received.append(await stream.receive())  # None: the client's final chunk and EOF
        await stream.aclose()

    c_raw, w_raw = memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def worker() -> None:
                stream = await SealedStream.accept(FramedStream(w_raw), {KEYS.claims_hash: KEYS}.get)
                assert stream.stream_id
                await chatty(stream)

            nursery.start_soon(worker)
            client = SealedStream.client(FramedStream(c_raw, peer_id="w"), KEYS.claims)
            assert client.peer_id == "w"
            await client.send(_Prompt(text="hi"))
            assert await client.receive() == _Token(text="ok", n=1)
            await client.send(_Prompt(text="more"))
            await client.aclose()
    assert received == [_Prompt(text="hi"), _Prompt(text="more"), None]


async def test_receive_waits_for_the_request() -> None:
    c_raw, w_raw = memory_stream_pair()
    client = SealedStream.client(FramedStream(c_raw), KEYS.claims)
    out: list[object] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                out.extend([m async for m in client])

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await client.send(_Prompt(text="x"))
            stream = await SealedStream.accept(FramedStream(w_raw), {KEYS.claims_hash: KEYS}.get)
            await echo_service(stream)
    assert [t.n for t in out] == list(range(1, len(ANSWER) + 1))  # type: ignore[attr-defined]


async def test_accept_rejects_plaintext_and_early_eof() -> None:
    c_raw, w_raw = memory_stream_pair()
    with trio.fail_after(10):
        await FramedStream(c_raw).send(_Prompt(text=PROMPT))
        with pytest.raises(SealError):
            await SealedStream.accept(FramedStream(w_raw), {KEYS.claims_hash: KEYS}.get)
        c_raw, w_raw = memory_stream_pair()
        await FramedStream(c_raw).aclose()
        with pytest.raises(StreamBroken):
            await SealedStream.accept(FramedStream(w_raw), {KEYS.claims_hash: KEYS}.get)


def test_sealed_stream_is_a_message_stream() -> None:
    a, _ = memory_stream_pair()
    stream: MessageStream = SealedStream.client(FramedStream(a), KEYS.claims)
    assert stream.peer_id == ""


async def _one_exchange(worker_keys: EpochKeys) -> tuple[SealedStream, list[object], BaseException | None]:
    c_raw, w_raw = memory_stream_pair()
    client = SealedStream.client(FramedStream(c_raw), KEYS.claims)
    got: list[object] = []
    error: BaseException | None = None
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def worker() -> None:
                stream = await SealedStream.accept(FramedStream(w_raw), {KEYS.claims_hash: worker_keys}.get)
                await echo_service(stream)

            nursery.start_soon(worker)
            await client.send(_Prompt(text=PROMPT))
            try:
                async for m in client:
                    got.append(m)
            except SealError as e:
                error = e
            await client.aclose()
    return client, got, error


async def test_transcript_signature_is_third_party_evidence() -> None:
    from node.tee import verify_transcript
    from node.tee.seal import Transcript

    client, got, error = await _one_exchange(KEYS)
    assert error is None
    t = client.transcript
    assert t is not None
    assert (t.sent, t.received) == (len(ANSWER), 1)
    assert t.stream_id == client.stream_id
    verify_transcript(t, KEYS.claims)  # anyone with the claims can check it
    sent, received = Transcript(), Transcript()  # ...and recompute the hashes from the plaintexts
    for msg in got:
        sent.add(wire.encode(msg))
    received.add(wire.encode(_Prompt(text=PROMPT)))
    assert (sent.digest, received.digest) == (t.sent_hash, t.received_hash)
    with pytest.raises(SealError):
        verify_transcript(attrs.evolve(t, sent=t.sent - 1), KEYS.claims)  # a worker denying a token


async def test_transcript_signed_by_an_unattested_key_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    rogue = attrs.evolve(KEYS, sig_key=Ed25519PrivateKey.generate())  # holds the X25519 key, not the Ed25519
    client, got, error = await _one_exchange(rogue)
    assert isinstance(error, SealError)
    assert len(got) == len(ANSWER)
    assert client.transcript is None


async def test_bare_final_from_worker_is_refused() -> None:
    from node.tee.seal import open_request

    c_raw, w_raw = memory_stream_pair()
    client = SealedStream.client(FramedStream(c_raw), KEYS.claims)
    worker = FramedStream(w_raw)
    with trio.fail_after(10):
        await client.send(_Prompt(text="x"))
        request = await worker.receive()
        assert request is not None
        _, session = open_request(request, KEYS)  # type: ignore[arg-type]
        await worker.send_raw(session.send.seal_frame(b"", final=True))
        await worker.aclose()
        with pytest.raises(SealError, match="transcript"):
            await client.receive()
