"""One SQLite file: its connection, transactions retried on the write lock, change wake-ups.

- WAL mode, so readers never block the single writer; every write is one short transaction.
  A write that finds the database locked by another process is retried without blocking the
  event loop (a short C-level busy timeout, then an asyncio back-off), so "database is locked"
  never reaches a caller unless the lock is held for longer than ``LOCK_GIVE_UP_S``.
- ``PRAGMA data_version`` tells an idle worker that another process committed; one poll per
  file and process serves every queue waiting on it. In the same process, a commit wakes the
  waiters of its queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from corral.backends.sqlite.schema import (
    SCHEMA_VERSION,
    check_not_newer,
    schema_version,
    upgrade,
)
from corral.errors import BackendConnectionError, BackendError

T = TypeVar("T")

BUSY_TIMEOUT_MS = 20
LOCK_GIVE_UP_S = 60.0


class Waiter(Protocol):
    """Something to wake when a queue of this process gets work (a worker's source)."""

    def wake(self) -> None: ...


# In-process wake-ups: every waiting worker on the same file and queue, whatever its loop.
_waiters: dict[tuple[str, str], weakref.WeakSet[Any]] = {}
_waiters_lock = threading.Lock()


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return (
        "database is locked" in text
        or "database table is locked" in text
        or ("locked" in text and "busy" in text)
    )


class Database:
    """The connection to one SQLite file, shared by every queue a process uses on it."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "normal",
        poll_interval_s: float,
        memory_name: str = "",
    ) -> None:
        self.path = path
        # ":memory:" is private to the settings that name it (and their copies), not shared by
        # every service of the process: tests must not see each other's jobs.
        self.memory_uri = f"file:corral-{os.getpid()}-{memory_name}?mode=memory&cache=shared"
        self.key = self.memory_uri if path == ":memory:" else os.path.realpath(path)
        self.synchronous = synchronous
        self.poll_interval_s = poll_interval_s
        self._conn: sqlite3.Connection | None = None
        self._watch: _Watch | None = None

    def __repr__(self) -> str:
        return f"<Database {self.path!r}>"

    # -- connection ------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        path = self.path
        try:
            if path == ":memory:":
                # A named shared in-memory database, so the sync helper's connection sees it too.
                conn = sqlite3.connect(
                    self.memory_uri,
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if path != ":memory:":
                mode = _retry_sync(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
                if mode is None or str(mode[0]).lower() != "wal":
                    raise BackendError(
                        f"SQLite database {path!r} could not be switched to WAL mode "
                        f"(got {mode!r}); it may be on a filesystem without shared memory"
                    )
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            version = schema_version(conn)
            check_not_newer(version, path)
            if version < SCHEMA_VERSION:
                _retry_sync(lambda: upgrade(conn))
        except sqlite3.DatabaseError as exc:
            raise _open_error(path, exc) from exc
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- statements ------------------------------------------------------------------------

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction, retrying while another process
        holds the write lock. Either all of ``fn``'s writes commit or none do."""
        conn = self.conn
        pause = 0.001
        deadline = time.monotonic() + LOCK_GIVE_UP_S
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise wrap_error(self.path, exc) from exc
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"SQLite database {self.path!r} stayed locked for "
                        f"{LOCK_GIVE_UP_S:.0f}s by another process"
                    ) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            except sqlite3.DatabaseError as exc:
                raise wrap_error(self.path, exc) from exc
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.05)
                    continue
                if isinstance(exc, sqlite3.DatabaseError):
                    raise wrap_error(self.path, exc) from exc
                raise

    async def statement(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Run one statement in its own implicit transaction (cheaper than BEGIN/COMMIT),
        retrying while another process holds the write lock."""
        conn = self.conn
        pause = 0.001
        deadline = time.monotonic() + LOCK_GIVE_UP_S
        while True:
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise wrap_error(self.path, exc) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
            except sqlite3.DatabaseError as exc:
                raise wrap_error(self.path, exc) from exc

    def read(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        try:
            return self.conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise wrap_error(self.path, exc) from exc

    # -- wake-ups --------------------------------------------------------------------------

    def register(self, queue: str, waiter: Waiter) -> None:
        with _waiters_lock:
            _waiters.setdefault((self.key, queue), weakref.WeakSet()).add(waiter)

    def unregister(self, queue: str, waiter: Waiter) -> None:
        with _waiters_lock:
            _waiters.get((self.key, queue), weakref.WeakSet()).discard(waiter)

    def notify(self, queue: str) -> None:
        """Wake this process's workers of ``queue`` on this file (a job was written)."""
        with _waiters_lock:
            waiters = list(_waiters.get((self.key, queue), ()))
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):
                waiter.wake()

    async def changed(self, timeout_s: float) -> None:
        """Return once another connection committed to the file, or after ``timeout_s``.

        One task per file and event loop polls ``PRAGMA data_version`` every
        ``poll_interval_s`` while anyone waits, however many queues wait on it.
        """
        loop = asyncio.get_running_loop()
        watch = self._watch
        if watch is None or watch.loop is not loop or watch.task.done():
            watch = self._watch = _Watch(self, loop)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.wait(), timeout_s)

    def data_version(self) -> int:
        return int(self.read("PRAGMA data_version")[0][0])


class _Watch:
    """The poll behind :meth:`Database.changed`: runs while someone waits, then stops."""

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop) -> None:
        self.db = db
        self.loop = loop
        self.waiting = 0
        self.event = asyncio.Event()
        self.version = db.data_version()
        self.task = loop.create_task(self._poll(), name="corral-sqlite-watch")

    async def wait(self) -> None:
        event = self.event
        self.waiting += 1
        try:
            await event.wait()
        finally:
            self.waiting -= 1

    async def _poll(self) -> None:
        idle_polls = 0
        while idle_polls < 50:  # no waiter for a while: stop; the next wait starts another
            await asyncio.sleep(self.db.poll_interval_s)
            if not self.waiting:
                idle_polls += 1
                continue
            idle_polls = 0
            try:
                version = self.db.data_version()
            except BackendError:
                continue  # the waiters' own calls report it
            if version != self.version:
                self.version = version
                event, self.event = self.event, asyncio.Event()
                event.set()


def _retry_sync(fn: Callable[[], T]) -> T:
    deadline = time.monotonic() + LOCK_GIVE_UP_S
    pause = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def wrap_error(path: str, exc: sqlite3.DatabaseError) -> BackendError:
    """A driver error as corral's, saying what to do."""
    text = str(exc)
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return BackendError(
            f"SQLite database {path!r} is corrupt or not a SQLite file ({text}); "
            "restore it from a backup or point QUEUE_SQLITE_PATH at a new file"
        )
    if "readonly" in text or "unable to open" in text or "disk I/O" in text:
        return BackendConnectionError(
            f"cannot write the SQLite database {path!r} ({text}); check that its directory "
            "exists and is writable by this process"
        )
    return BackendError(f"SQLite error on {path!r}: {text}")


def _open_error(path: str, exc: sqlite3.DatabaseError) -> BackendError:
    text = str(exc)
    if "unable to open" in text:
        return BackendConnectionError(
            f"cannot open the SQLite database {path!r} ({text}); check that its directory "
            "exists and is writable (QUEUE_SQLITE_PATH)"
        )
    return wrap_error(path, exc)
