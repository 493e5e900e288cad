"""A write cancelled half-way never breaks the connection (real libp2p hosts on loopback).

py-libp2p's noise writer encrypted a message (moving its nonce on) and then awaited the socket
write, a cancel point: a task cancelled right there dropped the ciphertext, the peer could decrypt
nothing after it and tore the connection down with every stream on it. This is what made
``test_commits_during_a_busy_session_do_not_disturb_it`` fail now and then: the payer's background
sender, cancelled by the final receipt while it wrote a payment, took the connection with it and
the closing payment failed with ``StreamBroken``. ``overlay.patches`` makes noise writes whole.
"""

from __future__ import annotations

import pytest
import trio

from overlay import wire
from overlay.host import OverlaySettings, open_overlay
from overlay.identity import Identity
from overlay.streams import FramedStream

pytestmark = pytest.mark.slow
PROTO = "/cocoon/test-cancelled-writes/1"
SETTINGS = OverlaySettings(gossip=False, dial_timeout_s=3)


async def test_a_write_cancelled_at_any_point_leaves_the_connection_working() -> None:
    send_got, got = trio.open_memory_channel[wire.ErrorFrame](100)

    async def handler(stream: FramedStream) -> None:
        while (msg := await stream.receive()) is not None:
            assert isinstance(msg, wire.ErrorFrame)
            await send_got.send(msg)

    async with (
        open_overlay(Identity.generate(), SETTINGS) as a,
        open_overlay(Identity.generate(), SETTINGS) as b,
    ):
        b.set_stream_handler(PROTO, handler)
        await a.connect(b.listen_addrs()[0])
        stream = await a.open_stream(b.peer_id, PROTO)
        # Cancel a write after k scheduling steps: for some k the cancellation lands between the
        # encryption and the socket write (k = 5 or 6 here before the fix).
        for k in range(24):
            scope = trio.CancelScope()

            async def write(scope: trio.CancelScope = scope, k: int = k) -> None:
                with scope:
                    await stream.send(wire.ErrorFrame("cancelled", str(k)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                for _ in range(k):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
            # the next message on the same stream arrives (the cancelled one may or may not)
            with trio.fail_after(5):
                await stream.send(wire.ErrorFrame("probe", str(k)))
                while (msg := await got.receive()).code != "probe":
                    assert msg.code == "cancelled"
            assert msg.message == str(k)
        assert set(a.connected_peers()) == {b.peer_id}
        await stream.aclose()
