"""The channel contract's committed code matches its source; Python layouts match the cells."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pytoniq_core.boc.builder import Builder

from ton import contract as C

CONTRACT_DIR = Path(C.__file__).parent / "contract"

u64 = st.integers(0, 2**64 - 1)
u128 = st.integers(0, 2**128 - 1)
coins = st.integers(0, 2**120 - 1)


def test_committed_code_hash_matches_metadata() -> None:
    meta = json.loads((CONTRACT_DIR / "channel.json").read_text())
    assert C.channel_code().hash.hex().upper() == meta["codeHashHex"]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_recompiling_the_source_gives_the_committed_code() -> None:
    if not (CONTRACT_DIR / "node_modules" / "@ton" / "tolk-js").exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed")
        r = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=CONTRACT_DIR, capture_output=True, timeout=240
        )
        if r.returncode != 0:
            pytest.skip(f"npm ci failed (offline?): {r.stderr[-300:]!r}")
    out = subprocess.run(
        ["node", "build.js", "--check"],
        cwd=CONTRACT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["codeHashHex"] == C.channel_code().hash.hex().upper()


@given(u128, st.integers(0, 1), u64, coins)
def test_fast_state_hash_matches_pytoniq(channel_id: int, party: int, seqno: int, sent: int) -> None:
    cell = (
        Builder()
        .store_uint(C.Tag.STATE, 32)
        .store_uint(channel_id, 128)
        .store_uint(party, 1)
        .store_uint(seqno, 64)
        .store_coins(sent)
        .end_cell()
    )
    assert C.state_hash(channel_id, party, seqno, sent) == cell.hash
    signed = C.signed_state_cell(channel_id, party, seqno, sent, b"\x01" * 64)
    assert signed.refs[0].hash == cell.hash


@given(u128, u64, u64, coins, coins, coins, coins)
def test_fast_commit_hash_matches_pytoniq(
    cid: int, sa: int, sb: int, a: int, b: int, wa: int, wb: int
) -> None:
    body = C.coop_commit_body(cid, sa, sb, a, b, wa, wb, b"\0" * 64, b"\0" * 64)
    assert body.refs[2].hash == C.commit_payload_hash(cid, sa, sb, a, b, wa, wb)
    close = C.coop_close_body(cid, sa, sb, a, b, b"\0" * 64, b"\0" * 64)
    assert close.refs[2].hash == C.close_payload_hash(cid, sa, sb, a, b)


def test_amounts_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        C.state_hash(1, 0, 2**64, 0)
    with pytest.raises(ValueError):
        C.state_hash(1, 0, 1, 2**120)
    with pytest.raises(ValueError):
        C.state_hash(-1, 0, 1, 1)


def test_data_cell_round_trips_through_get_methods() -> None:
    from ton.tvm import Emulator

    params = C.ChannelParams(
        channel_id=7, key_a=b"\x11" * 32, key_b=b"\x22" * 32, addr_a="0:" + "aa" * 32, addr_b="0:" + "bb" * 32
    )
    emu = Emulator()
    res = emu.run_get_method(
        C.channel_code(), params.data_cell(), params.address(), "get_channel_data", [], now=1, balance=10**9
    )
    data = C.parse_channel_data(res.stack)
    assert data.channel_id == 7
    assert data.key_a == b"\x11" * 32
    assert data.status is C.Status.OPEN
    assert data.quarantine_duration == params.quarantine
    q = emu.run_get_method(
        C.channel_code(), params.data_cell(), params.address(), "get_quarantine", [], now=1, balance=10**9
    )
    assert C.parse_quarantine(q.stack) is None
