"""The local chain: accounts, a clock and the real TVM, persisted in the data dir.

:class:`LocalChain` is a synchronous state machine. Every message runs through pytvm's real
transaction emulator (``ton.tvm``) with the mainnet config, so gas, fees, bounces and exit codes
are the real ones. A message's whole trace (the external, then its out-messages breadth first)
is processed at once; the accounts it touched are written in one durable SQLite commit before
the call returns, so a crash never leaves half a trace.

Time: chain time is ``wall clock + offset``; :meth:`advance` moves the offset (devnets and
tests use it to pass a quarantine). Time never goes backwards.

The faucet (:meth:`mint`) injects internal messages from a fixed genesis address: devnet wallets
are funded (and deployed, when a StateInit rides along) this way.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from pathlib import Path
from typing import Any

from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell
from pytoniq_core.boc.slice import Slice
from pytoniq_core.tlb.account import ShardAccount
from pytoniq_core.tlb.transaction import MessageAny

from overlay.errors import ChainError

from .chain import AccountInfo, ExternalRejected, TxInfo, local_epoch_seed, normalize_address
from .store import SQLiteKVStore
from .tvm import EMPTY_SHARD_ACCOUNT, Emulator, TxResult
from .wallets import internal_message

__all__ = ["FAUCET_ADDRESS", "LocalChain"]

log = logging.getLogger(__name__)

FAUCET_ADDRESS = "-1:" + "cc" * 32  # source of minted coins (never an account)
MAX_TRACE = 256  # transactions one message may cause before we stop it (a loop guard)
TX_LOG_LIMIT = 2048  # transactions kept per account
_NS_ACC = "account"
_NS_META = "meta"
_NS_TX = "tx"


def _parse_exit_code(error: str) -> int | None:
    for word in error.replace(",", " ").replace(":", " ").split():
        if word.lstrip("-").isdigit():
            return int(word)
    return None


class LocalChain:
    """A single-shard chain of accounts over the real TVM."""

    def __init__(self, store: SQLiteKVStore | None = None, *, genesis: bytes | None = None) -> None:
        self._emu = Emulator()
        self._store = store
        self.accounts: dict[str, Cell] = {}
        self.txs: dict[str, list[TxInfo]] = {}
        self.tx_cells: dict[str, list[Cell]] = {}  # full transactions of this run (not persisted)
        self.lt = 1_000_000
        self.offset = 0  # seconds added to the wall clock
        self.last_now = 0
        self.tx_count = 0
        self.genesis = genesis if genesis is not None else os.urandom(32)
        if store is not None:
            self._load(store)

    # ---- persistence

    def _load(self, store: SQLiteKVStore) -> None:
        meta = store.read(_NS_META, "chain")
        if meta is None:
            self._save_meta_batch(store, [])
            return
        self.lt, self.offset, self.last_now, self.tx_count = struct.unpack(">QqQQ", meta[:32])
        self.genesis = meta[32:64]
        for addr in store.keys(_NS_ACC):
            raw = store.read(_NS_ACC, addr)
            if raw is not None:
                self.accounts[addr] = Cell.one_from_boc(raw)
        for addr in store.keys(_NS_TX):
            raw = store.read(_NS_TX, addr)
            if raw is not None:
                self.txs[addr] = _decode_txs(addr, raw)
        log.info("local chain loaded: %d accounts, lt %d", len(self.accounts), self.lt)

    def _meta(self) -> bytes:
        return struct.pack(">QqQQ", self.lt, self.offset, self.last_now, self.tx_count) + self.genesis

    def _save_meta_batch(self, store: SQLiteKVStore, touched: list[str]) -> None:
        items: list[tuple[str, str, bytes | None]] = [(_NS_META, "chain", self._meta())]
        for addr in touched:
            items.append((_NS_ACC, addr, self.accounts[addr].to_boc()))
            items.append((_NS_TX, addr, _encode_txs(self.txs.get(addr, []))))
        store.write_batch(items)

    # ---- time

    def now(self, wall: float) -> int:
        """Chain time for a wall-clock reading; monotonic."""
        t = max(int(wall) + self.offset, self.last_now)
        self.last_now = t
        return t

    def advance(self, seconds: int, wall: float) -> int:
        if seconds < 0:
            raise ChainError("time only moves forward")
        self.offset += seconds
        now = self.now(wall)
        if self._store is not None:
            self._save_meta_batch(self._store, [])
        return now

    # ---- queries

    def account(self, address: str) -> AccountInfo:
        addr = normalize_address(address)
        cell = self.accounts.get(addr)
        if cell is None:
            return AccountInfo(addr, "nonexist", 0, 0)
        sa = ShardAccount.deserialize(cell.begin_parse())
        acc = sa.account
        if acc is None:
            return AccountInfo(addr, "nonexist", 0, 0)
        state = acc.storage.state
        code_hash = None
        status = {"account_active": "active", "account_uninit": "uninit", "account_frozen": "frozen"}[
            state.type_
        ]
        if status == "active" and state.state_init.code is not None:
            code_hash = state.state_init.code.hash
        return AccountInfo(addr, status, int(acc.storage.balance.grams), int(sa.last_trans_lt), code_hash)

    def code_and_data(self, address: str) -> tuple[Cell, Cell, int] | None:
        addr = normalize_address(address)
        cell = self.accounts.get(addr)
        if cell is None:
            return None
        sa = ShardAccount.deserialize(cell.begin_parse())
        if sa.account is None or sa.account.storage.state.type_ != "account_active":
            return None
        si = sa.account.storage.state.state_init
        return si.code, si.data, int(sa.account.storage.balance.grams)

    def run_get_method(self, address: str, method: str, stack: list[Any], now: int) -> tuple[int, list[Any]]:
        cd = self.code_and_data(address)
        if cd is None:
            raise ChainError(f"{address}: no active contract")
        code, data, balance = cd
        res = self._emu.run_get_method(
            code, data, normalize_address(address), method, stack, now=now, balance=balance
        )
        return res.exit_code, list(res.stack)

    def transactions(self, address: str, after_lt: int = 0, limit: int = 64) -> list[TxInfo]:
        txs = self.txs.get(normalize_address(address), [])
        return [t for t in txs if t.lt > after_lt][:limit]

    def epoch_seed(self, epoch: int) -> bytes:
        return local_epoch_seed(self.genesis, epoch)

    # ---- messages

    def send_external(self, message: Cell, now: int) -> list[TxInfo]:
        """Run an external message and its whole trace; ExternalRejected when not accepted."""
        try:
            msg = MessageAny.deserialize(message.begin_parse())
        except Exception as e:
            raise ExternalRejected(f"not a message: {type(e).__name__}") from e
        if not msg.is_external:
            raise ExternalRejected("not an inbound external message")
        return self._run(message, _dest(msg), now, external=True)

    def mint(
        self, address: str, amount: int, now: int, *, body: Cell | None = None, state_init: Any = None
    ) -> list[TxInfo]:
        """Faucet: an internal message of ``amount`` from the genesis address (non-bounceable)."""
        if amount <= 0:
            raise ChainError("mint amount must be positive")
        addr = normalize_address(address)
        msg = internal_message(addr, amount, body, state_init, bounce=False, src=FAUCET_ADDRESS)
        return self._run(msg, addr, now, external=False)

    def _run(self, first: Cell, dest: str, now: int, *, external: bool) -> list[TxInfo]:
        queue: deque[tuple[Cell, str, bool]] = deque([(first, dest, external)])
        new_accounts: dict[str, Cell] = {}
        results: list[TxInfo] = []
        lt = self.lt
        while queue:
            if len(results) >= MAX_TRACE:
                log.warning("trace cut after %d transactions", MAX_TRACE)
                break
            msg, addr, is_ext = queue.popleft()
            account = new_accounts.get(addr) or self.accounts.get(addr) or EMPTY_SHARD_ACCOUNT
            lt += 1000
            seed = (self.tx_count + len(results)).to_bytes(32, "big")
            res = self._emu.emulate(account, msg, now=now, lt=lt, seed=seed)
            if isinstance(res, str):
                if is_ext and not results:
                    raise ExternalRejected(
                        f"external message not accepted: {res[:200]}", _parse_exit_code(res)
                    )
                log.warning("message to %s dropped by the emulator: %s", addr, res[:200])
                continue
            new_accounts[addr] = res.shard_account
            self.tx_cells.setdefault(addr, []).append(res.transaction)
            info = _tx_info(addr, res, msg, now, is_ext)
            results.append(info)
            for out in res.out_messages:
                parsed = MessageAny.deserialize(out.begin_parse())
                if parsed.is_internal:
                    queue.append((out, _dest(parsed), False))
        self.lt = lt
        self.tx_count += len(results)
        self.accounts.update(new_accounts)
        for t in results:
            log_ = self.txs.setdefault(t.account, [])
            log_.append(t)
            if len(log_) > TX_LOG_LIMIT:
                del log_[: len(log_) - TX_LOG_LIMIT]
        if self._store is not None:
            self._save_meta_batch(self._store, sorted(new_accounts))
        return results


def _dest(msg: MessageAny) -> str:
    dest = msg.info.dest
    if not isinstance(dest, Address):
        raise ExternalRejected("message has no internal destination")
    return f"{dest.wc}:{dest.hash_part.hex()}"


def _tx_info(addr: str, res: TxResult, msg: Cell, now: int, external: bool) -> TxInfo:
    parsed = MessageAny.deserialize(msg.begin_parse())
    body: Slice = parsed.body.begin_parse()
    in_op = body.load_uint(32) if body.remaining_bits >= 32 else None
    value = 0 if external else int(parsed.info.value.grams)
    tx = Slice.one_from_boc(res.transaction.to_boc())
    tx.skip_bits(4 + 256)
    lt = tx.load_uint(64)
    return TxInfo(
        account=addr,
        lt=lt,
        hash=res.transaction.hash,
        now=now,
        exit_code=res.exit_code,
        success=res.success,
        gas_used=res.gas_used,
        total_fees=res.total_fees,
        in_op=in_op,
        in_value=value,
        external=external,
    )


_TX = struct.Struct(">Q32sIiBQQqQB")


def _encode_txs(txs: list[TxInfo]) -> bytes:
    out = bytearray()
    for t in txs:
        out += _TX.pack(
            t.lt,
            t.hash,
            t.now,
            t.exit_code,
            1 if t.success else 0,
            t.gas_used,
            t.total_fees,
            -1 if t.in_op is None else t.in_op,
            t.in_value,
            1 if t.external else 0,
        )
    return bytes(out)


def _decode_txs(addr: str, raw: bytes) -> list[TxInfo]:
    txs = []
    for off in range(0, len(raw) - len(raw) % _TX.size, _TX.size):
        lt, h, now, code, ok, gas, fees, op, value, ext = _TX.unpack_from(raw, off)
        txs.append(
            TxInfo(addr, lt, h, now, code, bool(ok), gas, fees, None if op < 0 else op, value, bool(ext))
        )
    return txs


def open_local_chain(data_dir: Path) -> LocalChain:
    """The local chain persisted under ``data_dir/localchain.sqlite``."""
    return LocalChain(SQLiteKVStore(data_dir / "localchain.sqlite"))
