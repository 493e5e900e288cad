"""ASGI serving on trio: hypercorn, imported lazily, bound to a host and port."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

__all__ = ["Message", "Receive", "Scope", "Send", "serve_api"]

Scope = dict[str, object]
Message = dict[str, object]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def serve_api(
    app: object,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on host:port (0 = any free port) until cancelled; reports (host, port)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1.0

    async def started(binds: list[str]) -> None:
        return None

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))  # type: ignore[arg-type]
        bound = binds[0].rsplit(":", 1)
        host_out = bound[0].replace("http://", "").strip("[]")
        task_status.started((host_out, int(bound[1])))
