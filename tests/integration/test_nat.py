"""Workers behind NAT on loopback: reached through a relay, paid, and the relay sees ciphertext only.

A node "behind NAT" here is one that does not listen at all (``overlay.listen =
false``): nobody can dial it, exactly as a home router drops unsolicited
connections, so every client stream must cross a relay.  Real NATs (nftables
masquerade in network namespaces) and hole punching are in ``test_nat_netns.py``.
"""

from __future__ import annotations

import contextlib
import json
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio
import trio.lowlevel

from inference.messages import TokenChunk
from node import worker as worker_mod
from node.nat import relay_policy
from node.proxy import ProxyRole
from node.worker import WorkerRole
from overlay.addrs import is_circuit
from overlay.errors import DialError, StreamBroken, TransportError
from overlay.host import Overlay, OverlaySettings, open_overlay
from overlay.identity import Identity
from overlay.nat import NatSettings
from overlay.relay import HOP_PROTOCOL, is_relayed_conn
from overlay.relaycore import Circuit, RelayLimits, RelayRefused, Status
from tests.inference_fixtures import tiny_model_dir  # noqa: F401
from tests.netkit import TINY, Net, start_testnet

pytestmark = pytest.mark.slow
BEHIND_NAT = {"listen": False}
MARKER = "zebra-quartz-7731 what rhymes with orange"


def _proxy(net: Net, name: str) -> ProxyRole:
    return next(c for c in net.node(name).app.components if isinstance(c, ProxyRole))


def _worker(net: Net, name: str) -> WorkerRole:
    return next(c for c in net.node(name).app.components if isinstance(c, WorkerRole))


async def _wait_relayed_offers(net: Net, proxy: str, n: int) -> None:
    svc = _proxy(net, proxy).service
    assert svc is not None

    def enough() -> bool:
        offers = svc.core.book.offers(TINY, time.time())
        return sum(1 for o in offers if o.body.addrs and all(is_circuit(a) for a in o.body.addrs)) >= n

    with trio.fail_after(60):
        await svc.wait_until(enough)


async def test_a_worker_behind_nat_is_reached_through_the_relay_which_sees_ciphertext_only(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    async with trio.open_nursery() as nursery:
        net = await start_testnet(
            nursery,
            tmp_path,
            tiny_model_dir,
            workers=1,
            worker_overlay=[BEHIND_NAT],
            client_overlay=BEHIND_NAT,
        )
        relay_node = net.node("bootstrap-1").app.overlay
        hop = relay_node.nat.hop
        assert hop is not None
        seen: list[bytes] = []

        def tap(circuit: Circuit, direction: str, data: bytes) -> None:
            seen.append(data)

        hop.tap = tap
        await _wait_relayed_offers(net, "bootstrap-1", 1)
        worker = net.node("worker-1").app
        assert worker.overlay.nat.status() == "private"
        assert worker.overlay.nat.client.reservations  # it holds a reservation on its proxy
        body = {
            "model": TINY,
            "messages": [{"role": "user", "content": MARKER}],
            "max_tokens": 16,
            "temperature": 0,
        }
        async with httpx.AsyncClient(base_url=net.api, timeout=120) as http:
            r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        text = answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] >= 1
        assert answer["usage"]["cost_nanoton"] > 0
        assert answer["cocoon"]["worker"] == worker.peer_id
        assert answer["cocoon"]["workers"][0]["path"] == "relayed"

        client = net.node("client").app.overlay
        conns = client.connections_of(worker.peer_id)
        assert conns
        assert all(is_relayed_conn(c) for c in conns)  # nothing else could reach it
        st = relay_node.nat.book.statistics()
        assert st.circuits_opened >= 1
        assert st.bytes_relayed > 0
        # the relay carried the whole exchange and never saw the prompt or the answer
        carried = b"".join(seen)
        assert len(carried) == st.bytes_relayed
        assert MARKER.encode() not in carried
        assert b"zebra-quartz" not in carried
        if len(text) >= 6:
            assert text.encode() not in carried
        # and the worker was paid (proxy -> worker channel, over its own connection to the proxy)
        role = _worker(net, "worker-1")
        with trio.fail_after(30):
            await role.ctx.payments.wait_for(lambda: role.ctx.payments.statistics().earned > 0)
        status = worker.status().details()["nat"]
        assert status["reachability"] == "private (configured)"
        assert status["circuit_addrs"]
        relay_status = net.node("bootstrap-1").app.status().details()["nat"]
        assert relay_status["relay"]["circuits_opened"] >= 1
        nursery.cancel_scope.cancel()


