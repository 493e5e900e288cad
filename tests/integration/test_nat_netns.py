"""Workers and clients in homes behind real NATs (network namespaces, nftables masquerade).

The topology of :mod:`node.netns`: a public bridge with the chain, the bootstrap
node (the fallback proxy and relay) and a proxy candidate; a worker in one home
and the client in another, each behind its own router.  Every node is its own
``cocoon-node`` process (the devnet's ``--nat`` mode).  The client's request
goes through the relay and is paid; behind cone NATs hole punching then goes
direct and the next request no longer crosses the relay; behind symmetric NATs
the punch fails and traffic stays relayed.  Skipped, with the reason, where
namespaces cannot be made (not root, no nftables, a sandbox that refuses them).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from node.control import ask_action, ask_status
from node.devnet import Devnet
from node.netns import Home, namespaces_available
from tests.inference_fixtures import tiny_model_dir  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def namespaces() -> None:
    ok, why = namespaces_available()
    if not ok:
        pytest.skip(f"NAT namespaces unavailable: {why}")


async def _ask(api: str, content: str) -> dict[str, object]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
    }
    async with httpx.AsyncClient(base_url=api, timeout=120) as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, object] = r.json()
    return answer


def _path(answer: dict[str, object]) -> str:
    info = answer["cocoon"]
    assert isinstance(info, dict)
    return str(info["workers"][-1]["path"])


def _section(details: dict[str, object], name: str) -> dict[str, object]:
    section = details.get(name)
    assert isinstance(section, dict), details
    return section


async def _relayed_bytes(net: Devnet) -> int:
    boot = next(c for c in net.children if c.name == "bootstrap")
    relay = _section(_section((await ask_status(boot.data_dir)).details(), "nat"), "relay")
    value = relay["bytes_relayed"]
    assert isinstance(value, int)
    return value


async def _run(tmp_path: Path, tiny: Path, nat: str) -> None:
    worker_args = ["--model", str(tiny), "--set", "worker.max_context=256"]
    tiny_model = ["--set", "client.models=tiny"]  # what proxies keep a book of, and the API lists
    net = Devnet(
        tmp_path / "net",
        workers=1,
        proxies=1,
        api_port=0,
        nat=(Home(nat), Home(nat)),
        extra={"worker-1": worker_args, **dict.fromkeys(("bootstrap", "proxy-1", "client"), tiny_model)},
    )
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(240):
                await net.up(nursery)
                assert await net.wait_offers(1, timeout=120) >= 1
                first = await _ask(net.api, "def add")
                usage = first["usage"]
                assert isinstance(usage, dict)
                assert usage["completion_tokens"] >= 1
                assert usage["cost_nanoton"] > 0  # paid, through the proxy, to the worker behind NAT
                worker = next(c for c in net.children if c.name == "worker-1")
                client = next(c for c in net.children if c.name == "client")
                wnat = _section((await ask_status(worker.data_dir)).details(), "nat")
                assert wnat["reachability"] == "private"  # measured: the bootstrap could not dial it back
                assert wnat["circuit_addrs"]
                cnat = _section((await ask_status(client.data_dir)).details(), "nat")
                assert cnat["reachability"] in ("private", "unknown")  # never public: nobody can dial it
                relayed = await _relayed_bytes(net)
                assert relayed > 0  # the first request crossed the relay
                assert _path(first) == "relayed"
                punch = (await ask_action(client.data_dir, "wait-punch", timeout=90)).message
                second = await _ask(net.api, "def sub")
                assert second["usage"]["completion_tokens"] >= 1  # type: ignore[index]
                after = await _relayed_bytes(net)
                if nat == "cone":
                    assert "1 direct" in punch, punch
                    assert _path(second) == "direct"  # the session moved to the punched connection
                else:
                    assert "0 direct" in punch, punch
                    assert "1 failed" in punch, punch
                    assert _path(second) == "relayed"
                    assert after > relayed  # still relayed, and still answered
                # paid on both paths: the worker earned for both answers
                pay = _section((await ask_status(worker.data_dir)).details(), "network")
                assert isinstance(pay["earned_nanoton"], int)
                assert pay["earned_nanoton"] > 0
        finally:
            with trio.CancelScope(shield=True):
                await net.down()
            nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("namespaces")
async def test_behind_cone_nats_relayed_then_hole_punched(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    await _run(tmp_path, tiny_model_dir, "cone")


@pytest.mark.usefixtures("namespaces")
async def test_behind_symmetric_nats_traffic_stays_relayed(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    await _run(tmp_path, tiny_model_dir, "symmetric")
