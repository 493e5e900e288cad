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

:class:`DurableWriter` is how trio shells write: a write returns once it is durable. Every
commit runs in a worker thread under a CapacityLimiter (an fsync never blocks the event loop);
the writes that arrive while one commit runs share the next (one fsync for many channels).
A failed write raises :class:`~overlay.errors.StoreError` naming the file; a record that does
not decode at restart is :class:`~overlay.errors.CorruptStore` (the caller names the key).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import trio

from overlay.errors import CorruptStore, StoreError

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

    blocking = True  # writes wait for the disk: a DurableWriter runs them on a thread

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
            raise CorruptStore(f"{path}: not a usable store ({e}); it was left as it is") from e
        self.path = path
        self._lock = threading.Lock()

    def read(self, namespace: str, key: str) -> bytes | None:
        with self._lock:
            try:
                row = self._db.execute("SELECT v FROM kv WHERE ns = ? AND k = ?", (namespace, key)).fetchone()
            except sqlite3.DatabaseError as e:
                raise CorruptStore(f"{self.path}: cannot read {namespace}/{key} ({e})") from e
        return None if row is None else bytes(row[0])

    def write(self, namespace: str, key: str, value: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO kv (ns, k, v) VALUES (?, ?, ?)", (namespace, key, value))

    def remove(self, namespace: str, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM kv WHERE ns = ? AND k = ?", (namespace, key))

    def keys(self, namespace: str) -> list[str]:
        with self._lock:
            try:
                rows = self._db.execute("SELECT k FROM kv WHERE ns = ? ORDER BY k", (namespace,)).fetchall()
            except sqlite3.DatabaseError as e:
                raise CorruptStore(f"{self.path}: cannot list {namespace} ({e})") from e
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

    blocking = False  # no disk: a DurableWriter writes inline

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


class _Pending:
    """One write waiting for its commit."""

    __slots__ = ("done", "error", "key", "namespace", "value")

    def __init__(self, namespace: str, key: str, value: bytes) -> None:
        self.namespace, self.key, self.value = namespace, key, value
        self.done = False
        self.error: BaseException | None = None


class DurableWriter:
    """Durable writes for trio code: each in a worker thread (``trio.to_thread`` under a
    :class:`trio.CapacityLimiter`), never an fsync on the trio thread. Writes that arrive while
    a commit runs wait for the next one, which takes all of them in one transaction (one fsync).

    A write returns once it is durable; it completes even when its caller is cancelled (like a
    thread call). A failure (disk full, I/O error) raises :class:`StoreError` naming the store
    and the key, and nothing of that commit was written. Stores that are not on disk
    (``blocking = False``, e.g. :class:`MemoryKVStore`) are written inline; ``inline=True``
    forces that (benchmarks in virtual time only: it blocks the event loop on every fsync)."""

    def __init__(
        self, store: KVStore, *, limiter: trio.CapacityLimiter | None = None, inline: bool | None = None
    ) -> None:
        self.store = store
        self.limiter = limiter or trio.CapacityLimiter(1)  # one commit at a time on the connection
        self.inline = not getattr(store, "blocking", True) if inline is None else inline
        self.commits = 0  # commits made (a grouped commit counts once)
        self.writes = 0
        self._pending: list[_Pending] = []
        self._committing = False
        self._committed = trio.Event()  # set (and replaced) after each commit

    def _where(self) -> str:
        path = getattr(self.store, "path", None)
        return str(path) if path is not None else type(self.store).__name__

    def _failed(self, item: _Pending, e: BaseException) -> StoreError:
        return StoreError(f"{self._where()}: writing {item.namespace}/{item.key} failed: {e}")

    async def write(self, namespace: str, key: str, value: bytes) -> None:
        """Write ``value``; returns once it is durable (StoreError when it could not be)."""
        self.writes += 1
        item = _Pending(namespace, key, value)
        if self.inline:
            try:
                self.store.write(namespace, key, value)
            except (OSError, sqlite3.Error) as e:
                raise self._failed(item, e) from e
            self.commits += 1
            return
        self._pending.append(item)
        with trio.CancelScope(shield=True):  # like a thread call: the write completes either way
            while not item.done:
                if self._committing:
                    await self._committed.wait()
                else:
                    await self._commit()
        if item.error is not None:
            if isinstance(item.error, OSError | sqlite3.Error):
                raise self._failed(item, item.error) from item.error
            raise item.error

    async def _commit(self) -> None:
        """Commit every write waiting now, in one transaction on a worker thread."""
        self._committing = True
        batch, self._pending = self._pending, []
        err: BaseException | None = None
        try:
            await trio.to_thread.run_sync(self._write_batch, batch, limiter=self.limiter)
        except BaseException as e:  # handed to every write of this batch
            err = e
        finally:
            self.commits += 1
            for item in batch:
                item.error, item.done = err, True
            self._committing = False
            self._committed.set()
            self._committed = trio.Event()

    def _write_batch(self, batch: list[_Pending]) -> None:
        write_batch = getattr(self.store, "write_batch", None)
        if len(batch) > 1 and write_batch is not None:
            write_batch([(p.namespace, p.key, p.value) for p in batch])
        else:
            for p in batch:
                self.store.write(p.namespace, p.key, p.value)
