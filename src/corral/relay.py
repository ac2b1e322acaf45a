"""The outbox relay: moves committed outbox rows to the queue, then deletes them.

Runs inside ``corral worker`` when ``QUEUE_OUTBOX_URL`` is set, and alone as ``corral relay``.
Each round takes a batch of rows, enqueues their jobs in one atomic ``enqueue`` (ids kept), and
deletes the rows only after the queue acknowledged. A relay that dies between the push and the
delete leaves the rows, and the next round pushes them again: the job ids make that a no-op.

- PostgreSQL: rows are taken with ``SELECT ... FOR UPDATE SKIP LOCKED`` in a transaction held
  over the push, so several relays never take the same row; a relay that dies releases its rows
  with its connection. It sleeps on ``LISTEN`` (the outbox's trigger NOTIFYs at commit), with a
  check every ``SAFETY_CHECK_S`` in case a notification was missed while reconnecting.
- SQLite: rows are leased (a token and an expiry, ``lease_s``) in a short write transaction, so
  the application's writers are not held while the queue is called; a lease that expires (its
  relay died) is taken by another relay. It wakes on ``PRAGMA data_version`` (another
  connection committed), checked every ``poll_interval_s``.

A row that cannot become a job (written by hand with a bad name, id or JSON) is marked with
``last_error`` and skipped; ``corral outbox status`` lists such rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.backends.base import QueueBackend
from corral.errors import BackendAuthError, ConfigError, CorralError, PayloadError
from corral.jobs import check_attempts, check_job_id, check_name
from corral.message import NewJob
from corral.outbox import OUTBOX_COLUMNS, channel_name, parse_outbox_url, require_psycopg
from corral.payload import decode_json
from corral.retry import Retry
from corral.settings import QueueSettings, check_queue_name

logger = logging.getLogger("corral.relay")

BATCH = 500
SAFETY_CHECK_S = 5.0
_SELECT = f"id, {OUTBOX_COLUMNS}"


@dataclass(slots=True)
class OutboxRow:
    """One outbox row as the relay reads it."""

    row_id: int
    queue: str
    job_id: str
    name: str
    data: str
    delay_ms: int
    priority: int
    attempts: int
    backoff: str | None
    created_at_ms: int


Push = Callable[[list[OutboxRow]], Awaitable[dict[int, str]]]
"""Enqueue the rows' jobs; return the rows that cannot become jobs (row id -> why)."""


class Relay:
    """Moves the outbox of ``settings.outbox_url`` to the queues of ``settings``' storage."""

    def __init__(
        self, settings: QueueSettings, backend: QueueBackend, *, batch: int = BATCH
    ) -> None:
        if settings.outbox_url is None:
            raise ConfigError(
                "the relay needs QUEUE_OUTBOX_URL (sqlite:///app.db or postgresql://...)"
            )
        self.settings = settings
        self.backend = backend
        self.batch = batch
        self.where = settings.outbox_url_redacted
        location = parse_outbox_url(settings.outbox_url)
        table = settings.outbox_table
        self.store: _Store = (
            _PostgresStore(location.target, table)
            if location.dialect == "postgresql"
            else _SQLiteStore(location.target, table, settings.poll_interval_s, settings.lease_s)
        )
        self.moved = 0
        """Rows this relay pushed and deleted."""

    def __repr__(self) -> str:
        return f"<Relay outbox={self.where} table={self.settings.outbox_table}>"

    async def drain(self) -> int:
        """Move every row ready now; return how many."""
        total = 0
        while True:
            moved = await self.store.relay_batch(self.batch, self._push)
            total += moved
            if moved == 0:
                return total

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; errors of the outbox or the queue are logged and
        retried with a growing pause."""
        logger.info(
            "relay started: outbox %s table %s -> %s",
            self.where,
            self.settings.outbox_table,
            _describe(self.settings),
        )
        pause = 0.1
        try:
            while not stop.is_set():
                try:
                    moved = await self.store.relay_batch(self.batch, self._push)
                    pause = 0.1
                    if moved:
                        continue
                    await _until(stop, self.store.wait_for_rows(SAFETY_CHECK_S))
                except (CorralError, OSError, sqlite3.Error, _pg_errors()) as exc:
                    if isinstance(exc, ConfigError | BackendAuthError):
                        raise
                    logger.error("relay: %s; retrying in %.1fs", _safe(exc, self), pause)
                    await self.store.reset()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
                    pause = min(pause * 2, 30.0)
        finally:
            await self.store.close()
            logger.info("relay stopped: moved %d job(s) from the outbox", self.moved)

    async def _push(self, rows: list[OutboxRow]) -> dict[int, str]:
        now = time.time_ns() // 1_000_000
        jobs: list[NewJob] = []
        bad: dict[int, str] = {}
        for row in rows:
            try:
                jobs.append(_job(row, now))
            except (PayloadError, ConfigError, ValueError) as exc:
                bad[row.row_id] = str(exc)
        if jobs:
            await self.backend.enqueue(jobs)  # atomic; ids already in the queue are left alone
        self.moved += len(jobs)
        for row_id, why in bad.items():
            logger.error("relay: outbox row %d cannot become a job and is skipped: %s", row_id, why)
        return bad

    async def close(self) -> None:
        await self.store.close()


def _job(row: OutboxRow, now: int) -> NewJob:
    """The row's job, checked as an enqueue checks it (rows may be written by hand)."""
    check_queue_name(row.queue)
    check_name(row.name, error=PayloadError)
    check_job_id(row.job_id)
    check_attempts(row.attempts, error=PayloadError)
    decode_json(row.data)
    backoff = Retry.from_bullmq(decode_json(row.backoff)) if row.backoff else None
    # The delay counts from the enqueue, not from the relay's push.
    delay_ms = max(0, row.created_at_ms + row.delay_ms - now) if row.delay_ms > 0 else 0
    return NewJob(
        name=row.name,
        data_json=row.data,
        job_id=row.job_id,
        delay_ms=delay_ms,
        priority=int(row.priority),
        attempts=row.attempts,
        backoff=backoff,
        queue=row.queue,
    )


