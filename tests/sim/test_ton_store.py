"""The durable writer: every commit on a worker thread (the event loop runs meanwhile), writes
that arrive during a commit grouped into the next; every write is durable when it returns, a
failure (disk full) reaches the caller as StoreError naming the file, order per key holds."""

from __future__ import annotations

import errno
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from overlay.errors import StoreError
from ton.store import DurableWriter, MemoryKVStore, SQLiteKVStore


async def test_writes_are_durable_when_they_return(tmp_path: Path) -> None:
    store = SQLiteKVStore(tmp_path / "a.sqlite")
    w = DurableWriter(store)
    assert not w.inline
    for i in range(20):
        await w.write("ns", "k", str(i).encode())
    assert w.commits == w.writes == 20
    store.close()
    assert SQLiteKVStore(tmp_path / "a.sqlite").read("ns", "k") == b"19"


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    store = SQLiteKVStore(tmp_path / "b.sqlite")
    w = DurableWriter(store)

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
    blocking = True  # stands for a disk

    def write(self, namespace: str, key: str, value: bytes) -> None:
        time.sleep(0.004)  # a slow disk (the sleep stands for an fsync)
        super().write(namespace, key, value)


async def test_the_event_loop_runs_while_a_write_waits_for_the_disk() -> None:
    w = DurableWriter(SlowStore())
    loop_free = trio.Event()

    async def other_task() -> None:
        loop_free.set()

    async with trio.open_nursery() as n:
        n.start_soon(other_task)
        await w.write("ns", "a", b"2")  # on a thread: the other task runs meanwhile
        assert loop_free.is_set()
    assert w.store.read("ns", "a") == b"2"


async def test_a_cancelled_caller_still_gets_its_write_done() -> None:
    w = DurableWriter(SlowStore())
    with trio.CancelScope() as scope:
        scope.cancel()
        await w.write("ns", "a", b"1")  # shielded like a thread call: it completes
    assert w.store.read("ns", "a") == b"1"


class FullDisk(SlowStore):
    """A disk that fills up: writes of key ``bad`` fail with ENOSPC."""

    def write(self, namespace: str, key: str, value: bytes) -> None:
        if key == "bad":
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(namespace, key, value)


@pytest.mark.parametrize("store", [FullDisk(), MemoryKVStore(fail_hook=lambda ns, key: key == "bad")])
async def test_a_failed_write_is_a_store_error_naming_the_key(store: MemoryKVStore) -> None:
    w = DurableWriter(store)
    await w.write("ns", "good", b"1")
    with pytest.raises(StoreError, match="ns/bad"):
        await w.write("ns", "bad", b"2")
    assert store.read("ns", "bad") is None
    await w.write("ns", "good", b"3")
    assert store.read("ns", "good") == b"3"


async def test_a_full_sqlite_disk_names_the_file(tmp_path: Path) -> None:
    class Full(SQLiteKVStore):
        def write(self, namespace: str, key: str, value: bytes) -> None:
            raise sqlite3.OperationalError("database or disk is full")

    store = Full(tmp_path / "full.sqlite")
    with pytest.raises(StoreError, match=r"full\.sqlite: writing channel/c1 failed: database or disk"):
        await DurableWriter(store).write("channel", "c1", b"x")
    store.close()
