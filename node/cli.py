"""``cocoon-node``: the command line.

Subcommands::

    init        create the data dir and the node identity (idempotent)
    localchain  run the local TON chain (the devnet's chain) on loopback
    bootstrap   run a bootstrap node: a DHT server at a stable address, the fallback proxy
    join        join a network: --worker, --proxy-candidate, --client (any mix)
    client      join as a client: the OpenAI-compatible API on 127.0.0.1
    ask         ask the running client node a question; stream the answer
    offers      the market for each model, as the running client node sees it
    devnet      a whole local network on loopback (see node/devnet.py)
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

from .config import NodeConfig, load_config, parse_override
from .control import ask_status
from .launch import NodeRoles, build_node
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

    p.add_argument("--no-proxy", action="store_true", help="do not act as the network's fallback proxy")

    p = sub.add_parser("localchain", help="run the local TON chain on loopback (devnet)")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4790, help="TCP port (default 4790)")

    for name, help_ in (
        ("join", "join a network and stay in it"),
        ("client", "run a client: the API on loopback"),
    ):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument(
            "--bootstrap", action="append", default=[], metavar="MULTIADDR", help="extra bootstrap peer"
        )
        p.add_argument("--port", type=int, default=None, help="TCP port to listen on (default: any)")
        p.add_argument(
            "--host",
            default=None,
            help="address to listen on (default: all interfaces; devnet: loopback)",
        )
        p.add_argument(
            "--announce",
            action="append",
            default=[],
            metavar="MULTIADDR",
            help="an address others should dial (e.g. /ip4/<public ip>/tcp/<forwarded port>)",
        )
        p.add_argument("--dht-client", action="store_true", help="DHT client mode (behind NAT)")
        if name == "join":
            p.add_argument("--worker", action="store_true", help="sell inference from a local model")
            p.add_argument("--proxy-candidate", action="store_true", help="stand for election as a proxy")
            p.add_argument("--client", action="store_true", help="serve the OpenAI-compatible API")
            p.add_argument("--model", help="worker model: default, a GGUF file or a model directory")
            p.add_argument(
                "--engine",
                choices=("auto", "cpu", "cuda", "exllamav2", "exllamav3"),
                help="worker engine (auto: the best that loads here)",
            )
        p.add_argument("--api-port", type=int, help="client API port (default 8080)")
        p.add_argument("--require-tee", action="store_true", help="only use workers in a TEE (tier tdx)")

    p = sub.add_parser("ask", help="ask the running client node; stream the answer")
    _common(p)
    p.add_argument("question", help="what to ask")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api", help="API base URL (default: the running client node's)")

    p = sub.add_parser("offers", help="the market per model, as the running client node sees it")
    _common(p)
    p.add_argument("--api", help="API base URL (default: the running client node's)")

    p = sub.add_parser("devnet", help="run a whole local network on loopback")
    _common(p)
    p.add_argument("--dir", type=Path, help="where the devnet's nodes keep their data (default: a temp dir)")
    p.add_argument("--workers", type=int, default=2, help="workers serving SmolLM2-135M (default 2)")
    p.add_argument("--proxies", type=int, default=3, help="proxy candidates (default 3)")
    p.add_argument("--api-port", type=int, default=8080, help="the client API port (default 8080)")
    p.add_argument("--demo", action="store_true", help="ask one question end to end, settle, and stop")
    p.add_argument(
        "--nat",
        action="store_true",
        help="root: put every worker and the client in a home behind its own NAT (network namespaces)",
    )
    p.add_argument(
        "--nat-type",
        choices=("cone", "symmetric"),
        default="cone",
        help="the homes' NAT: cone (hole punching works) or symmetric (traffic stays relayed)",
    )

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
    if getattr(args, "announce", None):
        out.setdefault("overlay", {})["announce"] = list(args.announce)
    if getattr(args, "dht_client", False):
        out.setdefault("overlay", {})["dht_mode"] = "client"
    if getattr(args, "model", None) and args.command == "join":
        out.setdefault("worker", {})["model"] = args.model
    if getattr(args, "engine", None):
        out.setdefault("worker", {})["engine"] = args.engine
    if getattr(args, "api_port", None) is not None and args.command in ("join", "client"):
        out.setdefault("client", {})["api_port"] = args.api_port
    if getattr(args, "require_tee", False):
        out.setdefault("client", {})["min_tier"] = "tdx"
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


def _roles(args: argparse.Namespace) -> tuple[str, ...]:
    if args.command == "bootstrap":
        return ("bootstrap",)
    if args.command == "client":
        return ("client",)
    roles = []
    if args.proxy_candidate:
        roles.append("proxy")
    if args.worker:
        roles.append("worker")
    if args.client:
        roles.append("client")
    return tuple(roles)


def _cmd_run(args: argparse.Namespace) -> int:
    roles = _roles(args)
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
    proxy = not getattr(args, "no_proxy", False)
    app = build_node(cfg, ident, net, NodeRoles(roles, bootstrap_override=override, bootstrap_proxy=proxy))

    async def run() -> None:
        async with trio.open_nursery() as n:
            await n.start(app.run)
            what = "+".join(roles) if roles else ("bootstrap" if args.command == "bootstrap" else "node")
            print(f"{what} {ident.peer_id} is up on {cfg.node.network}")
            for a in app.overlay.listen_addrs():
                print(f"  {a}")
            print("Ctrl-C stops it.", flush=True)

    trio.run(_run_until_signal, run)
    return 0


def _cmd_localchain(args: argparse.Namespace) -> int:
    from ton.rpc import serve_localchain

    cfg, _ = _load(args)
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    setup_logging(cfg.node.log_level, "localchain")

    async def run() -> None:
        async with trio.open_nursery() as n:
            host, port = await n.start(serve_localchain, cfg.data_dir, args.host, args.port)
            print(f"local chain serving on {host}:{port} (state in {cfg.data_dir})")
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
        if args.command in ("bootstrap", "join", "client"):
            return _cmd_run(args)
        if args.command == "localchain":
            return _cmd_localchain(args)
        if args.command == "ask":
            from .ask import cmd_ask

            return cmd_ask(args, _load(args)[0])
        if args.command == "offers":
            from .ask import cmd_offers

            return cmd_offers(args, _load(args)[0])
        if args.command == "devnet":
            from .devnet import cmd_devnet

            return cmd_devnet(args)
        if args.command == "peers":
            return _cmd_peers(args)
        if args.command == "status":
            return _cmd_status(args)
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as eg:  # errors from a node's tasks arrive grouped by trio
        err = first_node_error(eg)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


def first_node_error(exc: BaseException) -> NodeError | None:
    """The first NodeError inside (nested) exception groups, or None."""
    if isinstance(exc, NodeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = first_node_error(sub)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
