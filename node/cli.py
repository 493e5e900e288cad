"""``cocoon-node``: the command line.

Subcommands::

    init        create the data dir and the node identity (idempotent)
    bootstrap   run a bootstrap node: a DHT server at a stable address
    join        join a network and stay in it (later: --worker, --proxy-candidate)
    peers       list the peers of the node running on this data dir
    status      show the status of the node running on this data dir

Every error the user can fix is printed as one line starting ``error:`` with
what to do next, and the exit code is 2; Ctrl-C (or SIGTERM) shuts a running
node down cleanly and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from overlay.errors import ConfigError, NodeError
from overlay.identity import Identity, load_or_create_identity

from .app import NodeApp
from .config import NodeConfig, load_config, parse_override
from .control import ask_status
from .logs import setup_logging
from .networks import Network, devnet_bootstrap_identity, load_networks

__all__ = ["build_parser", "main"]

log = logging.getLogger("cocoon-node")
DEFAULT_BOOTSTRAP_PORT = 4701


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        help="node data directory (default: $COCOON_HOME or ~/.local/share/cocoon-node)",
    )
    p.add_argument("--config", type=Path, help="config TOML (default: <data dir>/config.toml)")
    p.add_argument("--network", help="network name from bootstrap.toml (default: devnet)")
    p.add_argument("--bootstrap-file", type=Path, help="a bootstrap.toml to use instead of the shipped one")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
    )
    p.add_argument("--log-level", help="debug | info | warning | error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cocoon-node",
        description="A peer-to-peer, confidential, pay-per-token LLM inference network.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create the data dir and identity")
    _common(p)

    p = sub.add_parser("bootstrap", help="run a bootstrap node (a DHT server at a stable address)")
    _common(p)
    p.add_argument("--host", default=None, help="address to listen on (default: overlay.listen_host)")
    p.add_argument("--port", type=int, default=None, help=f"TCP port (default: {DEFAULT_BOOTSTRAP_PORT})")
    p.add_argument(
        "--devnet-key",
        action="store_true",
        help="use the devnet's public bootstrap key (loopback devnets only)",
    )

    p = sub.add_parser("join", help="join a network and stay in it")
    _common(p)
    p.add_argument(
        "--bootstrap", action="append", default=[], metavar="MULTIADDR", help="extra bootstrap peer"
    )
    p.add_argument("--port", type=int, default=None, help="TCP port to listen on (default: any)")
    p.add_argument("--dht-client", action="store_true", help="DHT client mode (behind NAT)")

    p = sub.add_parser("peers", help="list the peers of the running node")
    _common(p)

    p = sub.add_parser("status", help="show the status of the running node")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for text in args.set:
        section, key, value = parse_override(text)
        out.setdefault(section, {})[key] = value
    if args.network:
        out.setdefault("node", {})["network"] = args.network
    if args.log_level:
        out.setdefault("node", {})["log_level"] = args.log_level
    port = getattr(args, "port", None)
    if port is not None:
        out.setdefault("overlay", {})["listen_port"] = port
    host = getattr(args, "host", None)
    if host:
        out.setdefault("overlay", {})["listen_host"] = host
    if getattr(args, "dht_client", False):
        out.setdefault("overlay", {})["dht_mode"] = "client"
    return out


def _load(args: argparse.Namespace) -> tuple[NodeConfig, Network]:
    cfg = load_config(args.data_dir, args.config, _overrides(args))
    nets = load_networks(args.bootstrap_file, cfg.data_dir)
    net = nets.get(cfg.node.network)
    if net is None:
        raise ConfigError(
            f"unknown network {cfg.node.network!r}; bootstrap.toml lists: {', '.join(sorted(nets))}"
        )
    return cfg, net


async def _run_until_signal(run: Callable[[], Awaitable[None]]) -> None:
    """Run ``run`` until it returns or SIGINT/SIGTERM arrives, then unwind cleanly."""
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for sig in signals:
                    log.info("received %s, shutting down", signal.Signals(sig).name)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch)
        await run()
        nursery.cancel_scope.cancel()


def _cmd_init(args: argparse.Namespace) -> int:
    cfg, net = _load(args)
    ident, created = load_or_create_identity(cfg.data_dir)
    print(f"{'created' if created else 'found'} identity {ident.peer_id}")
    print(f"data dir: {cfg.data_dir}")
    print(f"network:  {net.name} ({net.description})")
    return 0


def _node_identity(args: argparse.Namespace, cfg: NodeConfig, net: Network) -> Identity:
    if getattr(args, "devnet_key", False):
        return devnet_bootstrap_identity(net)
    return load_or_create_identity(cfg.data_dir)[0]


def _cmd_run(args: argparse.Namespace, roles: tuple[str, ...]) -> int:
    cfg, net = _load(args)
    if args.command == "bootstrap" and args.port is None:
        from attrs import evolve

        cfg = evolve(cfg, overlay=evolve(cfg.overlay, listen_port=DEFAULT_BOOTSTRAP_PORT))
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = _node_identity(args, cfg, net)
    setup_logging(cfg.node.log_level, ident.peer_id)
    extra = tuple(getattr(args, "bootstrap", []) or ())
    override = None
    if extra:
        override = tuple(dict.fromkeys(net.bootstrap + cfg.overlay.bootstrap + extra))
    app = NodeApp(cfg, ident, net, roles=roles, bootstrap_override=override)

    async def run() -> None:
        async with trio.open_nursery() as n:
            await n.start(app.run)
            print(f"{roles[0] if roles else 'node'} {ident.peer_id} is up on {cfg.node.network}")
            for a in app.overlay.listen_addrs():
                print(f"  {a}")
            print("Ctrl-C stops it.", flush=True)

    trio.run(_run_until_signal, run)
    return 0


def _cmd_peers(args: argparse.Namespace) -> int:
    cfg, _ = _load(args)
    st = trio.run(ask_status, cfg.data_dir)
    print(f"{len(st.peers)} peers connected to {st.peer_id}")
    for p in st.peers:
        print(f"  {p}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    cfg, _ = _load(args)
    st = trio.run(ask_status, cfg.data_dir)
    if args.json:
        import attrs

        d = attrs.asdict(st)
        d["details"] = st.details()
        del d["details_json"]
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"peer id   {st.peer_id}")
    print(f"network   {st.network}")
    print(f"roles     {', '.join(st.roles)}")
    print(f"uptime    {st.uptime_s:.0f} s")
    print(f"peers     {len(st.peers)} connected, routing table {st.routing_table_size}")
    print(f"topics    {', '.join(st.topics) or '-'}")
    for a in st.addrs:
        print(f"listening {a}")
    for name, section in st.details().items():
        print(f"[{name}]")
        if isinstance(section, dict):
            for k, v in section.items():
                print(f"  {k}: {v}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            return _cmd_init(args)
        if args.command == "bootstrap":
            return _cmd_run(args, ("bootstrap",))
        if args.command == "join":
            return _cmd_run(args, ())
        if args.command == "peers":
            return _cmd_peers(args)
        if args.command == "status":
            return _cmd_status(args)
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
