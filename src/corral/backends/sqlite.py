"""The SQLite backend: one database file shared by producers and worker processes.

How it keeps its promises:

- WAL mode, so readers never block the single writer; every write is one short transaction.
  A write that finds the database locked by another process is retried without blocking the
  event loop (a short C-level busy timeout, then an asyncio back-off), so "database is locked"
  never reaches a caller unless the lock is held for longer than ``LOCK_GIVE_UP_S``.
- A claim is one ``UPDATE ... RETURNING`` that moves up to N waiting jobs to *active* and gives
  them a lease: a random token and an expiry. Settling a job (complete, fail, retry, release) is
  fenced on that token and on the expiry: a worker whose lease ran out gets LeaseLostError and
  the row is not touched. Expired leases are taken back by any worker's housekeeping and the job
  is delivered again; after ``max_stalls`` such expiries it is failed.
- ``PRAGMA data_version`` tells an idle worker that another process committed, so a job
  enqueued elsewhere is picked up within one ``poll_interval_s``; in the same process, enqueue
  wakes waiting workers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from corral._consumer import Claim, PullSource, consume
from corral.backends.base import QueueBackend, dead_letter_id, dead_letter_note
from corral.errors import BackendConnectionError, BackendError, LeaseLostError
from corral.message import (
    JSON,
    Completed,
    Dispatch,
    Failed,
    JobInfo,
    JobState,
    NewJob,
    Outcome,
    QueueMessage,
    Released,
    RetryLater,
)
from corral.payload import decode_json, decode_lenient
from corral.retry import Retry
from corral.settings import QueueSettings

logger = logging.getLogger("corral.sqlite")

T = TypeVar("T")

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 20
LOCK_GIVE_UP_S = 60.0
MAINTAIN_EVERY_S = 1.0

_MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        """
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            custom_id TEXT,
            name TEXT NOT NULL,
            data TEXT NOT NULL,
            state TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            run_at INTEGER NOT NULL,
            enqueued_at INTEGER NOT NULL,
            attempts_made INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 1,
            backoff TEXT,
            lease_token TEXT,
            lease_expires_at INTEGER,
            started_at INTEGER,
            finished_at INTEGER,
            stalls INTEGER NOT NULL DEFAULT 0,
            result TEXT,
            error TEXT,
            traceback TEXT,
            progress TEXT,
            logs TEXT
        )
        """,
        "CREATE UNIQUE INDEX jobs_custom_id ON jobs (queue, custom_id) WHERE custom_id IS NOT NULL",
        "CREATE INDEX jobs_waiting ON jobs (queue, priority, run_at, seq) WHERE state = 'waiting'",
        "CREATE INDEX jobs_delayed ON jobs (queue, run_at) WHERE state = 'delayed'",
        "CREATE INDEX jobs_active ON jobs (queue, lease_expires_at) WHERE state = 'active'",
        "CREATE INDEX jobs_state ON jobs (queue, state, finished_at)",
        "CREATE TABLE queues (name TEXT PRIMARY KEY, paused INTEGER NOT NULL DEFAULT 0)",
    ),
    # Every enqueue and claim paid for an index over all states; finished jobs are the only
    # ones that need (state, finished_at), so the index now covers just them.
    2: (
        "DROP INDEX jobs_state",
        "CREATE INDEX jobs_completed ON jobs (queue, finished_at) WHERE state = 'completed'",
        "CREATE INDEX jobs_failed ON jobs (queue, finished_at) WHERE state = 'failed'",
    ),
}

_JOB_COLUMNS = (
    "seq, queue, custom_id, name, data, state, priority, run_at, enqueued_at, attempts_made, "
    "max_attempts, backoff, started_at, finished_at, result, error, traceback, progress, logs"
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dt(ms: int | None) -> datetime | None:
    if not isinstance(ms, int):  # NULL, or text a foreign writer put in the column
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, ValueError, OSError):  # out of datetime's range
        return None


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return (
        "database is locked" in text
        or "database table is locked" in text
        or ("locked" in text and "busy" in text)
    )


# In-process wake-ups: every waiting worker on the same file and queue, whatever its loop.
_waiters: dict[tuple[str, str], weakref.WeakSet[_Source]] = {}
_waiters_lock = threading.Lock()


class SQLiteBackend(QueueBackend):
    """Jobs in a SQLite file (``settings.sqlite_path``) that several processes share."""

    def __init__(self, settings: QueueSettings) -> None:
        super().__init__(settings)
        self._conn: sqlite3.Connection | None = None
        self._path = settings.sqlite_path
        self._key = (self._resolve_key(self._path), settings.name)

    def __repr__(self) -> str:
        return f"<SQLiteBackend {self._path!r} queue={self.queue_name!r}>"

    @staticmethod
    def _resolve_key(path: str) -> str:
        return path if path == ":memory:" else os.path.realpath(path)

    # -- connection ------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        path = self._path
        try:
            if path == ":memory:":
                # A named shared in-memory database, so the sync helper's connection sees it too.
                conn = sqlite3.connect(
                    f"file:corral-{os.getpid()}?mode=memory&cache=shared",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if path != ":memory:":
                mode = self._retry_sync(
                    lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()
                )
                if mode is None or str(mode[0]).lower() != "wal":
                    raise BackendError(
                        f"SQLite database {path!r} could not be switched to WAL mode "
                        f"(got {mode!r}); it may be on a filesystem without shared memory"
                    )
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            raise _open_error(path, exc) from exc
        return conn

    def _retry_sync(self, fn: Callable[[], T]) -> T:
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

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BackendError(
                f"SQLite database {self._path!r} has schema version {version}, newer than this "
                f"corral understands ({SCHEMA_VERSION}); upgrade corral"
            )
        if version == SCHEMA_VERSION:
            return

        def upgrade() -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have migrated while we waited for the lock.
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                for step in range(current + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[step]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {step}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        self._retry_sync(upgrade)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
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
                    raise _wrap(self._path, exc) from exc
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"SQLite database {self._path!r} stayed locked for {LOCK_GIVE_UP_S:.0f}s "
                        "by another process"
                    ) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            except sqlite3.DatabaseError as exc:
                raise _wrap(self._path, exc) from exc
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
                    raise _wrap(self._path, exc) from exc
                raise

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        try:
            return self.conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _wrap(self._path, exc) from exc

    # -- producing -------------------------------------------------------------------------

    async def _statement(self, sql: str, params: Sequence[Any]) -> list[Any]:
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
                    raise _wrap(self._path, exc) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
            except sqlite3.DatabaseError as exc:
                raise _wrap(self._path, exc) from exc

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[str]:
        now = _now_ms()
        rows = [self._row(job, now) for job in jobs]
        if len(rows) == 1:
            row = rows[0]
            found = await self._statement(_INSERT + " ON CONFLICT DO NOTHING RETURNING seq", row)
            _wake((self._key[0], row[0]))
            if row[1] is not None:
                return [row[1]]  # custom id: inserted now, or the existing job's
            return [str(found[0][0])]

        def insert(conn: sqlite3.Connection) -> list[str]:
            if all(row[1] is None for row in rows):
                # No custom ids: one executemany; under the write lock AUTOINCREMENT hands out
                # consecutive numbers after the current high-water mark.
                start = conn.execute(
                    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0)"
                ).fetchone()[0]
                conn.executemany(_INSERT, rows)
                return [str(start + i + 1) for i in range(len(rows))]
            ids: list[str] = []
            for row in rows:
                found = conn.execute(_INSERT + " ON CONFLICT DO NOTHING RETURNING seq", row)
                inserted = found.fetchone()
                if inserted is not None:
                    ids.append(row[1] if row[1] is not None else str(inserted[0]))
                else:
                    ids.append(row[1])  # the existing job keeps its id and is not changed
            return ids

        ids = await self._write(insert)
        targets = {job.queue or self.queue_name for job in jobs}
        for queue in targets:
            _wake((self._key[0], queue))
        return ids

    def _row(self, job: NewJob, now: int) -> tuple[Any, ...]:
        delayed = job.delay_ms > 0
        return (
            job.queue or self.queue_name,
            job.job_id,
            job.name,
            job.data_json,
            "delayed" if delayed else "waiting",
            job.priority,
            now + job.delay_ms,
            now,
            job.attempts,
            _backoff_json(job.backoff) if job.backoff else None,
            None,
        )

    # -- consuming -------------------------------------------------------------------------

    async def start_consuming(
        self, dispatch: Dispatch, *, concurrency: int, stop: asyncio.Event, burst: bool = False
    ) -> None:
        source = _Source(self, stop)
        with _waiters_lock:
            _waiters.setdefault(self._key, weakref.WeakSet()).add(source)
        try:
            await consume(
                source,
                dispatch,
                concurrency=concurrency,
                stop=stop,
                burst=burst,
                shutdown_grace_s=self.settings.shutdown_grace_s,
            )
        finally:
            await source.release_prefetched()
            with _waiters_lock:
                _waiters.get(self._key, weakref.WeakSet()).discard(source)

    # -- managing --------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        where, params = self._id_clause(job_id)
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {where}", params)
        return self._info(rows[0]) if rows else None

    async def list_jobs(
        self, state: JobState, *, limit: int = 50, offset: int = 0
    ) -> list[JobInfo]:
        order = {
            JobState.WAITING: "priority, run_at, seq",
            JobState.DELAYED: "run_at, seq",
            JobState.ACTIVE: "started_at, seq",
            JobState.COMPLETED: "finished_at DESC, seq DESC",
            JobState.FAILED: "finished_at DESC, seq DESC",
        }[state]
        # The state is written into the SQL (it is one of five fixed words) so that SQLite can
        # pick that state's partial index; a bound parameter would hide it from the planner.
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE queue = ? AND state = '{state.value}' "
            f"ORDER BY {order} LIMIT ? OFFSET ?",
            (self.queue_name, max(0, int(limit)), max(0, int(offset))),
        )
        return [self._info(row) for row in rows]

    async def counts(self) -> dict[JobState, int]:
        result = dict.fromkeys(JobState, 0)
        for state, count in self._read(_COUNTS_SQL, (self.queue_name,) * 5):
            with contextlib.suppress(ValueError):
                result[JobState(state)] = count
        return result

    async def retry_failed(self, *, limit: int | None = None) -> int:
        now = _now_ms()

        def retry(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'waiting', attempts_made = 0, stalls = 0, run_at = ?, "
                "finished_at = NULL WHERE seq IN (SELECT seq FROM jobs WHERE queue = ? AND "
                "state = 'failed' ORDER BY finished_at, seq LIMIT ?)",
                (now, self.queue_name, -1 if limit is None else max(0, limit)),
            )
            return cursor.rowcount

        moved = await self._write(retry)
        if moved:
            _wake(self._key)
        return moved

    async def remove(self, job_id: str) -> bool:
        where, params = self._id_clause(job_id)

        def delete(conn: sqlite3.Connection) -> bool:
            row = conn.execute(f"SELECT seq, state FROM jobs WHERE {where}", params).fetchone()
            if row is None:
                return False
            if row[1] == JobState.ACTIVE.value:
                raise BackendError(
                    f"job {job_id} is active (a worker holds it); remove it once it finishes"
                )
            conn.execute("DELETE FROM jobs WHERE seq = ?", (row[0],))
            return True

        return await self._write(delete)

    async def pause(self) -> None:
        await self._set_paused(True)

    async def resume(self) -> None:
        await self._set_paused(False)
        _wake(self._key)

    async def _set_paused(self, paused: bool) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO queues (name, paused) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
                (self.queue_name, int(paused)),
            )
        )

    async def is_paused(self) -> bool:
        rows = self._read("SELECT paused FROM queues WHERE name = ?", (self.queue_name,))
        return bool(rows and rows[0][0])

    async def purge(self) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM jobs WHERE queue = ? AND state != 'active'", (self.queue_name,)
            ).rowcount

        return await self._write(delete)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- helpers ---------------------------------------------------------------------------

    def _id_clause(self, job_id: str) -> tuple[str, tuple[Any, ...]]:
        # Only the canonical decimal form is a queue-assigned id: "007" or "٣" is a custom one.
        if job_id.isascii() and job_id.isdigit() and str(int(job_id)) == job_id:
            seq = int(job_id) if len(job_id) <= 18 else -1  # past SQLite's integers: no job
            return "seq = ? AND queue = ?", (seq, self.queue_name)
        return "custom_id = ? AND queue = ?", (job_id, self.queue_name)

    def _info(self, row: Sequence[Any]) -> JobInfo:
        (
            seq,
            queue,
            custom_id,
            name,
            data,
            state,
            priority,
            run_at,
            enqueued_at,
            attempts_made,
            max_attempts,
            _backoff,
            _started_at,
            finished_at,
            result,
            error,
            trace,
            progress,
            logs,
        ) = row
        return JobInfo(
            id=custom_id if custom_id is not None else str(seq),
            name=name,
            data=decode_lenient(data),
            queue=queue,
            state=JobState(state),
            attempts_made=attempts_made,
            max_attempts=max_attempts,
            priority=priority,
            enqueued_at=_dt(enqueued_at) or datetime.fromtimestamp(0, UTC),
            run_at=_dt(run_at),
            finished_at=_dt(finished_at),
            result=decode_lenient(result),
            error=error,
            traceback=trace,
            progress=decode_lenient(progress),
            logs=[str(line) for line in (decode_lenient(logs) or [])],
        )


# One query per state, each answered from that state's partial index.
_COUNTS_SQL = " UNION ALL ".join(
    f"SELECT '{state}', count(*) FROM jobs WHERE queue = ? AND state = '{state}'"
    for state in ("waiting", "delayed", "active", "completed", "failed")
)

_READY_SQL = (
    "SELECT 1 WHERE EXISTS (SELECT 1 FROM jobs WHERE queue = ? AND state = 'waiting') "
    "OR EXISTS (SELECT 1 FROM jobs WHERE queue = ? AND state = 'delayed' AND run_at <= ?)"
)

_INSERT = (
    "INSERT INTO jobs (queue, custom_id, name, data, state, priority, run_at, enqueued_at, "
    "max_attempts, backoff, logs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class _Source(PullSource):
    """The worker side of one SQLiteBackend: claims, settles and housekeeping."""

    def __init__(self, backend: SQLiteBackend, stop: asyncio.Event | None = None) -> None:
        self.backend = backend
        self._stop = stop if stop is not None else asyncio.Event()
        self._prefetched: list[Claim] = []
        self.settings = backend.settings
        self.queue = backend.queue_name
        self.lease_s = self.settings.lease_s
        self.lease_ms = max(1, round(self.lease_s * 1000))
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._data_version = -1
        self._last_maintain = 0.0
        self._pending: list[tuple[Claim, Outcome, asyncio.Future[bool]]] = []
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    # Claiming ---------------------------------------------------------------------------

    async def claim(self, max_jobs: int) -> list[Claim]:
        if self._prefetched:
            claims = self._prefetched[:max_jobs]
            del self._prefetched[:max_jobs]
            return claims
        now = _now_ms()
        # A read needs no lock: only take the write lock when there is something to claim,
        # so idle workers woken by other queues' commits do not contend with producers.
        if not self.backend._read(_READY_SQL, (self.queue, self.queue, now)):
            return []
        token = secrets.token_hex(8)
        rows = await self.backend._write(lambda conn: self._take(conn, now, token, max_jobs))
        return self._claims(rows, token)

    def _take(self, conn: sqlite3.Connection, now: int, token: str, max_jobs: int) -> list[Any]:
        """Promote due delayed jobs and lease up to ``max_jobs`` waiting ones (in a transaction)."""
        queue = self.queue
        conn.execute(
            "UPDATE jobs SET state = 'waiting' WHERE queue = ? AND state = 'delayed' "
            "AND run_at <= ?",
            (queue, now),
        )
        paused = conn.execute("SELECT paused FROM queues WHERE name = ?", (queue,)).fetchone()
        if paused is not None and paused[0]:
            return []
        return conn.execute(
            "UPDATE jobs SET state = 'active', lease_token = ?, lease_expires_at = ?, "
            "started_at = ? WHERE seq IN (SELECT seq FROM jobs WHERE queue = ? AND "
            "state = 'waiting' ORDER BY priority, run_at, seq LIMIT ?) RETURNING "
            "seq, custom_id, name, data, attempts_made, max_attempts, priority, "
            "enqueued_at, backoff, run_at",
            (token, now + self.lease_ms, now, queue, max_jobs),
        ).fetchall()

    def _claims(self, rows: list[Any], token: str) -> list[Claim]:
        # A foreign row may hold text where numbers belong: it must not break the sort (and
        # with it the whole batch); _claim fails it as unreadable.
        rows.sort(key=lambda r: (_int_or_zero(r[6]), _int_or_zero(r[9]), r[0]))
        return [self._claim(row, token) for row in rows]

    async def release_prefetched(self) -> None:
        """Give back jobs fetched ahead that no slot took (at shutdown)."""
        while self._prefetched:
            claim = self._prefetched.pop()
            with contextlib.suppress(Exception):
                await self.settle(claim, Released())

    def _claim(self, row: Sequence[Any], token: str) -> Claim:
        (
            seq,
            custom_id,
            name,
            data,
            attempts_made,
            max_attempts,
            priority,
            enqueued_at,
            backoff,
            _run_at,
        ) = row
        job_id = custom_id if custom_id is not None else str(seq)
        try:
            payload = decode_json(data)
            if not isinstance(name, str) or not name:
                raise ValueError(f"job name is {name!r}")
            if not isinstance(max_attempts, int) or not isinstance(attempts_made, int):
                raise ValueError("attempt counters are not integers")
            retry = _parse_backoff(backoff) if backoff else None
            if not isinstance(priority, int) or not isinstance(enqueued_at, int):
                raise ValueError("priority or enqueued_at is not an integer")
        except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as exc:
            return Claim(job_id, token, None, unreadable=str(exc), extra=seq)
        message = QueueMessage(
            id=job_id,
            name=name,
            data=payload,
            queue=self.queue,
            attempt=attempts_made + 1,
            max_attempts=max(1, max_attempts),
            priority=priority,
            enqueued_at=_dt(enqueued_at) or datetime.fromtimestamp(0, UTC),
            backoff=retry,
        )
        message._progress = self._progress_writer(seq, token)
        message._log = self._log_writer(seq)
        return Claim(job_id, token, message, extra=seq)

    def _progress_writer(self, seq: int, token: str) -> Callable[[JSON], Any]:
        async def write(value: JSON) -> None:
            text = json.dumps(value, allow_nan=False)
            await self.backend._write(
                lambda conn: conn.execute(
                    "UPDATE jobs SET progress = ? WHERE seq = ? AND lease_token = ?",
                    (text, seq, token),
                )
            )

        return write

    def _log_writer(self, seq: int) -> Callable[[str], Any]:
        async def write(text: str) -> None:
            await self.backend._write(
                lambda conn: conn.execute(
                    "UPDATE jobs SET logs = json_insert(coalesce(logs, '[]'), '$[#]', ?) "
                    "WHERE seq = ?",
                    (text, seq),
                )
            )

        return write

    # Settling ---------------------------------------------------------------------------

    async def settle(self, claim: Claim, outcome: Outcome) -> None:
        # Group commit: settles that arrive in the same loop iteration share one transaction.
        future: asyncio.Future[bool] = self._loop.create_future()
        self._pending.append((claim, outcome, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._start_flush)
        if not await future:
            raise LeaseLostError(
                f"lease on job {claim.job_id} expired or was taken over before it could be "
                f"settled ({type(outcome).__name__}); the job was left untouched"
            )
        if isinstance(outcome, RetryLater | Released):
            self.wake()

    def _start_flush(self) -> None:
        task = self._loop.create_task(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flush_scheduled = False
        now = _now_ms()
        # Fetch-next: each finished job frees a slot, so the same transaction leases the job to
        # run next (one commit per job instead of two, as BullMQ's moveToFinished does).
        freed = sum(1 for _, outcome, _ in batch if not isinstance(outcome, Released))
        fetch = freed if freed and not self._stop.is_set() else 0
        token = secrets.token_hex(8)
        fetched: list[Any] = []

        def apply_all(conn: sqlite3.Connection) -> list[bool]:
            kept = [self._apply(conn, claim, outcome, now) for claim, outcome, _ in batch]
            if fetch:
                fetched.extend(self._take(conn, now, token, fetch))
            return kept

        try:
            kept = await self.backend._write(apply_all)
        except BaseException as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if fetched:
            self._prefetched.extend(self._claims(fetched, token))
        for (_, _, future), ok in zip(batch, kept, strict=True):
            if not future.done():
                future.set_result(ok)

    def _apply(self, conn: sqlite3.Connection, claim: Claim, outcome: Outcome, now: int) -> bool:
        """Apply one outcome under the claim's fence; ``False`` (and no change) if it is stale."""
        seq = claim.extra
        fence = "seq = ? AND lease_token = ? AND state = 'active' AND lease_expires_at >= ?"
        fence_args = (seq, claim.token, now)
        if isinstance(outcome, Completed):
            if self.settings.keep_completed == 0:
                cursor = conn.execute(f"DELETE FROM jobs WHERE {fence}", fence_args)
            else:
                cursor = conn.execute(
                    "UPDATE jobs SET state = 'completed', result = ?, finished_at = ?, "
                    "attempts_made = attempts_made + 1, lease_token = NULL, "
                    f"lease_expires_at = NULL WHERE {fence}",
                    (outcome.result_json, now, *fence_args),
                )
        elif isinstance(outcome, RetryLater):
            state = "delayed" if outcome.delay_ms > 0 else "waiting"
            cursor = conn.execute(
                "UPDATE jobs SET state = ?, run_at = ?, attempts_made = attempts_made + 1, "
                "error = ?, traceback = ?, lease_token = NULL, lease_expires_at = NULL "
                f"WHERE {fence}",
                (state, now + outcome.delay_ms, outcome.error, outcome.traceback, *fence_args),
            )
        elif isinstance(outcome, Failed):
            cursor = conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?, traceback = ?, finished_at = ?, "
                "attempts_made = attempts_made + 1, lease_token = NULL, "
                f"lease_expires_at = NULL WHERE {fence}",
                (outcome.error, outcome.traceback, now, *fence_args),
            )
            if cursor.rowcount == 1:
                self._dead_letter(conn, seq, outcome.error, now)
                self._trim_failed(conn)
        elif isinstance(outcome, Released):
            cursor = conn.execute(
                "UPDATE jobs SET state = 'waiting', lease_token = NULL, "
                f"lease_expires_at = NULL WHERE {fence}",
                fence_args,
            )
        else:  # pragma: no cover - exhaustive over Outcome
            raise TypeError(f"unknown outcome {outcome!r}")
        return cursor.rowcount == 1

    def _dead_letter(self, conn: sqlite3.Connection, seq: int, error: str, now: int) -> None:
        target = self.settings.dead_letter
        if target is None:
            return
        row = conn.execute(
            "SELECT custom_id, name, data, max_attempts, backoff, attempts_made FROM jobs "
            "WHERE seq = ?",
            (seq,),
        ).fetchone()
        custom_id, name, data, max_attempts, backoff, attempts_made = row
        origin = custom_id if custom_id is not None else str(seq)
        note = dead_letter_note(self.queue, origin, attempts_made, error)
        conn.execute(
            _INSERT + " ON CONFLICT DO NOTHING",
            (
                target,
                dead_letter_id(self.queue, origin),
                name,
                data,
                "waiting",
                0,
                now,
                now,
                max_attempts,
                backoff,
                json.dumps([note]),
            ),
        )
        _wake((self.backend._key[0], target))

    def _trim_failed(self, conn: sqlite3.Connection) -> None:
        keep = self.settings.keep_failed
        if keep is not None:
            _trim(conn, self.queue, "failed", keep)

    async def extend(self, claims: Sequence[Claim]) -> list[Claim]:
        now = _now_ms()
        until = now + self.lease_ms
        by_token: dict[str, list[Claim]] = {}
        for claim in (*claims, *self._prefetched):  # fetched ahead: leased, not yet running
            by_token.setdefault(claim.token, []).append(claim)

        def renew(conn: sqlite3.Connection) -> list[Claim]:
            lost: list[Claim] = []
            for token, group in by_token.items():
                seqs = [c.extra for c in group]
                marks = ",".join("?" * len(seqs))
                kept = {
                    r[0]
                    for r in conn.execute(
                        f"UPDATE jobs SET lease_expires_at = ? WHERE seq IN ({marks}) AND "
                        "lease_token = ? AND state = 'active' AND lease_expires_at >= ? "
                        "RETURNING seq",
                        (until, *seqs, token, now),
                    )
                }
                lost.extend(c for c in group if c.extra not in kept)
            return lost

        lost = await self.backend._write(renew)
        if lost and self._prefetched:
            gone = set(lost)
            self._prefetched = [c for c in self._prefetched if c not in gone]
        return lost

    async def maintain(self) -> None:
        if time.monotonic() - self._last_maintain < min(MAINTAIN_EVERY_S, self.lease_s / 3):
            return
        self._last_maintain = time.monotonic()
        now = _now_ms()
        settings = self.settings
        queue = self.queue
        trim_completed = settings.keep_completed is not None and (
            self.backend._read(
                "SELECT 1 FROM jobs WHERE queue = ? AND state = 'completed' LIMIT 1 OFFSET ?",
                (queue, settings.keep_completed),
            )
        )
        expired_any = self.backend._read(
            "SELECT 1 FROM jobs WHERE queue = ? AND state = 'active' AND lease_expires_at < ? "
            "LIMIT 1",
            (queue, now),
        )
        if not trim_completed and not expired_any:
            return

        def housekeeping(conn: sqlite3.Connection) -> tuple[int, int]:
            expired = conn.execute(
                "SELECT seq, stalls FROM jobs WHERE queue = ? AND state = 'active' AND "
                "lease_expires_at < ?",
                (queue, now),
            ).fetchall()
            requeued = failed = 0
            for seq, stalls in expired:
                if stalls + 1 > settings.max_stalls:
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', stalls = stalls + 1, finished_at = ?, "
                        "attempts_made = attempts_made + 1, error = ?, lease_token = NULL, "
                        "lease_expires_at = NULL WHERE seq = ?",
                        (
                            now,
                            f"job stalled more than allowable limit ({settings.max_stalls}): "
                            "its worker stopped renewing the lease (crashed or was killed)",
                            seq,
                        ),
                    )
                    self._dead_letter(conn, seq, "stalled", now)
                    failed += 1
                else:
                    conn.execute(
                        "UPDATE jobs SET state = 'waiting', stalls = stalls + 1, "
                        "lease_token = NULL, lease_expires_at = NULL WHERE seq = ?",
                        (seq,),
                    )
                    requeued += 1
            if settings.keep_completed is not None:
                _trim(conn, queue, "completed", settings.keep_completed)
            return requeued, failed

        requeued, failed = await self.backend._write(housekeeping)
        if requeued or failed:
            logger.warning(
                "queue %r: %d job(s) whose lease expired were requeued, %d failed as stalled",
                queue,
                requeued,
                failed,
            )
            self.wake()

    # Waiting ----------------------------------------------------------------------------

    async def wait_for_work(self, timeout_s: float) -> None:
        backend = self.backend
        next_due = backend._read(
            "SELECT min(run_at) FROM jobs WHERE queue = ? AND state = 'delayed'", (self.queue,)
        )[0][0]
        if next_due is not None:
            timeout_s = min(timeout_s, max(0.0, (next_due - _now_ms()) / 1000))
        deadline = time.monotonic() + timeout_s
        poll = self.settings.poll_interval_s
        if self._data_version < 0:
            self._data_version = self._read_data_version()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._wake.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(poll, remaining))
            version = self._read_data_version()
            if version != self._data_version:
                self._data_version = version
                break
        self._wake.clear()

    def _read_data_version(self) -> int:
        return int(self.backend._read("PRAGMA data_version")[0][0])

    def wake(self) -> None:
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)


