"""The local chain over loopback: a small framed-msgpack RPC (tags 450-479), server and client.

One ``cocoon-node localchain`` process runs :func:`serve_localchain`: it opens (or creates) the
chain in its data dir, funds the genesis wallets, listens on 127.0.0.1 and answers requests, one
at a time per connection, each with one reply or an :class:`~overlay.wire.ErrorFrame`:

    bad_request   the request is well-formed msgpack but invalid (bad address, bad BOC, limits)
    rejected      the chain refused an external message (message carries the reason)
    chain_error   anything else the chain refused
    timeout       a wait_transaction ran out

Undecodable bytes reset the connection; no request ever changes state unless it succeeds.
:class:`LocalChainClient` implements :class:`~ton.chain.ChainClient` (plus ``fund`` and
``advance_time``) over one persistent connection, reconnecting when it breaks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
from pytoniq_core.boc.cell import Cell
from pytoniq_core.tlb.account import StateInit
from pytoniq_core.tlb.vm_stack import VmStack

from overlay import wire
from overlay.errors import ChainError, DecodeError, NodeError, RemoteError, TransportError
from overlay.streams import FramedStream, expect

from .chain import EPOCH_SECONDS, AccountInfo, ExternalRejected, TxInfo, read_channel_state, read_wallet_seqno
from .contract import ChannelData
from .localchain import open_local_chain
from .localservice import LocalChainService
from .wallets import Wallet

__all__ = ["LocalChainClient", "serve_localchain"]

log = logging.getLogger(__name__)
_R = TypeVar("_R")
MAX_BOC = 64 * 1024


@wire.message(450)
@attrs.frozen
class NowRequest:
    pass


@wire.message(451)
@attrs.frozen
class AccountRequest:
    address: str = attrs.field(metadata=wire.limits(max_len=80))


@wire.message(452)
@attrs.frozen
class SendExternalRequest:
    boc: bytes = attrs.field(metadata=wire.limits(max_len=MAX_BOC))


@wire.message(453)
@attrs.frozen
class GetMethodRequest:
    address: str = attrs.field(metadata=wire.limits(max_len=80))
    method: str = attrs.field(metadata=wire.limits(max_len=128))
    stack_boc: bytes = attrs.field(metadata=wire.limits(max_len=MAX_BOC))


@wire.message(454)
@attrs.frozen
class TransactionsRequest:
    address: str = attrs.field(metadata=wire.limits(max_len=80))
    after_lt: int
    limit: int


@wire.message(455)
@attrs.frozen
class WaitTransactionRequest:
    address: str = attrs.field(metadata=wire.limits(max_len=80))
    after_lt: int
    timeout: float


@wire.message(456)
@attrs.frozen
class EpochSeedRequest:
    epoch: int
    epoch_seconds: int


@wire.message(457)
@attrs.frozen
class FundRequest:
    address: str = attrs.field(metadata=wire.limits(max_len=80))
    amount: int
    state_init_boc: bytes | None = attrs.field(default=None, metadata=wire.limits(max_len=MAX_BOC))


@wire.message(458)
@attrs.frozen
class AdvanceTimeRequest:
    seconds: int


@wire.message(465)
@attrs.frozen
class IntReply:
    value: int


@wire.message(466)
@attrs.frozen
class AccountReply:
    address: str = attrs.field(metadata=wire.limits(max_len=80))
    status: str = attrs.field(metadata=wire.limits(max_len=16))
    balance: int
    last_lt: int
    code_hash: bytes | None = attrs.field(default=None, metadata=wire.limits(max_len=32))


@attrs.frozen
class TxRecord:
    account: str = attrs.field(metadata=wire.limits(max_len=80))
    lt: int
    hash: bytes = attrs.field(metadata=wire.limits(max_len=32))
    now: int
    exit_code: int
    success: bool
    gas_used: int
    total_fees: int
    in_op: int | None
    in_value: int
    external: bool


@wire.message(467)
@attrs.frozen
class TxListReply:
    txs: tuple[TxRecord, ...] = attrs.field(metadata={"wire": {"max_items": 256}})


@wire.message(468)
@attrs.frozen
class StackReply:
    stack_boc: bytes = attrs.field(metadata=wire.limits(max_len=MAX_BOC))


@wire.message(469)
@attrs.frozen
class BytesReply:
    value: bytes = attrs.field(metadata=wire.limits(max_len=MAX_BOC))


def _tx_record(t: TxInfo) -> TxRecord:
    return TxRecord(**attrs.asdict(t))


def _tx_info(r: TxRecord) -> TxInfo:
    return TxInfo(**attrs.asdict(r))


class BadRequest(ChainError):
    """A request the local chain cannot serve (bad address, bad BOC, bad values)."""


def _cell(boc: bytes) -> Cell:
    try:
        cell: Cell = Cell.one_from_boc(boc)
    except Exception as e:  # pytoniq raises a zoo of types on garbage
        raise BadRequest(f"not a BOC: {type(e).__name__}") from e
    return cell


def _stack_boc(stack: list[Any]) -> bytes:
    boc: bytes = VmStack.serialize(stack).to_boc()
    return boc


def _parse_stack(boc: bytes) -> list[Any]:
    try:
        return list(VmStack.deserialize(_cell(boc).begin_parse()))
    except ChainError:
        raise
    except Exception as e:
        raise BadRequest(f"not a VM stack: {type(e).__name__}") from e


# --------------------------------------------------------------------------- server


async def _dispatch(svc: LocalChainService, req: object) -> object:
    if isinstance(req, NowRequest):
        return IntReply(await svc.now())
    if isinstance(req, AccountRequest):
        a = await svc.get_account(req.address)
        return AccountReply(a.address, a.status, a.balance, a.last_lt, a.code_hash)
    if isinstance(req, SendExternalRequest):
        txs = await svc.send_external_traced(_cell(req.boc))
        return TxListReply(tuple(_tx_record(t) for t in txs[:256]))
    if isinstance(req, GetMethodRequest):
        out = await svc.run_get_method(req.address, req.method, _parse_stack(req.stack_boc))
        return StackReply(_stack_boc(out))
    if isinstance(req, TransactionsRequest):
        if not 0 < req.limit <= 256 or req.after_lt < 0:
            raise BadRequest("limit must be in 1..256, after_lt >= 0")
        txs = await svc.transactions(req.address, req.after_lt, req.limit)
        return TxListReply(tuple(_tx_record(t) for t in txs))
    if isinstance(req, WaitTransactionRequest):
        if not 0 <= req.timeout <= 600:
            raise BadRequest("timeout must be in 0..600 s")
        t = await svc.wait_transaction(req.address, req.after_lt, req.timeout)
        return TxListReply((_tx_record(t),))
    if isinstance(req, EpochSeedRequest):
        return BytesReply(await svc.epoch_seed(req.epoch, epoch_seconds=req.epoch_seconds))
    if isinstance(req, FundRequest):
        si = None
        if req.state_init_boc is not None:
            try:
                si = StateInit.deserialize(_cell(req.state_init_boc).begin_parse())
            except ChainError:
                raise
            except Exception as e:
                raise BadRequest(f"not a StateInit: {type(e).__name__}") from e
        txs = await svc.fund(req.address, req.amount, si)
        return TxListReply(tuple(_tx_record(t) for t in txs[:256]))
    if isinstance(req, AdvanceTimeRequest):
        return IntReply(await svc.advance_time(req.seconds))
    raise BadRequest(f"{type(req).__name__} is not a local chain request")


def _error_code(e: NodeError) -> str:
    if isinstance(e, ExternalRejected):
        return "rejected"
    if isinstance(e, BadRequest) or "not a TON address" in str(e) or "must be" in str(e):
        return "bad_request"
    if "within" in str(e) and "no transaction" in str(e):
        return "timeout"
    return "chain_error"


class _SocketBytes:
    """trio's SocketStream as the ByteStream FramedStream wants."""

    def __init__(self, s: trio.SocketStream) -> None:
        self.s = s

    async def read(self, n: int | None = None) -> bytes:
        return await self.s.receive_some(n or 65536)

    async def write(self, data: bytes) -> None:
        await self.s.send_all(data)

    async def close(self) -> None:
        await self.s.aclose()

    async def reset(self) -> None:
        await self.s.aclose()


