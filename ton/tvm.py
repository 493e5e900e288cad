"""The TVM emulator: pytvm 0.0.14's C library with its known bugs worked around.

pytvm wraps TON's ``libemulator`` (the real C++ TVM and transaction logic). Its Python layer has
four problems we avoid here (see ``shared/notes/ton-payments.md``):

1. ``EmulatorEngineC.default()`` imports ``pkg_resources`` (gone from new setuptools): we build
   the engine from the ``.so`` path ourselves.
2. 64-bit arguments declared ``c_uint`` silently truncate amounts above 4.29 TON: we re-declare
   them ``c_uint64``.
3. ``send_internal_message`` crashes on failed runs: we use the raw JSON calls only.
4. hand-built ShardAccounts are refused: accounts are created by a deploy message arriving at
   :data:`EMPTY_SHARD_ACCOUNT`.

:class:`Emulator` runs one transaction or one get-method at a given unix time and logical time,
with the mainnet config committed in ``ton/data/mainnet-config.boc``.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import json
import os
from pathlib import Path
from typing import Any

import attrs
import pytvm
from pytoniq_core.boc.builder import Builder
from pytoniq_core.boc.cell import Cell
from pytoniq_core.boc.slice import Slice
from pytoniq_core.tlb.vm_stack import VmStack

from overlay.errors import ChainError

__all__ = [
    "EMPTY_SHARD_ACCOUNT",
    "MAINNET_CONFIG_PATH",
    "Emulator",
    "GetMethodResult",
    "TxResult",
    "mainnet_config",
    "method_id",
]

MAINNET_CONFIG_PATH = Path(__file__).parent / "data" / "mainnet-config.boc"

EMPTY_SHARD_ACCOUNT: Cell = (
    Builder()
    .store_ref(Builder().store_bit_int(0).end_cell())  # account_none$0
    .store_uint(0, 256)  # last_trans_hash
    .store_uint(0, 64)  # last_trans_lt
    .end_cell()
)


@functools.cache
def mainnet_config() -> Cell:
    """The mainnet config cell (masterchain seqno 52956904, shipped by @ton/sandbox 0.41.0)."""
    return Cell.one_from_boc(MAINNET_CONFIG_PATH.read_bytes())


def method_id(name: str) -> int:
    """A get-method id: CRC16/XMODEM of the name, with bit 16 set."""
    crc = 0
    for byte in name.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc | 0x10000


def _b64(cell: Cell) -> bytes:
    return base64.b64encode(cell.to_boc())


def _cell(b64: str) -> Cell:
    return Cell.one_from_boc(base64.b64decode(b64))


@functools.cache
def _library() -> ctypes.CDLL:
    engine_dir = Path(pytvm.__file__).parent / "engine"
    names = [n for n in os.listdir(engine_dir) if n.startswith("libemulator")]
    if not names:
        raise ChainError(f"no libemulator in {engine_dir}")
    lib = ctypes.CDLL(str(engine_dir / names[0]))
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "transaction_emulator_create": (vp, [cp, ctypes.c_int]),
        "transaction_emulator_set_unixtime": (ctypes.c_bool, [vp, ctypes.c_uint32]),
        "transaction_emulator_set_lt": (ctypes.c_bool, [vp, ctypes.c_uint64]),
        "transaction_emulator_set_rand_seed": (ctypes.c_bool, [vp, cp]),
        "transaction_emulator_set_config": (ctypes.c_bool, [vp, cp]),
        "transaction_emulator_emulate_transaction": (cp, [vp, cp, cp]),
        "transaction_emulator_destroy": (None, [vp]),
        "emulator_set_verbosity_level": (ctypes.c_bool, [ctypes.c_int]),
        "tvm_emulator_create": (vp, [cp, cp, ctypes.c_int]),
        "tvm_emulator_set_c7": (ctypes.c_bool, [vp, cp, ctypes.c_uint32, ctypes.c_uint64, cp, cp]),
        "tvm_emulator_set_gas_limit": (ctypes.c_bool, [vp, ctypes.c_int64]),
        "tvm_emulator_run_get_method": (cp, [vp, ctypes.c_int, cp]),
        "tvm_emulator_destroy": (None, [vp]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    lib.emulator_set_verbosity_level(0)
    return lib


@attrs.frozen
class TxResult:
    """One emulated transaction: the account after it and what happened."""

    shard_account: Cell
    transaction: Cell
    exit_code: int  # compute phase exit code (-1 when the compute phase was skipped)
    success: bool  # compute and action phases both succeeded
    gas_used: int
    total_fees: int  # nanoTON
    out_messages: tuple[Cell, ...]


@attrs.frozen
class GetMethodResult:
    exit_code: int
    gas_used: int
    stack: tuple[Any, ...]


class Emulator:
    """One transaction emulator and config, reused for every transaction of a local chain."""

    def __init__(self, config: Cell | None = None) -> None:
        self._lib = _library()
        self._config = config if config is not None else mainnet_config()
        self._config_b64 = _b64(self._config)
        ptr = self._lib.transaction_emulator_create(self._config_b64, 0)
        if not ptr:
            raise ChainError("cannot create the transaction emulator (bad config?)")
        self._ptr: int = ptr

    def close(self) -> None:
        if self._ptr:
            self._lib.transaction_emulator_destroy(self._ptr)
            self._ptr = 0

    def __del__(self) -> None:
        self.close()

    def emulate(
        self, shard_account: Cell, message: Cell, *, now: int, lt: int, seed: bytes
    ) -> TxResult | str:
        """Emulate ``message`` arriving at ``shard_account``; a string is the emulator's refusal
        (an external message not accepted, an account that cannot pay, a malformed message)."""
        from pytoniq_core.tlb.transaction import Transaction

        lib = self._lib
        lib.transaction_emulator_set_unixtime(self._ptr, now)
        lib.transaction_emulator_set_lt(self._ptr, lt)
        lib.transaction_emulator_set_rand_seed(self._ptr, seed.hex().encode())
        raw = lib.transaction_emulator_emulate_transaction(self._ptr, _b64(shard_account), _b64(message))
        res = json.loads(raw)
        if not res.get("success"):
            return str(res.get("error") or res.get("vm_log") or "emulation failed")
        if res.get("transaction") is None:
            return str(res.get("error") or "not accepted")
        tx_cell = _cell(res["transaction"])
        tx = Transaction.deserialize(tx_cell.begin_parse())
        descr = tx.description
        compute = getattr(descr, "compute_ph", None)
        action = getattr(descr, "action", None)
        if compute is not None and getattr(compute, "type_", "") == "vm":
            exit_code = int(compute.exit_code)
            gas = int(compute.gas_used)
            ok = bool(compute.success)
        else:
            exit_code, gas, ok = -1, 0, False
        if action is not None:
            ok = ok and bool(action.success)
        outs = tuple(m.serialize() for m in tx.out_msgs)
        return TxResult(
            shard_account=_cell(res["shard_account"]),
            transaction=tx_cell,
            exit_code=exit_code,
            success=ok and not bool(getattr(descr, "aborted", False)),
            gas_used=gas,
            total_fees=int(tx.total_fees.grams),
            out_messages=outs,
        )

    def run_get_method(
        self,
        code: Cell,
        data: Cell,
        address: str,
        method: str,
        stack: list[Any],
        *,
        now: int,
        balance: int,
    ) -> GetMethodResult:
        """Run a get-method on ``code``/``data`` as if deployed at ``address``."""
        lib = self._lib
        ptr = lib.tvm_emulator_create(_b64(code), _b64(data), 0)
        if not ptr:
            raise ChainError("cannot create a TVM emulator for this account")
        try:
            lib.tvm_emulator_set_c7(ptr, address.encode(), now, balance, b"00" * 32, self._config_b64)
            lib.tvm_emulator_set_gas_limit(ptr, 1_000_000)
            stack_cell = VmStack.serialize(stack)
            raw = lib.tvm_emulator_run_get_method(ptr, method_id(method), _b64(stack_cell))
            res = json.loads(raw)
        finally:
            lib.tvm_emulator_destroy(ptr)
        if not res.get("success"):
            raise ChainError(f"get-method {method}: {res.get('error', 'failed')}")
        out = VmStack.deserialize(Slice.one_from_boc(base64.b64decode(res["stack"])))
        return GetMethodResult(
            exit_code=int(res.get("vm_exit_code", 0)),
            gas_used=int(res.get("gas_used", 0)),
            stack=tuple(out),
        )
