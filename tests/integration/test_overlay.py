"""The overlay with real libp2p hosts on loopback."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import pytest
import trio

from overlay import wire
from overlay.errors import DialError, FrameTooLarge, OverlayError, RecordRejected, StreamBroken
from overlay.framing import uvarint
from overlay.gossip import Validation
from overlay.host import OverlaySettings, open_overlay
from overlay.identity import Identity, load_or_create_identity
from overlay.streams import FramedStream
from tests.helpers import start_bootstrap, start_nodes

pytestmark = pytest.mark.slow
ECHO = "/cocoon/test-echo/1"


@wire.message(93)
@attrs.frozen
class _Echo:
    text: str


def _ns_valid(key: str, value: bytes) -> bool:
    return value.startswith(b"v:")


async def test_ten_nodes_join_share_dht_values_and_gossip(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with AsyncExitStack() as stack:
        boot = await start_bootstrap(stack)
        nodes = await start_nodes(stack, 10, boot)
        for n in (boot, *nodes):
            n.dht.register_namespace("test", _ns_valid)

        # everyone joined through the one bootstrap node and found others through the DHT
        assert len(boot.connected_peers()) == 10
        for n in nodes:
            assert boot.peer_id in n.connected_peers()
            assert n.dht.routing_table_size() >= 2

        # a value put on one node is read on another (a real lookup: no local copy)
        await nodes[0].dht.put("/test/alpha", b"v:1")
        nodes[7].dht.forget_local("/test/alpha")
        assert await nodes[7].dht.get("/test/alpha") == b"v:1"
        assert await nodes[3].dht.get("/test/missing") is None

        # a gossip message reaches every subscriber
        subs = [await n.subscribe("t/all", lambda origin, data: Validation.ACCEPT) for n in nodes]
        with trio.fail_after(20):
            for n in nodes:
                await n.wait_topic_peers("t/all", 2)
            await nodes[4].publish("t/all", b"hello everyone")
            for s in subs:
                msg = await s.get()
                assert msg.data == b"hello everyone"
                assert msg.origin == nodes[4].peer_id
    assert not [r for r in caplog.records if r.name.startswith(("overlay", "node"))]


async def test_dht_namespaces_are_strict_and_providers_deduplicated() -> None:
    async with AsyncExitStack() as stack:
        boot = await start_bootstrap(stack)
        a, b, c = await start_nodes(stack, 3, boot)
        for n in (boot, a, b, c):
            n.dht.register_namespace("test", _ns_valid)
        with pytest.raises(RecordRejected):
            await a.dht.put("/nosuch/key", b"v:1")
        with pytest.raises(RecordRejected):
            await a.dht.put("/test/key", b"invalid value")
        with pytest.raises(RecordRejected):
            await a.dht.put("plainkey", b"v:1")
        assert await a.dht.provide("model-smollm2")
        assert await b.dht.provide("model-smollm2")
        provs = await c.dht.find_providers("model-smollm2")
        ids = [p.peer_id for p in provs]
        assert sorted(ids) == sorted({a.peer_id, b.peer_id})
        assert len(ids) == len(set(ids))


async def test_gossip_validators_reject_and_ignore() -> None:
    async with AsyncExitStack() as stack:
        boot = await start_bootstrap(stack)
        pub, sub_node = await start_nodes(stack, 2, boot)

        def validator(origin: str, data: bytes) -> Validation:
            if data.startswith(b"bad"):
                return Validation.REJECT
            if data.startswith(b"old"):
                return Validation.IGNORE
            return Validation.ACCEPT

        sub = await sub_node.subscribe("t/v", validator)
        await pub.subscribe("t/v")
        with trio.fail_after(20):
            await pub.wait_topic_peers("t/v", 1)
            for data in (b"bad-1", b"old-1", b"good-1", b"bad-2", b"good-2"):
                await pub.publish("t/v", data)
            assert (await sub.get()).data == b"good-1"
            assert (await sub.get()).data == b"good-2"
            # a message may overtake another on its way (mesh vs. the identify queue)
            st = await sub_node.wait_statistics(lambda s: s.rejected + s.ignored >= 3)
        assert st.rejected == 2
        assert st.ignored == 1
        assert sub_node.penalty(pub.peer_id) == pytest.approx(2, abs=0.1)


async def test_first_publish_before_the_mesh_forms_is_delivered() -> None:
    """Published as soon as the peer's subscription is known, before any heartbeat grafted it
    into the mesh: py-libp2p alone sends to the (empty) mesh only, and the message is lost."""
    async with AsyncExitStack() as stack:
        boot = await start_bootstrap(stack)
        pub, sub_node = await start_nodes(stack, 2, boot)
        sub = await sub_node.subscribe("t/first")
        await pub.subscribe("t/first")
        with trio.fail_after(10):
            await pub.wait_topic_peers("t/first", 1)
            await pub.publish("t/first", b"first")
            assert (await sub.get()).data == b"first"


async def test_restart_on_same_data_dir_keeps_peer_id(tmp_path: Path) -> None:
    ident, created = load_or_create_identity(tmp_path)
    assert created
    async with open_overlay(ident) as first:
        first_id = first.peer_id
    ident2, created2 = load_or_create_identity(tmp_path)
    assert not created2
    async with open_overlay(ident2) as second:
        assert second.peer_id == first_id


async def test_plaintext_dial_is_refused() -> None:
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from multiaddr import Multiaddr

    async with open_overlay(Identity.generate()) as node:
        kp = create_new_key_pair()
        plain = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)})
        async with plain.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            transport, pid = node.listen_addrs()[0].rsplit("/p2p/", 1)
            with trio.fail_after(15), pytest.raises(Exception) as ei:
                await plain.connect(PeerInfo(ID.from_base58(pid), [Multiaddr(transport)]))
            assert "Swarm" in type(ei.value).__name__ or "fail" in str(ei.value).lower()
            assert node.connected_peers() == []
            # and we never speak plaintext to it either
            with trio.fail_after(15), pytest.raises(DialError):
                await node.connect(f"{plain.get_addrs()[0]}")


async def test_peer_claiming_another_peer_id_is_refused() -> None:
    async with AsyncExitStack() as stack:
        real = await stack.enter_async_context(open_overlay(Identity.generate()))
        dialer = await stack.enter_async_context(open_overlay(Identity.generate()))
        impostor = Identity.generate()
        transport, _ = real.listen_addrs()[0].rsplit("/p2p/", 1)
        with trio.fail_after(15), pytest.raises(DialError):
            await dialer.connect(f"{transport}/p2p/{impostor.peer_id}")
        assert impostor.peer_id not in dialer.connected_peers()
        with pytest.raises(DialError, match="no /p2p/"):
            await dialer.connect(transport)


async def test_bootstrap_that_does_not_answer_does_not_crash(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="overlay")
    dead = f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}"
    settings = OverlaySettings(
        bootstrap=(dead,), bootstrap_attempts=2, bootstrap_backoff_s=0.01, dial_timeout_s=3
    )
    with trio.fail_after(30):
        async with open_overlay(Identity.generate(), settings) as node:
            assert node.connected_peers() == []
    assert any("no bootstrap peer answered" in r.getMessage() for r in caplog.records)


async def test_oversized_frame_rejected_connection_keeps_serving() -> None:
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            open_overlay(Identity.generate(), OverlaySettings(max_frame=1024))
        )
        client = await stack.enter_async_context(open_overlay(Identity.generate()))
        errors: list[BaseException] = []

        async def echo(stream: FramedStream) -> None:
            try:
                async for msg in stream:
                    assert isinstance(msg, _Echo)
                    await stream.send(_Echo(msg.text.upper()))
            except FrameTooLarge as e:
                errors.append(e)
                raise

        server.set_stream_handler(ECHO, echo)
        await client.connect(server.listen_addrs()[0])
        with trio.fail_after(15):
            bad = await client.open_stream(server.peer_id, ECHO)
            await bad.raw.write(uvarint(1 << 20) + b"x" * 100)  # announces 1 MiB: over the server's limit
            with pytest.raises(StreamBroken):  # the server dropped the stream without an answer
                await bad.receive_as(_Echo)
            good = await client.open_stream(server.peer_id, ECHO)
            assert await good.request(_Echo("still here"), _Echo) == _Echo("STILL HERE")
            await good.aclose()
            assert await client.request(server.peer_id, ECHO, _Echo("again"), _Echo) == _Echo("AGAIN")
        assert len(errors) == 1
        assert server.peer_id in client.connected_peers()


async def test_peer_that_vanishes_mid_stream_gives_typed_error() -> None:
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(open_overlay(Identity.generate()))
        started = trio.Event()
        async with open_overlay(Identity.generate()) as server:

            async def stream_then_hang(stream: FramedStream) -> None:
                await stream.send(_Echo("token-1"))
                started.set()
                await trio.sleep_forever()

            server.set_stream_handler(ECHO, stream_then_hang)
            await client.connect(server.listen_addrs()[0])
            s = await client.open_stream(server.peer_id, ECHO)
            with trio.fail_after(10):
                assert await s.receive() == _Echo("token-1")
                await started.wait()
        # the server is gone (its host closed mid-stream)
        with trio.fail_after(15), pytest.raises(StreamBroken):
            await s.receive()


async def test_open_stream_to_unknown_peer_is_dial_error() -> None:
    async with open_overlay(Identity.generate(), OverlaySettings(dial_timeout_s=3)) as node:
        with trio.fail_after(15), pytest.raises(DialError):
            await node.open_stream(Identity.generate().peer_id, ECHO)
        with pytest.raises(DialError):
            await node.open_stream("garbage-id", ECHO)
        with pytest.raises(OverlayError):
            await node.dht.get("/nosuch/x")


async def test_errors_inside_an_overlay_propagate() -> None:
    """An error in the body leaves open_overlay (it is never swallowed during shutdown)."""
    with pytest.raises(RecordRejected, match="boom"):
        async with open_overlay(Identity.generate()):
            raise RecordRejected("boom")