async def _serve_connection(svc: LocalChainService, sock: trio.SocketStream) -> None:
    fs = FramedStream(_SocketBytes(sock), peer_id="localchain-client")
    try:
        while True:
            try:
                req = await fs.receive()
            except DecodeError as e:
                log.info("garbage on the local chain RPC: %s", e)
                return
            if req is None:
                return
            try:
                reply = await _dispatch(svc, req)
            except NodeError as e:
                reply = wire.ErrorFrame(_error_code(e), str(e)[:1000])
            await fs.send(reply)
    except TransportError:
        return
    finally:
        await fs.aclose()


async def serve_localchain(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    genesis: Sequence[tuple[Wallet, int]] = (),
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local chain persisted in ``data_dir`` on ``host:port`` (port 0: any free one).

    Each genesis wallet that does not exist yet is deployed with its amount (nanoTON).
    Reports ``(host, port)`` through ``task_status`` and writes it to ``data_dir/localchain.addr``.
    """
    await trio.Path(data_dir).mkdir(parents=True, exist_ok=True)
    chain = open_local_chain(data_dir)
    svc = LocalChainService(chain, clock)
    for wallet, amount in genesis:
        if (await svc.get_account(wallet.address())).status == "nonexist":
            await svc.fund(wallet.address(), amount, wallet.state_init())
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    addr = (str(bound[0]), int(bound[1]))
    await trio.Path(data_dir / "localchain.addr").write_text(f"{addr[0]}:{addr[1]}\n")
    log.info("local chain serving on %s:%d (%d accounts)", addr[0], addr[1], len(chain.accounts))
    task_status.started(addr)

    async def handler(sock: trio.SocketStream) -> None:
        await _serve_connection(svc, sock)

    await trio.serve_listeners(handler, listeners)


# --------------------------------------------------------------------------- client


class LocalChainClient:
    """ChainClient for a local chain served by :func:`serve_localchain`."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._fs: FramedStream | None = None
        self._lock = trio.Lock()

    async def aclose(self) -> None:
        if self._fs is not None:
            await self._fs.aclose()
            self._fs = None

    async def _call(self, req: object, reply: type[_R], timeout: float | None = None) -> _R:
        async with self._lock:
            for attempt in (1, 2):
                try:
                    if self._fs is None:
                        sock = await trio.open_tcp_stream(self.host, self.port)
                        self._fs = FramedStream(_SocketBytes(sock), peer_id="localchain")
                    with trio.fail_after(timeout or self.timeout):
                        await self._fs.send(req)
                        msg = await self._fs.receive()
                    if msg is None:
                        raise TransportError("local chain closed the connection")
                    return expect(reply, msg)
                except RemoteError as e:
                    if e.code == "rejected":
                        raise ExternalRejected(e.message) from e
                    raise ChainError(f"{e.code}: {e.message}") from e
                except (OSError, TransportError, trio.TooSlowError) as e:
                    if self._fs is not None:
                        await self._fs.reset()
                        self._fs = None
                    if attempt == 2 or isinstance(e, trio.TooSlowError):
                        raise ChainError(f"local chain at {self.host}:{self.port}: {e}") from e
        raise AssertionError("unreachable")

    async def now(self) -> int:
        return (await self._call(NowRequest(), IntReply)).value

    async def get_account(self, address: str) -> AccountInfo:
        r = await self._call(AccountRequest(address), AccountReply)
        return AccountInfo(r.address, r.status, r.balance, r.last_lt, r.code_hash)

    async def get_balance(self, address: str) -> int:
        return (await self.get_account(address)).balance

    async def send_external(self, message: Cell) -> bytes:
        await self.send_external_traced(message)
        h: bytes = message.hash
        return h

    async def send_external_traced(self, message: Cell) -> list[TxInfo]:
        r = await self._call(SendExternalRequest(message.to_boc()), TxListReply)
        return [_tx_info(t) for t in r.txs]

    async def run_get_method(self, address: str, method: str, stack: list[Any]) -> list[Any]:
        r = await self._call(GetMethodRequest(address, method, _stack_boc(stack)), StackReply)
        return _parse_stack(r.stack_boc)

    async def get_channel_state(self, address: str) -> ChannelData | None:
        return await read_channel_state(self, address)

    async def wallet_seqno(self, address: str) -> int:
        return await read_wallet_seqno(self, address)

    async def transactions(self, address: str, after_lt: int = 0, limit: int = 64) -> list[TxInfo]:
        r = await self._call(TransactionsRequest(address, after_lt, limit), TxListReply)
        return [_tx_info(t) for t in r.txs]

    async def wait_transaction(self, address: str, after_lt: int, timeout: float) -> TxInfo:
        r = await self._call(WaitTransactionRequest(address, after_lt, timeout), TxListReply, timeout + 5)
        return _tx_info(r.txs[0])

    async def epoch_seed(self, epoch: int, *, epoch_seconds: int = EPOCH_SECONDS) -> bytes:
        return (await self._call(EpochSeedRequest(epoch, epoch_seconds), BytesReply)).value

    async def fund(self, address: str, amount: int, state_init: StateInit | None = None) -> list[TxInfo]:
        boc = state_init.serialize().to_boc() if state_init is not None else None
        r = await self._call(FundRequest(address, amount, boc), TxListReply)
        return [_tx_info(t) for t in r.txs]

    async def advance_time(self, seconds: int) -> int:
        return (await self._call(AdvanceTimeRequest(seconds), IntReply)).value
