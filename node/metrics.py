"""Prometheus metrics: a tiny registry rendered in the text exposition format.

Counters and gauges, optionally labelled; collectors (callables returning
samples) let components publish gauges that are read at scrape time (peers,
offers, channel balances, earnings).  No third-party client is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .completion import Completed

__all__ = ["Counter", "Gauge", "Metrics", "Sample", "serve_metrics"]

Sample = tuple[str, dict[str, str], float]  # name, labels, value


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


class Counter:
    def __init__(self, name: str, help_: str) -> None:
        self.name = name
        self.help = help_
        self._values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[Sample]:
        return [(self.name, dict(k), v) for k, v in self._values.items()] or [(self.name, {}, 0.0)]


class Gauge(Counter):
    def set(self, value: float, **labels: str) -> None:
        self._values[tuple(sorted(labels.items()))] = value


class Metrics:
    """The node's metrics; ``render()`` is what /metrics serves."""

    def __init__(self) -> None:
        self._families: list[tuple[str, str, Counter]] = []
        self._collectors: list[tuple[str, str, str, Callable[[], list[Sample]]]] = []
        self.requests = self.counter("cocoon_api_requests_total", "completion requests received")
        self.errors = self.counter("cocoon_api_errors_total", "completion requests that failed")
        self.http = self.counter("cocoon_http_responses_total", "HTTP responses by path and status")
        self.http_seconds = self.counter("cocoon_http_seconds_total", "seconds spent answering HTTP requests")
        self.prompt_tokens = self.counter("cocoon_prompt_tokens_total", "prompt tokens of completed requests")
        self.completion_tokens = self.counter("cocoon_completion_tokens_total", "completion tokens received")
        self.spent = self.counter("cocoon_spent_nanoton_total", "nanoTON paid to workers for completions")
        self.ttft_sum = self.counter("cocoon_ttft_seconds_sum", "sum of times to first token")
        self.ttft_count = self.counter("cocoon_ttft_seconds_count", "completions with a time to first token")

    def counter(self, name: str, help_: str) -> Counter:
        c = Counter(name, help_)
        self._families.append(("counter", help_, c))
        return c

    def gauge(self, name: str, help_: str) -> Gauge:
        g = Gauge(name, help_)
        self._families.append(("gauge", help_, g))
        return g

    def collector(self, name: str, kind: str, help_: str, fn: Callable[[], list[Sample]]) -> None:
        """Samples computed at scrape time (``kind`` is "gauge" or "counter")."""
        self._collectors.append((name, kind, help_, fn))

    def observe_http(self, path: str, status: int, seconds: float) -> None:
        known = (
            path if path in {"/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics"} else "other"
        )
        self.http.inc(path=known, status=str(status))
        self.http_seconds.inc(seconds, path=known)

    def completed(self, done: Completed) -> None:
        self.prompt_tokens.inc(done.prompt_tokens)
        self.completion_tokens.inc(done.completion_tokens)
        self.spent.inc(done.cost_nanoton)
        if done.ttft_s > 0:
            self.ttft_sum.inc(done.ttft_s)
            self.ttft_count.inc()

    def render(self) -> str:
        lines: list[str] = []
        for kind, help_, fam in self._families:
            lines.append(f"# HELP {fam.name} {help_}")
            lines.append(f"# TYPE {fam.name} {kind}")
            lines += [f"{n}{_labels(lb)} {_num(v)}" for n, lb, v in fam.samples()]
        for name, kind, help_, fn in self._collectors:
            try:
                samples = fn()
            except Exception as e:  # a broken collector must not break the scrape
                lines.append(f"# collector {name} failed: {type(e).__name__}")
                continue
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines += [f"{n}{_labels(lb)} {_num(v)}" for n, lb, v in samples]
        return "\n".join(lines) + "\n"


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on host:port (for nodes without the client API)."""
    from .asgi import serve_api

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()  # type: ignore[operator]
                kind = str(msg["type"])
                await send({"type": kind + ".complete"})  # type: ignore[operator]
                if kind == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        ok = scope.get("path") == "/metrics"
        body = metrics.render().encode() if ok else b"not found\n"
        await send(  # type: ignore[operator]
            {
                "type": "http.response.start",
                "status": 200 if ok else 404,
                "headers": [(b"content-type", b"text/plain; version=0.0.4")],
            }
        )
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    await serve_api(app, host, port, task_status=task_status)