def _describe(settings: QueueSettings) -> str:
    where = settings.sqlite_path if settings.backend == "sqlite" else settings.redis_url_redacted
    return f"{settings.backend} at {where}"


def _safe(exc: BaseException, relay: Relay) -> str:
    """An error's text without the outbox URL's password (driver messages may echo it)."""
    text = str(exc)
    url = relay.settings.outbox_url
    if url and url in text:
        text = text.replace(url, relay.where or "")
    return text


def _pg_errors() -> type[Exception]:
    try:
        import psycopg
    except ImportError:
        return OSError
    error: type[Exception] = psycopg.Error
    return error


async def _until(stop: asyncio.Event, waiting: Awaitable[None]) -> None:
    """Await ``waiting`` unless ``stop`` is set first."""
    wait = asyncio.ensure_future(waiting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({wait, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wait, stopped):
            task.cancel()
        with contextlib.suppress(BaseException):
            await wait


def _while_locked(fn: Callable[[], object]) -> None:
    """Run ``fn``, again while another connection holds the SQLite file's lock: short pauses
    first (the application's transactions are short), growing to 20 ms, for up to a minute."""
    pause = 0.0002
    deadline = time.monotonic() + 60.0
    while True:
        try:
            fn()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 1.5, 0.02)


def _rows(found: Sequence[Sequence[Any]]) -> list[OutboxRow]:
    return [OutboxRow(*row) for row in found]


class _Store:
    async def relay_batch(self, limit: int, push: Push) -> int:
        raise NotImplementedError

    async def wait_for_rows(self, timeout_s: float) -> None:
        raise NotImplementedError

    async def reset(self) -> None:
        """Drop connections after an error (the next round reconnects)."""

    async def close(self) -> None:
        raise NotImplementedError


class _SQLiteStore(_Store):
    """An outbox in a SQLite file; its calls run in a thread (the application may hold the
    file's write lock for a while)."""

    def __init__(self, path: str, table: str, poll_interval_s: float, lease_s: float) -> None:
        self.path = path
        self.lease_ms = max(1, round(lease_s * 1000))
        self.table = table
        self.poll_interval_s = poll_interval_s
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # No C-level busy wait: its sleeps grow to 100 ms at once; _locked retries finer.
            conn.execute("PRAGMA busy_timeout = 0")
            # The relay's own writes (leases, deletes) need no sync to disk: one lost to a power
            # cut means a row pushed again, which its job id makes a no-op. (In WAL mode.)
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
        return self._conn

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, retried while the application holds the write lock."""
        _while_locked(lambda: conn.execute("BEGIN IMMEDIATE"))

    async def relay_batch(self, limit: int, push: Push) -> int:
        token = secrets.token_hex(8)
        rows = await asyncio.to_thread(self._claim, limit, token)
        if not rows:
            return 0
        bad = await push(rows)
        await asyncio.to_thread(self._settle, rows, token, bad)
        return len(rows)

    def _claim(self, limit: int, token: str) -> list[OutboxRow]:
        conn = self._connect()
        now = time.time_ns() // 1_000_000
        ready = f"last_error IS NULL AND (claimed_until_ms IS NULL OR claimed_until_ms < {now})"
        # A read first: an idle relay takes no write lock from the application.
        if not conn.execute(f"SELECT 1 FROM {self.table} WHERE {ready} LIMIT 1").fetchone():
            return []
        self._begin(conn)
        try:
            found = conn.execute(
                f"SELECT {_SELECT} FROM {self.table} WHERE {ready} ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            if found:
                marks = ",".join("?" * len(found))
                conn.execute(
                    f"UPDATE {self.table} SET claimed_until_ms = ?, claim_token = ? "
                    f"WHERE id IN ({marks})",
                    (now + self.lease_ms, token, *(row[0] for row in found)),
                )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return _rows(found)

    def _settle(self, rows: list[OutboxRow], token: str, bad: dict[int, str]) -> None:
        # The jobs are in the queue now: a delete refused by a passing lock (another
        # connection checkpointing or opening the file) is retried, not left to the lease,
        # after which another round would push the rows again.
        _while_locked(lambda: self._delete(rows, token, bad))

    def _delete(self, rows: list[OutboxRow], token: str, bad: dict[int, str]) -> None:
        conn = self._connect()
        done = [row.row_id for row in rows if row.row_id not in bad]
        self._begin(conn)
        try:
            if done:
                marks = ",".join("?" * len(done))
                conn.execute(
                    f"DELETE FROM {self.table} WHERE id IN ({marks}) AND claim_token = ?",
                    (*done, token),
                )
            for row_id, why in bad.items():
                conn.execute(
                    f"UPDATE {self.table} SET last_error = ? WHERE id = ?", (why[:2000], row_id)
                )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    async def wait_for_rows(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            version = await asyncio.to_thread(self._data_version)
            if self._version is not None and version != self._version:
                self._version = version
                return
            self._version = version
            await asyncio.sleep(self.poll_interval_s)

    def _data_version(self) -> int:
        return int(self._connect().execute("PRAGMA data_version").fetchone()[0])

    async def reset(self) -> None:
        await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


class _PostgresStore(_Store):
    """An outbox in PostgreSQL: row locks with SKIP LOCKED, wake-ups with LISTEN."""

    def __init__(self, url: str, table: str) -> None:
        self.url = url
        self.table = table
        self.channel = channel_name(table)
        self._work: Any = None
        self._listen: Any = None

    async def _connections(self) -> tuple[Any, Any]:
        psycopg = require_psycopg()
        if self._listen is None:
            self._listen = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            await self._listen.execute(f'LISTEN "{self.channel}"')
        if self._work is None:
            self._work = await psycopg.AsyncConnection.connect(self.url)
        return self._work, self._listen

    async def relay_batch(self, limit: int, push: Push) -> int:
        work, _ = await self._connections()
        async with work.transaction():
            cursor = await work.execute(
                f"SELECT {_SELECT} FROM {self.table} WHERE last_error IS NULL ORDER BY id "
                "LIMIT %s FOR UPDATE SKIP LOCKED",
                (limit,),
            )
            rows = _rows(await cursor.fetchall())
            if not rows:
                return 0
            bad = await push(rows)  # the rows stay locked: no other relay takes them
            done = [row.row_id for row in rows if row.row_id not in bad]
            await work.execute(f"DELETE FROM {self.table} WHERE id = ANY(%s)", (done,))
            for row_id, why in bad.items():
                await work.execute(
                    f"UPDATE {self.table} SET last_error = %s WHERE id = %s", (why[:2000], row_id)
                )
        return len(rows)

    async def wait_for_rows(self, timeout_s: float) -> None:
        _, listen = await self._connections()
        # Iterated to its end (stop_after=1 ends it): leaving the generator early would keep
        # the connection's lock until the generator is finalized.
        async for _ in listen.notifies(timeout=timeout_s, stop_after=1):
            pass

    async def reset(self) -> None:
        await self.close()

    async def close(self) -> None:
        for name in ("_work", "_listen"):
            conn = getattr(self, name)
            setattr(self, name, None)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()


def outbox_status(settings: QueueSettings) -> dict[str, Any]:
    """Rows waiting in the outbox, and those the relay skipped with their errors."""
    if settings.outbox_url is None:
        raise ConfigError("set QUEUE_OUTBOX_URL (or pass the outbox URL)")
    location = parse_outbox_url(settings.outbox_url)
    table = settings.outbox_table
    pending_sql = f"SELECT count(*) FROM {table} WHERE last_error IS NULL"
    failed_sql = (
        f"SELECT id, job_id, name, last_error FROM {table} WHERE last_error IS NOT NULL "
        "ORDER BY id LIMIT 100"
    )
    if location.dialect == "sqlite":
        with contextlib.closing(sqlite3.connect(location.target)) as conn:
            pending = conn.execute(pending_sql).fetchone()[0]
            failed = conn.execute(failed_sql).fetchall()
    else:
        psycopg = require_psycopg()
        with psycopg.connect(location.target) as conn:
            pending = conn.execute(pending_sql).fetchone()[0]
            failed = conn.execute(failed_sql).fetchall()
    return {
        "pending": int(pending),
        "skipped": [
            {"row": row[0], "job_id": row[1], "name": row[2], "error": row[3]} for row in failed
        ],
    }


def install_at(settings: QueueSettings) -> str:
    """Create the outbox table at ``settings.outbox_url``; return its dialect."""
    from corral.outbox import schema_sql

    if settings.outbox_url is None:
        raise ConfigError("set QUEUE_OUTBOX_URL (or pass the outbox URL)")
    location = parse_outbox_url(settings.outbox_url)
    statements = schema_sql(location.dialect, settings.outbox_table)
    if location.dialect == "sqlite":
        with contextlib.closing(sqlite3.connect(location.target)) as conn:
            for statement in statements:
                conn.execute(statement)
            conn.commit()
    else:
        psycopg = require_psycopg()
        with psycopg.connect(location.target) as conn:
            for statement in statements:
                conn.execute(statement)
    return location.dialect


__all__ = ["Relay", "install_at", "outbox_status"]
