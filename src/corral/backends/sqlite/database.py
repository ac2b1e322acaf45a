"""One SQLite file: its connection, transactions retried on the write lock, change wake-ups.

- WAL mode, so readers never block the single writer; every write is one short transaction.
  Nothing waits on the event loop: a write that finds the database locked by another process
  is retried with an asyncio back-off (the connection has no C-level busy wait), so "database
  is locked" never reaches a caller unless the lock is held for longer than ``LOCK_GIVE_UP_S``;
  WAL checkpoints (which write the database file and sync it) run in a thread of their own;
  with ``synchronous = FULL`` every commit waits for the disk, so writes run in a thread.
- ``PRAGMA data_version`` tells an idle worker that another process committed; one poll per
  file and process serves every queue waiting on it. In the same process, a commit wakes the
  waiters of its queue at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
    TRIM_EVENTS,
    check_not_newer,
    schema_version,
    upgrade,
)
from corral.errors import BackendConnectionError, BackendError

T = TypeVar("T")

LOCK_GIVE_UP_S = 60.0
CHECKPOINT_WAL_BYTES = 4 << 20
"""A WAL past this size is checkpointed (SQLite's own default is 1,000 pages)."""
_CHECK_WAL_EVERY = 64  # commits between two looks at the WAL's size


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
        events_max_len: int = 10_000,
    ) -> None:
        self.path = path
        self.events_max_len = events_max_len
        # ":memory:" is private to the settings that name it (and their copies), not shared by
        # every service of the process: tests must not see each other's jobs.
        self.memory_uri = f"file:corral-{os.getpid()}-{memory_name}?mode=memory&cache=shared"
        self.key = self.memory_uri if path == ":memory:" else os.path.realpath(path)
        self.synchronous = synchronous
        self.poll_interval_s = poll_interval_s
        self._conn: sqlite3.Connection | None = None
        self._watch: _Watch | None = None
        self._commits = 0
        self._checkpoint: threading.Thread | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer_conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<Database {self.path!r}>"

    # -- connection ------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self, *, busy_timeout_ms: int = 0) -> sqlite3.Connection:
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
            conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # see _after_commit
            conn.execute(f"PRAGMA journal_size_limit = {CHECKPOINT_WAL_BYTES // 4}")
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
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is not None:
            checkpoint.join(5.0)  # it holds a connection of its own: close nothing under it
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.submit(self._close_writer_conn)
            writer.shutdown(wait=True)

    def _close_writer_conn(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _after_commit(self, conn: sqlite3.Connection) -> None:
        """Every so many commits, trim the events table and checkpoint the WAL in a thread
        once it grows: automatic checkpoints would run in whichever commit crosses the
        threshold, on the event loop."""
        self._commits += 1
        if not self._commits % _CHECK_WAL_EVERY:
            self._every_so_often(conn)

    def _every_so_often(self, conn: sqlite3.Connection) -> None:
        # Trimmed here rather than by a trigger: a trigger on ``events`` would slow down every
        # write that adds an event. Locked by another process: the next round trims.
        with contextlib.suppress(sqlite3.Error):
            conn.execute(TRIM_EVENTS, (self.events_max_len,))
        self._check_wal()

    def _check_wal(self) -> None:
        if self.path == ":memory:":
            return
        if self._checkpoint is not None and self._checkpoint.is_alive():
            return
        try:
            size = os.stat(self.path + "-wal").st_size
        except OSError:
            return
        if size >= CHECKPOINT_WAL_BYTES:
            self._checkpoint = threading.Thread(
                target=_checkpoint, args=(self.path,), name="corral-checkpoint", daemon=True
            )
            self._checkpoint.start()

    # -- statements ------------------------------------------------------------------------

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction, retrying while another process
        holds the write lock. Either all of ``fn``'s writes commit or none do."""
        if self.synchronous == "full":
            return await self._write_in_thread(fn)
        conn = self.conn
        pause = _FIRST_PAUSE_S
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
                pause = _next_pause(pause)
                continue
            except sqlite3.DatabaseError as exc:
                raise wrap_error(self.path, exc) from exc
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
                    await asyncio.sleep(pause)
                    pause = _next_pause(pause)
                    continue
                if isinstance(exc, sqlite3.DatabaseError):
                    raise wrap_error(self.path, exc) from exc
                raise
            self._after_commit(conn)
            return result

    async def _write_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``write`` for ``synchronous = FULL``: the transaction (and the wait for the lock, and
        the commit's sync to disk) runs on a thread of its own, with a connection of its own."""
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, "corral-sqlite-writer")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._transaction, fn)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer_conn is None:
            self._writer_conn = self._open(busy_timeout_ms=round(LOCK_GIVE_UP_S * 1000))
        conn = self._writer_conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if _is_locked(exc):
                raise BackendError(
                    f"SQLite database {self.path!r} stayed locked for "
                    f"{LOCK_GIVE_UP_S:.0f}s by another process"
                ) from exc
            raise wrap_error(self.path, exc) from exc
        except sqlite3.DatabaseError as exc:
            raise wrap_error(self.path, exc) from exc
        self._after_commit(conn)
        return result

    async def statement(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Run one statement in its own implicit transaction (cheaper than BEGIN/COMMIT),
        retrying while another process holds the write lock."""
        if self.synchronous == "full":
            return await self._write_in_thread(lambda conn: conn.execute(sql, params).fetchall())
        conn = self.conn
        pause = _FIRST_PAUSE_S
        deadline = time.monotonic() + LOCK_GIVE_UP_S
        while True:
            try:
                rows = conn.execute(sql, params).fetchall()
                self._commits += 1  # _after_commit, inlined on this hot path
                if not self._commits % _CHECK_WAL_EVERY:
                    self._every_so_often(conn)
                return rows
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise wrap_error(self.path, exc) from exc
                await asyncio.sleep(pause)
                pause = _next_pause(pause)
            except sqlite3.DatabaseError as exc:
                raise wrap_error(self.path, exc) from exc

    def read(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """A read: in WAL mode it never waits for writers (a rare busy reply while another
        connection recovers the WAL is retried briefly)."""
        values = tuple(params)
        for attempt in range(_READ_TRIES):
            try:
                return self.conn.execute(sql, values).fetchall()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or attempt == _READ_TRIES - 1:
                    raise wrap_error(self.path, exc) from exc
                time.sleep(0.001)
            except sqlite3.DatabaseError as exc:
                raise wrap_error(self.path, exc) from exc
        raise AssertionError("unreachable")

    # -- wake-ups --------------------------------------------------------------------------

    def register(self, queue: str, waiter: Waiter) -> None:
        with _waiters_lock:
            _waiters.setdefault((self.key, queue), weakref.WeakSet()).add(waiter)

    def unregister(self, queue: str, waiter: Waiter) -> None:
        with _waiters_lock:
            _waiters.get((self.key, queue), weakref.WeakSet()).discard(waiter)

    def notify(self, queue: str) -> None:
        """Wake this process's workers of ``queue`` on this file (a job was written)."""
        if not _waiters.get((self.key, queue)):
            return  # no worker of it in this process (a dict read is atomic: no lock needed)
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

    @property
    def commits(self) -> int:
        """How many writes this connection committed (``data_version`` counts only others')."""
        return self._commits


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


_READ_TRIES = 20
_FIRST_PAUSE_S = 0.0005


def _next_pause(pause: float) -> float:
    """Waits for the write lock: short while it is likely to free soon (another process's
    commit, a checkpoint), growing to 50 ms for a long hold."""
    return min(pause * 1.5, 0.05)


def _checkpoint(path: str) -> None:
    """Copy the WAL's pages into the database file, on a connection of its own.

    First PASSIVE, which holds up nobody and copies the bulk. Under a steady load the frames
    written meanwhile are left over, and the WAL only starts over once all of it is copied, so
    then RESTART copies the rest holding writers off for that short moment (they retry without
    blocking their loops); the next commit starts the WAL over and truncates it
    (``journal_size_limit``)."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 2000")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:  # the next commit past the threshold tries again
        pass


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
