"""``cocoon-node ask`` and ``cocoon-node offers``: terminal front-ends of a running client node.

Both talk to the client's OpenAI-compatible API (its URL is in
``<data dir>/api.url``, written when the client starts), exactly as any app would.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from overlay.errors import DialError, NodeError

from .client import API_ADDR_FILE
from .config import NodeConfig

__all__ = ["api_url", "cmd_ask", "cmd_offers", "stream_chat"]

TON = 1_000_000_000


def api_url(cfg: NodeConfig, explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    path = Path(cfg.data_dir) / API_ADDR_FILE
    try:
        return path.read_text().strip().rstrip("/")
    except OSError as e:
        raise DialError(
            f"no client node is running on {cfg.data_dir} ({path} is missing); start one with "
            "`cocoon-node client` (or `cocoon-node devnet`), or pass --api URL"
        ) from e


def stream_chat(base: str, body: dict[str, object], timeout: float = 300.0) -> Iterator[dict[str, object]]:
    """The SSE events of a streamed chat completion, decoded; NodeError on an HTTP or API error."""
    try:
        with (
            httpx.Client(base_url=base, timeout=timeout) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            if r.status_code != 200:
                r.read()
                try:
                    err = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    err = r.text
                raise NodeError(f"the API answered {r.status_code}: {err}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise NodeError(f"the network failed mid-answer: {event['error'].get('message')}")
                yield event
    except httpx.HTTPError as e:
        raise DialError(f"cannot reach the client API at {base}: {e}") from e


def cmd_ask(args: argparse.Namespace, cfg: NodeConfig) -> int:
    base = api_url(cfg, args.api)
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.question}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
    }
    last: dict[str, object] | None = None
    for event in stream_chat(base, body):
        choices = event.get("choices") or []
        assert isinstance(choices, list)
        for c in choices:
            text = (c.get("delta") or {}).get("content") if isinstance(c, dict) else None
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
        if "cocoon" in event:
            last = event
    print()
    if last is not None:
        usage = last.get("usage") or {}
        info = last.get("cocoon") or {}
        assert isinstance(usage, dict)
        assert isinstance(info, dict)
        workers = info.get("workers") or []
        assert isinstance(workers, list)
        who = ", ".join(
            f"{w['peer_id'][-10:]} (tier {w['tier']}, {w['completion_tokens']} tokens)" for w in workers
        )
        cost = int(usage.get("cost_nanoton", 0))
        print(
            f"-- {usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens, "
            f"paid {cost:,} nanoTON ({cost / TON:.9f} TON) to {who}",
            file=sys.stderr,
        )
    return 0


def cmd_offers(args: argparse.Namespace, cfg: NodeConfig) -> int:
    base = api_url(cfg, args.api)
    try:
        r = httpx.get(f"{base}/v1/models", timeout=30)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise DialError(f"cannot reach the client API at {base}: {e}") from e
    rows = r.json().get("data", [])
    print(f"{'model':<28} {'offers':>6} {'capacity':>8} {'p10':>7} {'median':>7} {'p90':>7} {'fills':>6}")
    for m in rows:
        c = m.get("cocoon", {})
        print(
            f"{m['id']:<28} {c.get('workers', 0):>6} {c.get('capacity', 0):>8} "
            f"{c.get('min_price_completion', 0):>7} {c.get('median_price_completion', 0):>7} "
            f"{c.get('p90_price_completion', 0):>7} {c.get('fills', 0):>6}"
        )
    print("prices: nanoTON per completion token (before the proxy fee)")
    return 0
