"""A whole network in one test process: local chain, bootstrap proxies, workers, a client.

Every node is a real :class:`node.app.NodeApp` (libp2p on loopback, the real
roles) built by :func:`node.launch.build_node`; the chain is the real local
chain served over loopback.  Workers run the tiny model through the real CPU
engine.  Each node runs in its own cancel scope so a test can kill it.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from inference.cpu import TorchEngine
from node.app import NodeApp
from node.config import NodeConfig, load_config
from node.launch import NodeRoles, build_node
from node.network import DEVNET_TIMINGS
from node.networks import Network
from overlay.identity import Identity
from ton.rpc import serve_localchain

TINY = "tiny"


@attrs.define
class RunningNode:
    name: str
    app: NodeApp
    scope: trio.CancelScope
    engine: TorchEngine | None = None

    def kill(self) -> None:
        self.scope.cancel()


@attrs.define
class Net:
    root: Path
    chain_addr: str
    nodes: dict[str, RunningNode] = attrs.field(factory=dict)
    bootstrap: tuple[str, ...] = ()

    def node(self, name: str) -> RunningNode:
        return self.nodes[name]

    @property
    def api(self) -> str:
        client = self.nodes["client"].app.components[-1]
        return str(client.base_url)  # type: ignore[attr-defined]

    def workers(self) -> list[RunningNode]:
        return [n for n in self.nodes.values() if n.name.startswith("worker")]


def _config(
    root: Path, name: str, chain_addr: str, tiny_dir: Path, overlay: dict[str, object] | None = None
) -> NodeConfig:
    return load_config(
        root / name,
        overrides={
            "node": {"network": "devnet", "proxy_fee_ppm": 20_000, "control": False},
            "chain": {"localchain": chain_addr},
            "client": {"api_port": 0, "models": [TINY]},
            "worker": {"model": str(tiny_dir), "max_context": 256},
            "overlay": dict(overlay or {}),
        },
    )


async def _start(
    net: Net,
    nursery: trio.Nursery,
    name: str,
    roles: tuple[str, ...],
    tiny_dir: Path,
    overlay: dict[str, object] | None = None,
) -> RunningNode:
    cfg = _config(net.root, name, net.chain_addr, tiny_dir, overlay)
    network = Network("devnet", "test", net.bootstrap, "local", net.chain_addr)
    engine = None
    if "worker" in roles:
        engine = TorchEngine(tiny_dir, model_id=TINY, weights="fp32", slots=4, context=256, threads=1, seed=3)
    app = build_node(
        cfg, Identity.generate(), network, NodeRoles(roles, engine=engine, timings=DEVNET_TIMINGS)
    )
    scope = trio.CancelScope()

    async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await app.run(task_status=task_status)

    with trio.fail_after(60):
        await nursery.start(runner)
    node = RunningNode(name, app, scope, engine)
    net.nodes[name] = node
    return node


async def start_testnet(
    nursery: trio.Nursery,
    root: Path,
    tiny_dir: Path,
    *,
    bootstraps: int = 1,
    workers: int = 2,
    client: bool = True,
    worker_overlay: list[dict[str, object]] | None = None,
    client_overlay: dict[str, object] | None = None,
) -> Net:
    """Chain, ``bootstraps`` fallback proxies, ``workers`` tiny-model workers and a client.

    ``worker_overlay[i]`` / ``client_overlay`` are ``[overlay]`` config keys for those nodes
    (``{"listen": False}`` puts a node "behind NAT": nobody can dial it, it is reached through relays).
    """
    (root / "chain").mkdir(parents=True)
    host, port = await nursery.start(serve_localchain, root / "chain", "127.0.0.1", 0)
    net = Net(root, f"{host}:{port}")
    boots = []
    for i in range(bootstraps):
        node = await _start(net, nursery, f"bootstrap-{i + 1}", ("bootstrap",), tiny_dir)
        boots.append(node.app.overlay.listen_addrs()[0])
        net.bootstrap = tuple(boots)
    for i in range(workers):
        extra = worker_overlay[i] if worker_overlay and i < len(worker_overlay) else None
        await _start(net, nursery, f"worker-{i + 1}", ("worker",), tiny_dir, extra)
    if client:
        await _start(net, nursery, "client", ("client",), tiny_dir, client_overlay)
    return net
