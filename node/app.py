"""The node: one trio nursery holding the overlay, the control socket and the roles.

A role (worker, proxy candidate, client, ...) is a :class:`Component`: it is
started inside the node's nursery once the overlay is up, and contributes a
section to ``cocoon-node status``.  ``NodeApp.run`` reports itself through
``task_status`` when every component has started, so tests and the devnet can
``await nursery.start(app.run)`` and use the node at once.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

import trio

from overlay.errors import ConfigError
from overlay.host import Overlay, OverlaySettings, open_overlay
from overlay.identity import Identity
from overlay.nat import NatSettings
from overlay.relaycore import RelayLimits

from .config import NodeConfig
from .control import StatusReply, serve_control
from .metrics import Metrics, Sample, serve_metrics
from .networks import Network

__all__ = ["Component", "NodeApp"]

log = logging.getLogger(__name__)


class Component(Protocol):
    """A role running inside the node."""

    name: str

    async def run(self, app: NodeApp, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    def status_section(self) -> dict[str, object]: ...


class NodeApp:
    """One running node."""

    def __init__(
        self,
        cfg: NodeConfig,
        identity: Identity,
        network: Network,
        *,
        roles: tuple[str, ...] = (),
        components: tuple[Component, ...] = (),
        bootstrap_override: tuple[str, ...] | None = None,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.network = network
        self.roles = roles
        self.components = components
        self._bootstrap_override = bootstrap_override
        self._overlay: Overlay | None = None
        self._started_at = 0.0
        self.metrics = Metrics()
        self.metrics_url = ""

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def overlay(self) -> Overlay:
        if self._overlay is None:
            raise RuntimeError("the node is not running")
        return self._overlay

    def overlay_settings(self) -> OverlaySettings:
        o = self.cfg.overlay
        if self._bootstrap_override is not None:
            boot = self._bootstrap_override
        else:
            boot = tuple(dict.fromkeys(self.network.bootstrap + o.bootstrap))
        host = o.listen_host or ("127.0.0.1" if self.network.name == "devnet" else "0.0.0.0")
        dht_mode = "server" if "bootstrap" in self.roles and o.dht_mode == "auto" else o.dht_mode
        relays = o.relay and ("bootstrap" in self.roles or "proxy" in self.roles)
        nat = NatSettings(
            reachability=o.reachability,
            relay_hop=relays,
            holepunch=o.holepunch,
            relay_limits=RelayLimits(
                reservation_ttl_s=o.relay_reservation_s,
                max_reservations=o.relay_reservations,
                circuit_duration_s=o.relay_circuit_s,
                circuit_bytes=o.relay_circuit_mb << 20,
            ),
        )
        return OverlaySettings(
            listen_host=host,
            listen_port=o.listen_port,
            listen=o.listen,
            announce=o.announce,
            bootstrap=tuple(b for b in boot if self.peer_id not in b),
            dht_mode=dht_mode,
            bootstrap_attempts=o.bootstrap_attempts,
            max_frame=o.max_frame,
            publish_rate=o.publish_rate,
            nat=nat,
        )

    async def run(self, *, task_status: trio.TaskStatus[NodeApp] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started(self)`` once everything is up."""
        async with open_overlay(self.identity, self.overlay_settings()) as ov:
            self._overlay = ov
            if ov.nat.hop is not None:
                ov.nat.hop.policy = lambda peer: False  # until a proxy role says whom it relays for
            self._started_at = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    if self.cfg.node.control:
                        await nursery.start(serve_control, self.cfg.data_dir, self.status, self.action)
                    self.metrics.collector(
                        "cocoon_overlay", "gauge", "overlay figures", self._overlay_samples
                    )
                    if self.cfg.node.metrics_port:
                        host, port = await nursery.start(
                            serve_metrics, self.metrics, "127.0.0.1", self.cfg.node.metrics_port
                        )
                        self.metrics_url = f"http://{host}:{port}/metrics"
                    for c in self.components:
                        await nursery.start(c.run, self)
                    log.info(
                        "node up: %s roles=%s network=%s",
                        ", ".join(ov.listen_addrs()),
                        ",".join(self.roles) or "member",
                        self.network.name,
                        extra={"peer_id": self.peer_id},
                    )
                    task_status.started(self)
                    await trio.sleep_forever()
            finally:
                self._overlay = None

    def _overlay_samples(self) -> list[Sample]:
        if self._overlay is None:
            return []
        st = self._overlay.statistics()
        return [
            ("cocoon_overlay", {"figure": "connected_peers"}, float(st.connected_peers)),
            ("cocoon_overlay", {"figure": "routing_table_size"}, float(st.routing_table_size)),
            ("cocoon_overlay", {"figure": "gossip_published"}, float(st.published)),
            ("cocoon_overlay", {"figure": "gossip_received"}, float(st.received)),
            ("cocoon_overlay", {"figure": "gossip_rejected"}, float(st.rejected)),
            ("cocoon_overlay", {"figure": "gossip_ignored"}, float(st.ignored)),
            ("cocoon_overlay", {"figure": "gossip_dropped"}, float(st.dropped)),
        ]

    async def action(self, name: str) -> str:
        """A control action (``cocoon-node`` or the devnet asks): handled by the first component that can.

        ``wait-punch`` (the node's own): wait up to a minute for the first hole punch to end, either way.
        """
        if name == "wait-punch":
            with trio.move_on_after(60):
                p = await self.overlay.nat.punch.wait_punched(1)
                legs = p.relay_legs_closed
                return f"hole punches: {p.direct} direct, {p.failed} failed, {legs} relay legs closed"
            return "no hole punch ended within 60 s"
        for c in self.components:
            handler = getattr(c, "action", None)
            if handler is not None:
                result = await handler(name)
                if result is not None:
                    return str(result)
        raise ConfigError(f"this node has no action {name!r}")

    def status(self) -> StatusReply:
        ov = self.overlay
        st = ov.statistics()
        details = {c.name: c.status_section() for c in self.components}
        details["nat"] = ov.nat.status_section()
        details["overlay"] = {
            "dht": "server" if ov.dht.server else "client",
            "published": st.published,
            "received": st.received,
            "rejected": st.rejected,
            "ignored": st.ignored,
            "dropped": st.dropped,
        }
        return StatusReply(
            peer_id=self.peer_id,
            network=self.network.name,
            roles=self.roles or ("member",),
            addrs=tuple(ov.listen_addrs()),
            peers=tuple(ov.connected_peers()),
            routing_table_size=st.routing_table_size,
            topics=st.topics,
            uptime_s=trio.current_time() - self._started_at,
            details_json=json.dumps(details, default=str),
        )
