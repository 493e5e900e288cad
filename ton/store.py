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
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from overlay.errors import ConfigError

__all__ = ["KVStore", "ListableKVStore", "MemoryKVStore", "SQLiteKVStore"]


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
