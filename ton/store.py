"""Durable storage: a three-method KVStore and its SQLite implementation.

:class:`KVStore` is what cores' shells persist through (after LDK's ``KVStore``)::

    read(namespace, key) -> bytes | None
    write(namespace, key, value)        durable when it returns (WAL + fsync)
    remove(namespace, key)

:class:`SQLiteKVStore` keeps one table in a SQLite database in WAL mode with
``synchronous=FULL``, so every committed write has been fsynced before ``write`` returns. It adds
``keys(namespace)`` and ``write_batch`` (several writes in one atomic commit) for the local chain.
Shells write from worker threads (``trio.to_thread``); one lock serializes the connection.
:class:`MemoryKVStore` is the in-memory twin for pure tests; it can simulate a crash by
dropping the writes that a failing hook refuses.

:class:`DurableWriter` is how trio shells write: a write returns once it is durable. While the
disk is fast (a recent fsync'd commit took under ``inline_below`` seconds) it writes inline: a
SQLite commit of ~0.1 ms costs less CPU than handing it to a thread (~0.25 ms here). When the
disk is slow it hands writes to one background thread, which commits all writes waiting at that
moment in one transaction (one fsync for many channels).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import trio

from overlay.errors import ConfigError

__all__ = ["DurableWriter", "KVStore", "ListableKVStore", "MemoryKVStore", "SQLiteKVStore"]


class KVStore(Protocol):
    def read(self, namespace: str, key: str) -> bytes | None: ...

    def write(self, namespace: str, key: str, value: bytes) -> None: ...

    def remove(self, namespace: str, key: str) -> None: ...


class ListableKVStore(KVStore, Protocol):
    """A KVStore that can list a namespace's keys (what a restart needs to find its records)."""

    def keys(self, namespace: str) -> list[str]: ...


class SQLiteKVStore:
    """A KVStore in one SQLite file (WAL, synchronous=FULL: fsync on every commit)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # a small WAL that is rewritten in place: an fsync then updates no file size (cheaper)
            self._db.execute("PRAGMA wal_autocheckpoint=256")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, k TEXT NOT NULL, v BLOB NOT NULL,"
                " PRIMARY KEY (ns, k)) WITHOUT ROWID"
            )
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{path}: not a usable store ({e})") from e
        self.path = path
        self._lock = threading.Lock()

    def read(self, namespace: str, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT v FROM kv WHERE ns = ? AND k = ?", (namespace, key)).fetchone()
        return None if row is None else bytes(row[0])

    def write(self, namespace: str, key: str, value: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO kv (ns, k, v) VALUES (?, ?, ?)", (namespace, key, value))

    def remove(self, namespace: str, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM kv WHERE ns = ? AND k = ?", (namespace, key))

    def keys(self, namespace: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT k FROM kv WHERE ns = ? ORDER BY k", (namespace,)).fetchall()
        return [r[0] for r in rows]

    def write_batch(self, items: Iterable[tuple[str, str, bytes | None]]) -> None:
        """Write (value) or remove (None) several keys in one durable, atomic commit."""
        with self._lock:
            self._write_batch(items)

    def _write_batch(self, items: Iterable[tuple[str, str, bytes | None]]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for ns, k, v in items:
                if v is None:
                    db.execute("DELETE FROM kv WHERE ns = ? AND k = ?", (ns, k))
                else:
                    db.execute("INSERT OR REPLACE INTO kv (ns, k, v) VALUES (?, ?, ?)", (ns, k, v))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryKVStore:
    """An in-memory KVStore; ``fail_hook(namespace, key)`` returning True makes a write fail
    (raises OSError, stores nothing), to test crashes between persisting and sending."""

    def __init__(self, fail_hook: Callable[[str, str], bool] | None = None) -> None:
        self.data: dict[tuple[str, str], bytes] = {}
        self.fail_hook = fail_hook

    def read(self, namespace: str, key: str) -> bytes | None:
        return self.data.get((namespace, key))

    def write(self, namespace: str, key: str, value: bytes) -> None:
        if self.fail_hook is not None and self.fail_hook(namespace, key):
            raise OSError(f"simulated crash while writing {namespace}/{key}")
        self.data[(namespace, key)] = bytes(value)

    def remove(self, namespace: str, key: str) -> None:
        self.data.pop((namespace, key), None)

    def keys(self, namespace: str) -> list[str]:
        return sorted(k for ns, k in self.data if ns == namespace)


_Item = tuple[str, str, bytes, trio.lowlevel.TrioToken, list[object]]


class DurableWriter:
    """Durable writes for trio code, inline while the disk is fast, else grouped on one thread."""

    def __init__(self, store: KVStore, *, inline_below: float = 0.002, idle_exit: float = 10.0) -> None:
        self.store = store
        self.inline_below = inline_below  # seconds: write inline while commits are faster than this
        self.idle_exit = idle_exit  # seconds the writer thread waits for work before it exits
        self.latency = 0.0  # moving average of a commit's wall time, seconds
        self.commits = 0  # commits made (a grouped commit counts once)
        self.writes = 0
        self._cv = threading.Condition()
        self._queue: list[_Item] = []
        self._thread: threading.Thread | None = None
        self._in_flight = 0

    def _observe(self, seconds: float) -> None:
        self.latency = seconds if self.commits == 0 else 0.8 * self.latency + 0.2 * seconds
        self.commits += 1

    async def write(self, namespace: str, key: str, value: bytes) -> None:
        """Write ``value``; returns once it is durable (raises what the store raised)."""
        self.writes += 1
        if self.latency < self.inline_below and self._in_flight == 0:
            t0 = time.perf_counter()
            self.store.write(namespace, key, value)
            self._observe(time.perf_counter() - t0)
            return
        done = trio.Event()
        slot: list[object] = [done, None]
        with self._cv:
            self._queue.append((namespace, key, value, trio.lowlevel.current_trio_token(), slot))
            self._in_flight += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="durable-writer", daemon=True)
                self._thread.start()
            self._cv.notify()
        with trio.CancelScope(shield=True):  # like a thread call: the write completes either way
            await done.wait()
        err = slot[1]
        if isinstance(err, BaseException):
            raise err

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    self._cv.wait(self.idle_exit)
                if not self._queue:
                    self._thread = None
                    return
                batch, self._queue = self._queue, []
            t0 = time.perf_counter()
            err: BaseException | None = None
            try:
                write_batch = getattr(self.store, "write_batch", None)
                if len(batch) > 1 and write_batch is not None:
                    write_batch([(ns, k, v) for ns, k, v, _, _ in batch])
                else:
                    for ns, k, v, _, _ in batch:
                        self.store.write(ns, k, v)
            except BaseException as e:  # handed to every waiter of this batch
                err = e
            elapsed = time.perf_counter() - t0

            def finish(
                batch: list[_Item] = batch, err: BaseException | None = err, dt: float = elapsed
            ) -> None:
                self._observe(dt)
                self._in_flight -= len(batch)
                for *_, slot in batch:
                    slot[1] = err
                    done = slot[0]
                    assert isinstance(done, trio.Event)
                    done.set()

            try:
                batch[0][3].run_sync_soon(finish)
            except trio.RunFinishedError:
                return
