"""The local control socket: ``cocoon-node status`` and ``peers`` ask a running node.

A running node listens on ``<data dir>/control.sock`` (a Unix socket, mode
0600, so only its owner can ask) and answers one :class:`StatusRequest` per
connection with a :class:`StatusReply`, framed like every other stream.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from overlay import wire
from overlay.errors import ConfigError, DialError, NodeError
from overlay.streams import FramedStream

__all__ = [
    "CONTROL_SOCKET",
    "ActionReply",
    "ActionRequest",
    "StatusReply",
    "StatusRequest",
    "ask_action",
    "ask_status",
    "serve_control",
]

log = logging.getLogger(__name__)
CONTROL_SOCKET = "control.sock"


@wire.message(500)
@attrs.frozen
class StatusRequest:
    verbose: bool = False


@wire.message(502)
@attrs.frozen
class ActionRequest:
    """Ask the running node to do something: ``settle`` closes every payment channel cooperatively."""

    action: str = attrs.field(metadata=wire.limits(max_len=32))


@wire.message(503)
@attrs.frozen
class ActionReply:
    ok: bool
    message: str = attrs.field(metadata=wire.limits(max_len=64 * 1024))


@wire.message(501)
@attrs.frozen
class StatusReply:
    peer_id: str = wire.field(max_len=128)
    network: str = wire.field(max_len=64)
    roles: tuple[str, ...] = wire.field(max_items=8, max_len=32)
    addrs: tuple[str, ...] = wire.field(max_items=16, max_len=256)
    peers: tuple[str, ...] = wire.field(max_items=4096, max_len=128)
    routing_table_size: int = 0
    topics: tuple[str, ...] = wire.field(max_items=256, max_len=256, default=())
    uptime_s: float = 0.0
    details_json: str = wire.field(max_len=256 * 1024, default="{}")  # role-specific sections

    def details(self) -> dict[str, object]:
        value = json.loads(self.details_json)
        return value if isinstance(value, dict) else {}


class _SocketStream:
    """A trio SocketStream seen as the byte stream FramedStream expects."""

    def __init__(self, s: trio.SocketStream) -> None:
        self._s = s

    async def read(self, n: int | None = None) -> bytes:
        return await self._s.receive_some(n or 65536)

    async def write(self, data: bytes) -> None:
        await self._s.send_all(data)

    async def close(self) -> None:
        await self._s.aclose()

    async def reset(self) -> None:
        await self._s.aclose()


Action = Callable[[str], Awaitable[str]]


async def serve_control(
    data_dir: Path,
    status: Callable[[], StatusReply],
    action: Action | None = None,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer status requests on ``<data_dir>/control.sock`` until cancelled."""
    path = data_dir / CONTROL_SOCKET
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        raise ConfigError(
            f"the data dir path is too long for a control socket ({path}); use a shorter --data-dir "
            "or set node.control = false (then `status` and `peers` cannot reach this node)"
        )
    if path.exists() or path.is_symlink():
        if await _alive(path):
            raise NodeError(
                f"another node is already running on {data_dir} (its control socket answers); "
                "stop it or use another --data-dir"
            )
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(s: trio.SocketStream) -> None:
        fs = FramedStream(_SocketStream(s), max_frame=1 << 20, peer_id="control")
        try:
            with trio.fail_after(5):
                req = await fs.receive()
            if isinstance(req, StatusRequest):
                await fs.send(status())
            elif isinstance(req, ActionRequest) and action is not None:
                with trio.fail_after(300):
                    try:
                        await fs.send(ActionReply(True, await action(req.action)))
                    except NodeError as e:
                        await fs.send(ActionReply(False, str(e)))
            else:
                await fs.send(wire.ErrorFrame("bad_request", "expected StatusRequest or ActionRequest"))
        except (NodeError, trio.TooSlowError) as e:
            log.debug("control request failed: %s", e)
        finally:
            await fs.aclose()

    try:
        async with listener:
            task_status.started(path)
            await trio.serve_listeners(handle, [listener])
    finally:
        path.unlink(missing_ok=True)


async def _alive(path: Path) -> bool:
    try:
        with trio.fail_after(2):
            s = await trio.open_unix_socket(str(path))
            await s.aclose()
            return True
    except (OSError, trio.TooSlowError):
        return False


async def ask_action(data_dir: Path, action: str, timeout: float = 300.0) -> ActionReply:
    """Ask the node running on ``data_dir`` to perform ``action``."""
    fs = await _connect(data_dir, timeout)
    try:
        return await fs.request(ActionRequest(action), ActionReply, timeout)
    finally:
        await fs.aclose()


async def _connect(data_dir: Path, timeout: float) -> FramedStream:
    path = data_dir / CONTROL_SOCKET
    try:
        with trio.fail_after(min(timeout, 5.0)):
            s = await trio.open_unix_socket(str(path))
    except (OSError, trio.TooSlowError) as e:
        raise DialError(
            f"no node is running on {data_dir} (no answer on {path}); start one with `cocoon-node join`"
        ) from e
    return FramedStream(_SocketStream(s), max_frame=1 << 20, peer_id="control")


async def ask_status(data_dir: Path, timeout: float = 5.0) -> StatusReply:
    """Ask the node running on ``data_dir`` for its status; DialError when none runs."""
    path = data_dir / CONTROL_SOCKET
    try:
        with trio.fail_after(timeout):
            s = await trio.open_unix_socket(str(path))
    except (OSError, trio.TooSlowError) as e:
        raise DialError(
            f"no node is running on {data_dir} (no answer on {path}); start one with `cocoon-node join`"
        ) from e
    fs = FramedStream(_SocketStream(s), max_frame=1 << 20, peer_id="control")
    try:
        return await fs.request(StatusRequest(), StatusReply, timeout)
    finally:
        await fs.aclose()
