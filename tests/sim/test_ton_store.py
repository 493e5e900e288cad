"""The durable writer: inline while the disk is fast, grouped commits on one thread when slow;
every write is durable when it returns, errors reach the writer's caller, order per key holds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from ton.store import DurableWriter, MemoryKVStore, SQLiteKVStore


async def test_inline_writes_are_durable_at_once(tmp_path: Path) -> None:
    store = SQLiteKVStore(tmp_path / "a.sqlite")
    w = DurableWriter(store)
    for i in range(20):
        await w.write("ns", "k", str(i).encode())
    assert w.commits == w.writes == 20
    store.close()
    assert SQLiteKVStore(tmp_path / "a.sqlite").read("ns", "k") == b"19"


async def test_concurrent_writes_share_commits_on_the_thread(tmp_path: Path) -> None:
    store = SQLiteKVStore(tmp_path / "b.sqlite")
    w = DurableWriter(store, inline_below=0.0)  # as if the disk were slow: always the thread

    async def channel(k: int) -> None:
        for i in range(25):
            await w.write("channel", f"c{k}", f"{k}:{i}".encode())

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            for k in range(16):
                n.start_soon(channel, k)
    assert w.writes == 400
    assert w.commits < w.writes  # grouped: several channels per fsync
    assert [store.read("channel", f"c{k}") for k in range(16)] == [f"{k}:24".encode() for k in range(16)]


class SlowStore(MemoryKVStore):
    def write(self, namespace: str, key: str, value: bytes) -> None:
        time.sleep(0.004)  # a slow disk (the sleep stands for an fsync)
        super().write(namespace, key, value)


async def test_a_slow_disk_moves_writes_off_the_event_loop() -> None:
    w = DurableWriter(SlowStore(), inline_below=0.002)
    await w.write("ns", "a", b"1")  # inline, measured slow
    assert w.latency > 0.002
    loop_free = trio.Event()

    async def other_task() -> None:
        loop_free.set()

    async with trio.open_nursery() as n:
        n.start_soon(other_task)
        await w.write("ns", "a", b"2")  # on the thread: the other task runs meanwhile
        assert loop_free.is_set()
    assert w.store.read("ns", "a") == b"2"


@pytest.mark.parametrize("inline_below", [1.0, 0.0])
async def test_errors_reach_the_caller_in_both_modes(inline_below: float) -> None:
    store = MemoryKVStore(fail_hook=lambda ns, key: key == "bad")
    w = DurableWriter(store, inline_below=inline_below)
    await w.write("ns", "good", b"1")
    with pytest.raises(OSError, match="simulated crash"):
        await w.write("ns", "bad", b"2")
    assert store.read("ns", "bad") is None
    await w.write("ns", "good", b"3")
    assert store.read("ns", "good") == b"3"