def _wake(key: tuple[str, str]) -> None:
    with _waiters_lock:
        sources = list(_waiters.get(key, ()))
    for source in sources:
        with contextlib.suppress(RuntimeError):
            source.wake()


def _trim(conn: sqlite3.Connection, queue: str, state: str, keep: int) -> None:
    """Delete the oldest finished jobs in ``state`` beyond the newest ``keep``."""
    if state not in ("completed", "failed"):
        raise ValueError(f"only finished jobs are trimmed, not {state!r}")
    where = f"queue = ? AND state = '{state}'"  # literal, for the partial index (see list_jobs)
    cutoff = conn.execute(
        f"SELECT finished_at, seq FROM jobs WHERE {where} "
        "ORDER BY finished_at DESC, seq DESC LIMIT 1 OFFSET ?",
        (queue, keep),
    ).fetchone()
    if cutoff is not None:
        conn.execute(
            f"DELETE FROM jobs WHERE {where} AND (finished_at < ? OR "
            "(finished_at = ? AND seq <= ?))",
            (queue, cutoff[0], cutoff[0], cutoff[1]),
        )


@functools.lru_cache(maxsize=256)
def _parse_backoff(text: str) -> Retry | None:
    """The backoff column, parsed once per distinct value (raises ValueError if unreadable)."""
    return Retry.from_bullmq(decode_json(text))


@functools.lru_cache(maxsize=256)
def _backoff_json(backoff: Retry) -> str:
    return json.dumps(backoff.to_bullmq())


def _wrap(path: str, exc: sqlite3.DatabaseError) -> BackendError:
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
    return _wrap(path, exc)
