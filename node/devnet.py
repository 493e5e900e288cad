"""``cocoon-node devnet``: a whole network on loopback, one process per node.

Starts, in order, each as its own ``cocoon-node`` process with its own data dir
under ``--dir``: the local chain (wallets funded from its faucet), a bootstrap
node (also the fallback proxy), proxy candidates, workers serving the real
SmolLM2-135M on the CPU, and a client with the OpenAI-compatible API.  Each
node's output goes to ``<dir>/logs/<node>.log``.  Ctrl-C stops them all, in
reverse order, cleanly.

``--demo`` asks one question end to end through the API, shows the answer, the
tokens and what was paid, settles every channel on the local chain, and stops.

``--nat`` (root) builds the topology of :mod:`node.netns` first and runs each
node in its own network namespace: the chain, the bootstrap node and the proxy
candidates on public hosts, every worker and the client in a home behind its
own NAT.  Workers are then reached through relays on the proxies (and hole
punched where the NAT allows); the client's API is forwarded to this machine's
loopback, so it is used exactly as without ``--nat``.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import httpx
import trio

from overlay.errors import ConfigError, NodeError

from .ask import TON, stream_chat
from .control import ask_action, ask_status
from .netns import Home, Topology, namespaces_available
from .networks import devnet_bootstrap_identity, load_networks

__all__ = ["Devnet", "cmd_devnet"]

READY = "Ctrl-C stops it."


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


@attrs.define
class Child:
    name: str
    data_dir: Path
    proc: trio.Process
    log_path: Path
    ns: str = ""  # network namespace (devnet --nat)
    ready: trio.Event = attrs.field(factory=trio.Event)
    lines: list[str] = attrs.field(factory=list)


class Devnet:
    """The processes of one devnet (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 2,
        proxies: int = 3,
        api_port: int = 8080,
        nat: tuple[Home, ...] | None = None,
        extra: dict[str, list[str]] | None = None,
    ) -> None:
        self.root = root
        self.workers = workers
        self.proxies = proxies
        self.api_port = api_port
        self.extra = extra or {}  # per node name: more command-line arguments
        self.topology: Topology | None = None
        self._places: dict[str, tuple[str, str]] = {}  # node -> (namespace, listen host)
        if nat is not None:
            homes = (nat + (Home(),) * (workers + 1))[: workers + 1]  # a home per worker, one for the client
            public = [i for i, h in enumerate(homes[:workers], 1) if h.nat == "public"]  # not behind NAT
            behind = [h for h in homes if h.nat != "public"]
            topo = self.topology = Topology.for_run(1 + proxies + len(public), tuple(behind))
            k = 0
            for i in range(1, workers + 2):
                name = f"worker-{i}" if i <= workers else "client"
                if i in public:
                    j = 2 + proxies + public.index(i)
                    self._places[name] = (topo.ns_public(j), topo.public_ip(j))
                else:
                    k += 1
                    self._places[name] = (topo.ns_home(k), "0.0.0.0")
        self.children: list[Child] = []
        self.chain_addr = ""
        self.boot_addr = ""
        self.api = ""

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HF_HUB_OFFLINE"] = "1"
        env.pop("COCOON_HOME", None)
        return env

    async def _pump(self, child: Child, nursery: trio.Nursery) -> None:
        assert child.proc.stdout is not None
        buf = b""
        with child.log_path.open("ab") as log:
            while True:
                data = await child.proc.stdout.receive_some(65536)
                if not data:
                    break
                log.write(data)
                log.flush()
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    child.lines.append(text)
                    if text.startswith(READY):
                        child.ready.set()

    async def start(
        self, name: str, args: list[str], nursery: trio.Nursery, timeout: float = 180.0, ns: str = ""
    ) -> Child:
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "node.cli", *args, "--data-dir", str(data_dir), "--network", "devnet"]
        cmd += self.extra.get(name, [])
        if ns and self.topology is not None:
            cmd = [*self.topology.exec_prefix(ns), *cmd]
        with log_path.open("ab") as err:
            proc = await trio.lowlevel.open_process(
                cmd, stdout=subprocess.PIPE, stderr=err, env=self._env(), start_new_session=True
            )
        child = Child(name, data_dir, proc, log_path, ns)
        self.children.append(child)
        nursery.start_soon(self._pump, child, nursery)
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as waiter:

                async def died() -> None:
                    await proc.wait()
                    waiter.cancel_scope.cancel()

                waiter.start_soon(died)
                await child.ready.wait()
                waiter.cancel_scope.cancel()
        if not child.ready.is_set() or scope.cancelled_caught:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise NodeError(f"devnet node {name} did not come up (see {log_path}):\n{tail}")
        print(f"  {name:<10} up  ({log_path})", flush=True)
        return child

    async def up(self, nursery: trio.Nursery) -> None:
        if self.topology is not None:
            await self._up_nat(nursery)
            return
        chain_port = _free_port(4790)
        boot_port = _free_port(4701)
        self.api_port = _free_port(self.api_port)
        self.chain_addr = f"127.0.0.1:{chain_port}"
        net = load_networks()["devnet"]
        boot_id = devnet_bootstrap_identity(net).peer_id
        self.boot_addr = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{boot_id}"
        boot_file = self._bootstrap_file(net.devnet_seed)
        chain = ["--set", f"chain.localchain={self.chain_addr}", "--bootstrap-file", str(boot_file)]
        boot: list[str] = []
        print(f"starting a devnet in {self.root}", flush=True)
        await self.start("chain", ["localchain", "--port", str(chain_port)], nursery)
        await self.start(
            "bootstrap", ["bootstrap", "--devnet-key", "--port", str(boot_port), *chain], nursery
        )
        async with trio.open_nursery() as batch:  # proxies and workers start side by side
            for i in range(1, self.proxies + 1):
                batch.start_soon(
                    self.start, f"proxy-{i}", ["join", "--proxy-candidate", *boot, *chain], nursery
                )
            for i in range(1, self.workers + 1):
                batch.start_soon(self.start, f"worker-{i}", ["join", "--worker", *boot, *chain], nursery)
        await self.start("client", ["client", "--api-port", str(self.api_port), *boot, *chain], nursery)
        self.api = f"http://127.0.0.1:{self.api_port}"

    def _bootstrap_file(self, seed: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        boot_file = self.root / "bootstrap.toml"
        boot_file.write_text(
            "# written by cocoon-node devnet: this devnet's bootstrap node\n"
            "[networks.devnet]\n"
            'description = "a devnet on loopback"\n'
            f'bootstrap = ["{self.boot_addr}"]\n'
            f'devnet_seed = "{seed}"\n'
            'chain = "local"\n'
            f'localchain = "{self.chain_addr}"\n'
        )
        return boot_file

    async def _up_nat(self, nursery: trio.Nursery) -> None:
        """Every node in its namespace (see the module docstring); the API forwarded to loopback."""
        from .netns import forward_into

        topo = self.topology
        assert topo is not None
        print(f"building the NAT topology {topo.prefix} (namespaces {topo.prefix}-*) ...", flush=True)
        await trio.to_thread.run_sync(topo.up)
        pub = topo.public_ip(1)
        self.chain_addr = f"{pub}:4790"
        net = load_networks()["devnet"]
        boot_id = devnet_bootstrap_identity(net).peer_id
        self.boot_addr = f"/ip4/{pub}/tcp/4701/p2p/{boot_id}"
        boot_file = self._bootstrap_file(net.devnet_seed)
        chain = ["--set", f"chain.localchain={self.chain_addr}", "--bootstrap-file", str(boot_file)]
        print(f"starting a devnet behind NAT in {self.root}", flush=True)
        chain_args = ["localchain", "--host", pub, "--port", "4790"]
        await self.start("chain", chain_args, nursery, ns=topo.ns_public(1))
        await self.start(
            "bootstrap",
            ["bootstrap", "--devnet-key", "--host", pub, "--port", "4701", *chain],
            nursery,
            ns=topo.ns_public(1),
        )
        anywhere = ["--set", "overlay.listen_host=0.0.0.0"]
        async with trio.open_nursery() as batch:
            for i in range(1, self.proxies + 1):
                host = ["--set", f"overlay.listen_host={topo.public_ip(1 + i)}"]
                batch.start_soon(
                    functools.partial(
                        self.start, f"proxy-{i}", ["join", "--proxy-candidate", *host, *chain], nursery,
                        ns=topo.ns_public(1 + i),
                    )
                )  # fmt: skip
            for i in range(1, self.workers + 1):
                ns, where = self._places[f"worker-{i}"]
                listen = ["--set", f"overlay.listen_host={where}"]
                batch.start_soon(
                    functools.partial(
                        self.start, f"worker-{i}", ["join", "--worker", *listen, *chain], nursery, ns=ns
                    )
                )
        client_ns = self._places["client"][0]
        await self.start("client", ["client", "--api-port", "8080", *anywhere, *chain], nursery, ns=client_ns)
        self.api_port = await nursery.start(
            functools.partial(forward_into, client_ns, 8080, listen_port=_free_port(self.api_port))
        )
        self.api = f"http://127.0.0.1:{self.api_port}"

    async def wait_offers(self, n: int, timeout: float = 120.0) -> int:
        """Wait until the client sees ``n`` live offers for the default model (checked once a second)."""
        deadline = trio.current_time() + timeout
        seen = 0
        async with httpx.AsyncClient(base_url=self.api, timeout=10) as http:
            while trio.current_time() < deadline:
                try:
                    data = (await http.get("/v1/models")).json()["data"]
                    seen = max((m["cocoon"]["workers"] for m in data), default=0)
                except (httpx.HTTPError, KeyError, ValueError):
                    seen = 0
                if seen >= n:
                    return seen
                await trio.sleep(1.0)
        return seen

    async def down(self) -> None:
        """SIGINT every node, newest first; each gets 20 s to shut down cleanly."""
        for child in reversed(self.children):
            if child.proc.returncode is None:
                child.proc.send_signal(signal.SIGINT)
                with trio.move_on_after(20):
                    await child.proc.wait()
                if child.proc.returncode is None:
                    child.proc.kill()
                    await child.proc.wait()
        if self.topology is not None:
            await trio.to_thread.run_sync(self.topology.down)
            print(f"NAT topology {self.topology.prefix} removed", flush=True)
        print("devnet stopped", flush=True)

    def usage(self) -> str:
        client = self.root / "client"
        return f"""
The devnet is up.
  OpenAI-compatible API  {self.api}/v1   (any model name from /v1/models; no API key)
  ask from a terminal    cocoon-node ask --data-dir {client} "What is the capital of France?"
  with curl              curl {self.api}/v1/chat/completions -H 'content-type: application/json' \\
                           -d '{{"model": "smollm2-135m-instruct",
                                "messages": [{{"role": "user", "content": "Hi"}}]}}'
  with the openai client OpenAI(base_url="{self.api}/v1", api_key="unused")
  node status            cocoon-node status --data-dir {self.root}/worker-1
  metrics                curl {self.api}/metrics
  logs                   {self.root}/logs/
Ctrl-C stops everything."""


async def run_demo(net: Devnet, question: str) -> None:
    print("waiting for the workers' offers to reach the client's proxy ...", flush=True)
    seen = await net.wait_offers(net.workers)
    print(f"the client sees {seen} live offer(s)\n", flush=True)
    print(f"Q: {question}\nA: ", end="", flush=True)
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 64,
        "temperature": 0,
        "stream": True,
    }
    last: dict[str, object] = {}
    t0 = time.perf_counter()

    def ask() -> None:
        for event in stream_chat(net.api, body):
            choices = event.get("choices") or []
            assert isinstance(choices, list)
            for c in choices:
                text = (c.get("delta") or {}).get("content") if isinstance(c, dict) else None
                if text:
                    print(text, end="", flush=True)
            if "cocoon" in event:
                last.update(event)

    await trio.to_thread.run_sync(ask)
    dt = time.perf_counter() - t0
    usage = last.get("usage", {})
    info = last.get("cocoon", {})
    assert isinstance(usage, dict)
    assert isinstance(info, dict)
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    print(f"\n\ntokens   {prompt} prompt + {completion} completion in {dt:.1f} s")
    for w in info.get("workers", []):
        print(
            f"worker   {w['peer_id']} (tier {w['tier']}): {w['completion_tokens']} tokens, "
            f"{w['cost_nanoton']:,} nanoTON"
        )
    cost = int(usage.get("cost_nanoton", 0))
    print(f"paid     {cost:,} nanoTON = {cost / TON:.9f} TON (price incl. the proxy's fee)\n")
    print("payments as the nodes see them:")
    for child in net.children:
        if child.name == "chain":
            continue
        try:
            st = await ask_status(child.data_dir)
        except NodeError:
            continue
        pay = st.details().get("network", {})
        if isinstance(pay, dict) and (pay.get("spent_nanoton") or pay.get("earned_nanoton")):
            spent, earned = pay.get("spent_nanoton", 0), pay.get("earned_nanoton", 0)
            fees, live = pay.get("forward_fees_nanoton", 0), pay.get("live_channels", 0)
            print(
                f"  {child.name:<10} spent {spent:>9,}  earned {earned:>9,}  fees {fees:>7,} nanoTON"
                f" in {live} channel(s)"
            )
    print("\nsettling: closing every channel cooperatively on the local chain ...", flush=True)
    for child in net.children:
        if child.name == "chain":
            continue
        try:
            reply = await ask_action(child.data_dir, "settle")
        except NodeError as e:
            print(f"  {child.name}: {e}")
            continue
        if reply.message.strip():
            for line in reply.message.splitlines():
                print(f"  {child.name:<10} {line}")


def cmd_devnet(args: argparse.Namespace) -> int:
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cocoon-devnet-"))
    root.mkdir(parents=True, exist_ok=True)
    nat = None
    if getattr(args, "nat", False):
        ok, why = namespaces_available()
        if not ok:
            raise ConfigError(f"devnet --nat: {why} (run it as root on Linux with iproute2 and nftables)")
        nat = tuple(Home(args.nat_type) for _ in range(args.workers + 1))
    net = Devnet(root, workers=args.workers, proxies=args.proxies, api_port=args.api_port, nat=nat)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            try:
                with trio.CancelScope() as scope:

                    async def on_signal() -> None:
                        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                            async for _ in sigs:
                                print("\nstopping the devnet ...", flush=True)
                                scope.cancel()
                                return

                    nursery.start_soon(on_signal)
                    await net.up(nursery)
                    if args.demo:
                        await run_demo(net, "What is the capital of France?")
                    else:
                        print(net.usage(), flush=True)
                        await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await net.down()
                nursery.cancel_scope.cancel()

    trio.run(main)
    return 0
