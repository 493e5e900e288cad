"""Build a node for its roles (used by the CLI, the devnet and the tests).

Roles: ``bootstrap`` (a DHT server and the network's fallback proxy),
``proxy`` (a proxy candidate), ``worker``, ``client``.  Every role but a bare
member needs the chain: the node then runs :class:`~node.roles.NetworkContext`
first.
"""

from __future__ import annotations

import attrs

from inference.engine import Engine
from inference.models import DEFAULT_MODEL_ID
from overlay.identity import Identity

from .api import ApiSettings
from .app import Component, NodeApp
from .client import ClientRole, ClientSettings
from .config import NodeConfig
from .network import NetworkTimings
from .networks import Network
from .proxy import ProxyRole
from .roles import NetworkContext, bootstrap_proxy_refs
from .worker import WorkerRole

__all__ = ["ROLES", "NodeRoles", "build_node"]

ROLES = ("bootstrap", "proxy", "worker", "client")


@attrs.frozen
class NodeRoles:
    roles: tuple[str, ...]
    engine: Engine | None = None  # a preloaded engine for the worker (tests share one)
    timings: NetworkTimings | None = None  # override the network's timings (tests)
    bootstrap_override: tuple[str, ...] | None = None
    bootstrap_proxy: bool = True  # a bootstrap node is also the network's fallback proxy


def build_node(cfg: NodeConfig, identity: Identity, network: Network, spec: NodeRoles) -> NodeApp:
    """A NodeApp running ``spec.roles`` (see the module docstring)."""
    unknown = set(spec.roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")
    components: list[Component] = []
    fallback = bootstrap_proxy_refs(network)
    if spec.bootstrap_override is not None:
        fallback = bootstrap_proxy_refs(attrs.evolve(network, bootstrap=spec.bootstrap_override))
    fallback = tuple(p for p in fallback if p.peer_id != identity.peer_id)
    models = tuple(dict.fromkeys((*cfg.client.models, DEFAULT_MODEL_ID)))
    needs_chain = any(r != "bootstrap" for r in spec.roles) or (
        "bootstrap" in spec.roles and spec.bootstrap_proxy
    )
    if needs_chain:
        ctx = NetworkContext(cfg, spec.timings)
        components.append(ctx)
        if "bootstrap" in spec.roles and spec.bootstrap_proxy:
            components.append(ProxyRole(ctx, models=models, candidate=False, fee_ppm=cfg.node.proxy_fee_ppm))
        if "proxy" in spec.roles:
            components.append(
                ProxyRole(
                    ctx,
                    models=models,
                    candidate=True,
                    operator=cfg.node.operator,
                    fee_ppm=cfg.node.proxy_fee_ppm,
                    bootstrap_proxies=fallback,
                )
            )
        if "worker" in spec.roles:
            components.append(WorkerRole(cfg, ctx, engine=spec.engine, bootstrap_proxies=fallback))
        if "client" in spec.roles:
            c = cfg.client
            components.append(
                ClientRole(
                    ctx,
                    ClientSettings(
                        models=models,
                        max_price_prompt=c.max_price_prompt,
                        max_price_completion=c.max_price_completion,
                        min_tier=c.min_tier,
                        fee_ppm=cfg.node.proxy_fee_ppm,
                    ),
                    ApiSettings(api_key=c.api_key, max_tokens_limit=cfg.worker.max_context),
                    host=c.api_host,
                    port=c.api_port,
                    bootstrap_proxies=fallback,
                )
            )
    return NodeApp(
        cfg,
        identity,
        network,
        roles=spec.roles,
        components=tuple(components),
        bootstrap_override=spec.bootstrap_override,
    )