async def test_a_relay_dying_mid_stream_fails_over_and_pays_for_what_was_delivered(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with trio.open_nursery() as nursery:
        net = await start_testnet(
            nursery,
            tmp_path,
            tiny_model_dir,
            bootstraps=2,
            workers=2,
            worker_overlay=[BEHIND_NAT, {}],
            client_overlay=BEHIND_NAT,
        )
        await _wait_relayed_offers(net, "bootstrap-1", 1)
        await _wait_relayed_offers(net, "bootstrap-2", 1)
        hidden = net.node("worker-1").app
        client = net.node("client").app.overlay
        killed: list[str] = []
        original_send = worker_mod._MeteredStream.send

        async def send_then_lose_the_relay(self: worker_mod._MeteredStream, msg: object) -> None:
            await original_send(self, msg)
            if killed or not isinstance(msg, TokenChunk) or self.worker != hidden.peer_id:
                return
            leg = next(c for c in client.connections_of(hidden.peer_id) if is_relayed_conn(c))
            relay_id = str(leg.get_transport_addresses()[0]).split("/")[2]
            victim = next(n for n in net.nodes.values() if n.app.peer_id == relay_id)
            killed.append(victim.name)
            victim.kill()  # the relay goes down with the circuit in it

        monkeypatch.setattr(worker_mod._MeteredStream, "send", send_then_lose_the_relay)
        body = {
            "model": TINY,
            "messages": [{"role": "user", "content": "def add"}],
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
        }
        events: list[dict[str, object]] = []
        for _ in range(6):  # until a request lands on the hidden worker first
            async with httpx.AsyncClient(base_url=net.api, timeout=120) as http:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    raw = b"".join([c async for c in r.aiter_raw()]).decode()
            events = [json.loads(e[6:]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
            if killed:
                break
        assert killed, "no request reached the worker behind NAT"
        assert not [e for e in events if "error" in e], events[-1]
        final = events[-1]
        info = final["cocoon"]
        assert isinstance(info, dict)
        workers = info["workers"]
        assert workers[0]["peer_id"] == hidden.peer_id
        assert len(workers) == 2
        # the chunk in flight in the dead relay may be lost: the hidden worker is paid for what arrived
        assert workers[0]["completion_tokens"] >= 0
        assert workers[1]["completion_tokens"] >= 1
        usage = final["usage"]
        assert isinstance(usage, dict)
        assert usage["completion_tokens"] == sum(w["completion_tokens"] for w in workers)
        assert usage["cost_nanoton"] == sum(w["cost_nanoton"] for w in workers)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- bad input at the relay


async def _relay_trio(
    stack: AsyncExitStack, limits: RelayLimits | None = None
) -> tuple[Overlay, Overlay, Overlay]:
    relay = await stack.enter_async_context(
        open_overlay(
            Identity.generate(),
            OverlaySettings(nat=NatSettings(relay_hop=True, relay_limits=limits or RelayLimits())),
        )
    )
    boot = (relay.listen_addrs()[0],)
    nat = NatSettings(holepunch=False)
    hidden = await stack.enter_async_context(
        open_overlay(
            Identity.generate(), OverlaySettings(bootstrap=boot, listen=False, gossip=False, nat=nat)
        )
    )
    other = await stack.enter_async_context(
        open_overlay(
            Identity.generate(), OverlaySettings(bootstrap=boot, listen=False, gossip=False, nat=nat)
        )
    )
    return relay, hidden, other


async def test_relay_refusals_are_typed() -> None:
    async with AsyncExitStack() as stack:
        relay, hidden, other = await _relay_trio(
            stack, RelayLimits(reserve_rate=3, reserve_window_s=60.0, circuit_bytes=4096)
        )
        hop = relay.nat.hop
        assert hop is not None
        relay_addr = relay.listen_addrs()[0].rsplit("/p2p/", 1)[0]
        circuit = f"{relay_addr}/p2p/{relay.peer_id}/p2p-circuit/p2p/{hidden.peer_id}"
        with trio.fail_after(20):
            # a relayed dial to a peer that holds no reservation (not a worker of this relay)
            with pytest.raises(RelayRefused) as e1:
                await other.nat.client.dial(circuit, hidden.peer_id)
            assert e1.value.status == Status.NO_RESERVATION
            # a peer the relay does not serve cannot reserve
            hop.policy = lambda peer: peer != other.peer_id
            with pytest.raises(RelayRefused) as e2:
                await other.nat.client.reserve(relay.peer_id)
            assert e2.value.reason == "permission_denied"
            # a reservation flood is cut off (the refusal above counted as one attempt)
            hop.policy = lambda peer: True
            await other.nat.client.reserve(relay.peer_id)
            await other.nat.client.reserve(relay.peer_id)
            with pytest.raises(RelayRefused) as e3:
                await other.nat.client.reserve(relay.peer_id)
            assert e3.value.status == Status.RESOURCE_LIMIT_EXCEEDED
            assert relay.nat.book.statistics().refused["rate_limited"] == 1
            # data caps: a circuit that carries more than it may is reset, the stream breaks
            await hidden.nat.client.reserve(relay.peer_id)

            async def sink(stream: object) -> None:
                while await stream.read(65536):  # type: ignore[attr-defined]
                    pass

            hidden.set_raw_handler("/cocoon/pay/1", sink)
            await other.connect(circuit)
            assert all(is_relayed_conn(c) for c in other.connections_of(hidden.peer_id))
            raw = await other.new_raw_stream(hidden.peer_id, "/cocoon/pay/1")

            async def flood() -> None:
                for _ in range(64):
                    await raw.write(b"x" * 1024)  # type: ignore[attr-defined]
                    await trio.lowlevel.checkpoint()

            with contextlib.suppress(Exception):  # py-libp2p's own error once the relay resets
                await flood()
            await hop.wait_statistics(lambda st: "data_exceeded" in st.refused)
            st = await hop.wait_statistics(lambda st: st.circuits == 0)  # the circuit was reset
            assert st.circuits_opened == 1
            # protocols outside the allow-list are refused over relayed connections
            await other.connect(circuit)

            async def ask_match() -> object:
                s = await other.open_stream(hidden.peer_id, "/cocoon/market/match/1")
                return await s.receive()

            with pytest.raises((DialError, TransportError, StreamBroken)):
                await ask_match()


async def test_malformed_and_unexpected_relay_messages() -> None:
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
    from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

    async with AsyncExitStack() as stack:
        relay, hidden, other = await _relay_trio(stack)
        target = await stack.enter_async_context(
            open_overlay(Identity.generate(), OverlaySettings(gossip=False))
        )
        with trio.fail_after(20):
            for payload in (b"\xff\xff\xff\xff\x0f", encode_varint_prefixed(b"\x08\x05garbage")):
                raw = await other.new_raw_stream(relay.peer_id, HOP_PROTOCOL)
                await raw.write(payload)  # type: ignore[attr-defined]
                try:
                    data = await read_varint_prefixed_bytes_limited(raw, 4096)
                except Exception:
                    data = b""
                if data:
                    msg = HopMessage()
                    msg.ParseFromString(data)
                    assert msg.status in (Status.MALFORMED_MESSAGE, Status.UNEXPECTED_MESSAGE)
            # a STOP from a "relay" we hold no reservation with is refused
            await other.connect(target.listen_addrs()[0])
            raw = await other.new_raw_stream(target.peer_id, "/libp2p/circuit/relay/0.2.0/stop")
            stop = StopMessage(type=StopMessage.CONNECT)
            stop.peer.id = b"\x00"
            await raw.write(encode_varint_prefixed(stop.SerializeToString()))  # type: ignore[attr-defined]
            answer = StopMessage()
            answer.ParseFromString(await read_varint_prefixed_bytes_limited(raw, 4096))
            assert answer.status == Status.PERMISSION_DENIED
            assert target.nat.client.accepted == 0
            assert not hidden.nat.client.accepted
        # the relay is still fine
        assert relay.nat.book.statistics().circuits == 0


async def test_reservations_are_renewed_before_they_lapse() -> None:
    from overlay.reserve import KeeperCore, RelayRef, ReservationKeeper

    async with AsyncExitStack() as stack:
        relay, hidden, _ = await _relay_trio(stack, RelayLimits(reservation_ttl_s=2.0, reserve_rate=100))
        relay_addr = relay.listen_addrs()[0].rsplit("/p2p/", 1)[0]
        keeper = ReservationKeeper(
            hidden.nat.client,
            lambda: [RelayRef(relay.peer_id, (relay_addr,))],
            core=KeeperCore(renew_fraction=0.5, renew_margin_s=0.5),
        )
        async with trio.open_nursery() as n:
            await n.start(keeper.run)
            with trio.fail_after(20):
                addrs = await keeper.wait_addrs(1)
                assert addrs[0].endswith(f"/p2p/{relay.peer_id}/p2p-circuit")
                await hidden.nat.client.wait_reserved(4)  # three renewals, each before the 2 s expiry
            assert relay.nat.book.has_reservation(hidden.peer_id, trio.current_time())
            assert keeper.circuit_addrs() == addrs  # the address never dropped out
            n.cancel_scope.cancel()


def test_relay_policy_serves_only_its_own_workers() -> None:
    """One peer reserving on many relays: after an election only its attached proxies grant one."""

    class Ref:
        def __init__(self, peer_id: str) -> None:
            self.peer_id = peer_id

    class Book:
        def load_of(self, peer: str) -> object:
            return object() if peer.startswith("worker") else None

        def get(self, peer: str) -> None:
            return None

    class Core:
        book = Book()

    class Service:
        core = Core()

    class Directory:
        def __init__(self, elected: list[str], attached: dict[str, list[str]]) -> None:
            self._elected = elected
            self._attached = attached

        def elected(self) -> list[Ref]:
            return [Ref(p) for p in self._elected]

        def handover_proxies(self, peer: str) -> list[Ref]:
            return [Ref(p) for p in self._attached.get(peer, [])]

    class Ov:
        def __init__(self, peer_id: str) -> None:
            self.peer_id = peer_id

    attached = {"worker-1": ["proxy-a"]}
    a = relay_policy(Ov("proxy-a"), Directory(["proxy-a", "proxy-b"], attached), lambda: Service())  # type: ignore[arg-type,return-value]
    b = relay_policy(Ov("proxy-b"), Directory(["proxy-a", "proxy-b"], attached), lambda: Service())  # type: ignore[arg-type,return-value]
    fallback = relay_policy(Ov("boot"), Directory([], attached), lambda: Service())  # type: ignore[arg-type,return-value]
    assert a("worker-1")
    assert not b("worker-1")  # not one of its proxies: refused
    assert not a("stranger")  # no heartbeat, no offer: not a worker
    assert fallback("worker-1")  # before an election the fallback serves every worker
    assert not fallback("stranger")
    none = relay_policy(Ov("x"), Directory([], {}), lambda: None)  # type: ignore[arg-type]
    assert not none("worker-1")
