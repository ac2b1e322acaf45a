"""The SQLite backend: one database file shared by producers and worker processes.

The file holds any number of queues (a ``queue`` column); :meth:`SQLiteBackend.for_queue` gives
another queue on the same connection. How delivery keeps its promises is in
:mod:`corral.backends.sqlite.source`; the connection, locking and wake-ups in
:mod:`corral.backends.sqlite.database`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from corral.backends.base import PullBackend, name_matches
from corral.backends.sqlite import cancel, flows, schedules, transfer
from corral.backends.sqlite import workers as worker_rows
from corral.backends.sqlite.database import Database
from corral.backends.sqlite.dedup import insert_deduplicated
from corral.backends.sqlite.metrics import READ_SQL as METRICS_SQL
from corral.backends.sqlite.schema import INSERT, JOB_COLUMNS
from corral.backends.sqlite.source import SQLiteSource, now_ms, to_datetime
from corral.backends.sqlite.watch import SQLiteEvents, SQLiteWatch
from corral.errors import JobActiveError, ScheduleConflictError
from corral.message import (
    Child,
    FlowEntry,
    FlowWrite,
    ImportOutcome,
    JobInfo,
    JobRecord,
    JobRef,
    JobSearch,
    JobState,
    NewJob,
)
from corral.metrics import Throughput, minute_of, series_from_rows, window_end
from corral.payload import decode_lenient
from corral.retry import Retry
from corral.schedules import NewSchedule, ScheduleInfo
from corral.settings import QueueSettings
from corral.workers import WorkerInfo

# One query per state, each answered from that state's partial index.
_COUNTS_SQL = " UNION ALL ".join(
    f"SELECT '{state}', count(*) FROM jobs WHERE queue = ? AND state = '{state}'"
    for state in ("waiting", "waiting-children", "delayed", "active", "completed", "failed")
)

_LIST_ORDER = {
    JobState.WAITING: "priority, run_at, seq",
    JobState.WAITING_CHILDREN: "enqueued_at, seq",
    JobState.DELAYED: "run_at, seq",
    JobState.ACTIVE: "started_at, seq",
    JobState.COMPLETED: "finished_at DESC, seq DESC",
    JobState.FAILED: "finished_at DESC, seq DESC",
}

_CLEAN_BATCH = 5000
_INSERT_ONE = INSERT + " ON CONFLICT DO NOTHING RETURNING seq"
"""One job; a job id that exists already keeps its job (and gives no ``seq``)."""
"""Jobs deleted per write transaction by ``clean``: each holds the write lock only briefly."""


def _distinct_queues(state: str) -> str:
    return (
        f"SELECT queue FROM (WITH RECURSIVE step(queue) AS ("
        f"SELECT (SELECT min(queue) FROM jobs WHERE state = '{state}') UNION ALL "
        f"SELECT (SELECT min(queue) FROM jobs WHERE state = '{state}' AND queue > step.queue) "
        "FROM step WHERE step.queue IS NOT NULL) SELECT queue FROM step)"
    )


_QUEUES_SQL = " UNION ".join(
    [_distinct_queues(state) for state in JobState]  # each state has its partial index
    + ["SELECT name FROM queues"]
)


class SQLiteBackend(PullBackend):
    """Jobs in a SQLite file (``settings.sqlite_path``) that several processes share."""

    def __init__(self, settings: QueueSettings, *, db: Database | None = None) -> None:
        super().__init__(settings)
        self._owns_db = db is None
        self.db = db or Database(
            settings.sqlite_path,
            synchronous=settings.sqlite_synchronous,
            poll_interval_s=settings.poll_interval_s,
            memory_name=settings.identity,
            events_max_len=settings.events_max_len,
        )

    def __repr__(self) -> str:
        return f"<SQLiteBackend {self.db.path!r} queue={self.queue_name!r}>"

    def _sibling(self, settings: QueueSettings) -> SQLiteBackend:
        return SQLiteBackend(settings, db=self.db)

    # -- producing -------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[str]:
        now = now_ms()
        if len(jobs) == 1 and jobs[0].deduplication is None:  # the common case, kept short
            row = job_row(jobs[0], self.queue_name, now)
            found = await self.db.statement(_INSERT_ONE, row)
            self.db.notify(row[0])
            if row[1] is not None:
                return [row[1]]  # custom id: inserted now, or the existing job's
            return [str(found[0][0])]
        rows = [job_row(job, self.queue_name, now) for job in jobs]
        deduplicated = any(job.deduplication is not None for job in jobs)

        def insert(conn: sqlite3.Connection) -> list[str]:
            if not deduplicated and all(row[1] is None for row in rows):
                # No custom ids: one executemany; under the write lock AUTOINCREMENT hands out
                # consecutive numbers after the current high-water mark.
                start = conn.execute(
                    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0)"
                ).fetchone()[0]
                conn.executemany(INSERT, rows)
                return [str(start + i + 1) for i in range(len(rows))]
            ids: list[str] = []
            for job, row in zip(jobs, rows, strict=True):
                if job.deduplication is not None:
                    ids.append(insert_deduplicated(conn, row, job.deduplication, now))
                    continue
                found = conn.execute(_INSERT_ONE, row)
                inserted = found.fetchone()
                if inserted is not None:
                    ids.append(row[1] if row[1] is not None else str(inserted[0]))
                else:
                    ids.append(row[1])  # the existing job keeps its id and is not changed
            return ids

        ids = await self.db.write(insert)
        for queue in {row[0] for row in rows}:
            self.db.notify(queue)
        return ids

    async def enqueue_flow(self, entries: Sequence[FlowEntry]) -> FlowWrite:
        now = now_ms()
        written, woken = await self.db.write(
            lambda conn: flows.insert_flow(conn, entries, now, self._row)
        )
        for queue in woken:
            self.db.notify(queue)
        return written

    def _row(self, job: NewJob, now: int) -> tuple[Any, ...]:
        return job_row(job, self.queue_name, now)

    # -- consuming -------------------------------------------------------------------------

    def open_source(self, *, stop: asyncio.Event, burst: bool) -> SQLiteSource:
        return SQLiteSource(self.db, self.queue_name, self.settings, stop)

    # -- managing --------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        where, params = self._id_clause(job_id)
        rows = self.db.read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where}", params)
        return self._infos(rows)[0] if rows else None

    async def open_events(self) -> SQLiteEvents:
        return SQLiteEvents(self.db, self.queue_name)

    async def watch_job(self, job_id: str) -> SQLiteWatch:
        return SQLiteWatch(self.db)

    async def children(self, job_id: str) -> list[Child]:
        where, params = self._id_clause(job_id)
        found = self.db.read(f"SELECT seq FROM jobs WHERE {where}", params)
        if not found:
            return []
        return flows.read_children(self.db.read(flows.CHILDREN_SQL, (found[0][0],)))

    def _infos(self, rows: Sequence[Sequence[Any]]) -> list[JobInfo]:
        parents = flows.parent_refs(self.db.read, (row[-1] for row in rows if row[-1] is not None))
        return [_info(row, parents.get(row[-1])) for row in rows]

    async def list_jobs(
        self, state: JobState, *, limit: int = 50, offset: int = 0
    ) -> list[JobInfo]:
        # The state is written into the SQL (it is one of five fixed words) so that SQLite can
        # pick that state's partial index; a bound parameter would hide it from the planner.
        rows = self.db.read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE queue = ? AND state = '{state.value}' "
            f"ORDER BY {_LIST_ORDER[state]} LIMIT ? OFFSET ?",
            (self.queue_name, max(0, int(limit)), max(0, int(offset))),
        )
        return self._infos(rows)

    async def counts(self) -> dict[JobState, int]:
        result = dict.fromkeys(JobState, 0)
        for state, count in self.db.read(_COUNTS_SQL, (self.queue_name,) * 6):
            with contextlib.suppress(ValueError):
                result[JobState(state)] = count
        return result

    async def throughput(self, *, minutes: int = 60) -> Throughput:
        now = now_ms()
        rows = self.db.read(METRICS_SQL, (self.queue_name, minute_of(now) - minutes))
        completed = {minute: done for minute, done, _ in rows}
        failed = {minute: lost for minute, _, lost in rows}
        return Throughput(
            completed=series_from_rows(completed, minutes=minutes, now_ms=now),
            failed=series_from_rows(failed, minutes=minutes, now_ms=now),
            end=window_end(now),
        )

    async def workers(self, *, every_queue: bool = False) -> list[WorkerInfo]:
        rows = self.db.read(worker_rows.LIVE_SQL, (now_ms(),))
        return worker_rows.read(rows, None if every_queue else self.queue_name)

    async def retry_failed(self, *, limit: int | None = None) -> int:
        now = now_ms()

        def retry(conn: sqlite3.Connection) -> int:
            moved = conn.execute(
                "UPDATE jobs SET state = 'waiting', attempts_made = 0, stalls = 0, run_at = ?, "
                "finished_at = NULL, deferred_failure = NULL WHERE seq IN (SELECT seq FROM jobs "
                "WHERE queue = ? AND state = 'failed' ORDER BY finished_at, seq LIMIT ?) "
                "RETURNING seq, parent_seq",
                (now, self.queue_name, -1 if limit is None else max(0, limit)),
            ).fetchall()
            flows.reopen(conn, [(seq, parent) for seq, parent in moved if parent is not None])
            return len(moved)

        moved = await self.db.write(retry)
        if moved:
            self.db.notify(self.queue_name)
        return moved

    async def retry_job(self, job_id: str) -> bool:
        where, params = self._id_clause(job_id)
        now = now_ms()

        def retry(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'waiting', attempts_made = 0, stalls = 0, run_at = ?, "
                f"finished_at = NULL WHERE {where} AND state = 'failed'",
                (now, *params),
            )
            return cursor.rowcount == 1

        moved = await self.db.write(retry)
        if moved:
            self.db.notify(self.queue_name)
        return moved

    async def clean(self, state: JobState, *, older_than_ms: int = 0, keep: int = 0) -> int:
        cutoff = now_ms() - max(0, older_than_ms)
        where = f"queue = ? AND state = '{state.value}'"  # a literal: the partial index applies

        def delete_batch(conn: sqlite3.Connection) -> int:
            bound = ""
            params: tuple[Any, ...] = (self.queue_name, cutoff)
            if keep > 0:
                # The newest job past the ones kept: it and everything older may go.
                row = conn.execute(
                    f"SELECT finished_at, seq FROM jobs WHERE {where} "
                    "ORDER BY finished_at DESC, seq DESC LIMIT 1 OFFSET ?",
                    (self.queue_name, keep),
                ).fetchone()
                if row is None:
                    return 0
                bound = " AND (finished_at < ? OR (finished_at = ? AND seq <= ?))"
                params += (row[0], row[0], row[1])
            return conn.execute(
                f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE {where} "
                f"AND finished_at <= ?{bound} ORDER BY finished_at, seq LIMIT {_CLEAN_BATCH})",
                params,
            ).rowcount

        deleted = 0
        while True:
            done = await self.db.write(delete_batch)
            deleted += done
            if done < _CLEAN_BATCH:
                return deleted

    async def search_jobs(
        self, state: JobState, *, name: str, offset: int = 0, limit: int = 50, window: int = 10_000
    ) -> JobSearch:
        offset = max(0, int(offset))
        rows = self.db.read(
            f"SELECT seq, name FROM jobs WHERE queue = ? AND state = '{state.value}' "
            f"ORDER BY {_LIST_ORDER[state]} LIMIT ? OFFSET ?",
            (self.queue_name, max(0, int(window)), offset),
        )
        found: list[int] = []
        next_offset: int | None = offset + len(rows) if len(rows) == window else None
        for position, (seq, job_name) in enumerate(rows):
            if name_matches(name, job_name):
                found.append(seq)
                if len(found) >= limit:
                    next_offset = offset + position + 1
                    break
        if not found:
            return JobSearch([], next_offset)
        marks = ",".join("?" * len(found))
        by_seq = {
            row[0]: _info(row)
            for row in self.db.read(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE seq IN ({marks})", tuple(found)
            )
        }
        return JobSearch([by_seq[seq] for seq in found if seq in by_seq], next_offset)

    async def list_queues(self) -> list[str]:
        # A loose index scan of each state's partial index: one step per queue, not per job.
        rows = self.db.read(_QUEUES_SQL)
        return sorted({str(row[0]) for row in rows if row[0] is not None})

    async def remove(self, job_id: str) -> bool:
        where, params = self._id_clause(job_id)

        woken: set[str] = set()

        def delete(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                f"SELECT seq, state, parent_seq FROM jobs WHERE {where}", params
            ).fetchone()
            if row is None:
                return False
            seq, state, parent_seq = row
            if state == JobState.ACTIVE.value:
                raise JobActiveError(
                    f"job {job_id} is active (a worker holds it); remove it once it finishes"
                )
            owner = schedules.is_current(conn, self.queue_name, job_id)
            if owner is not None:
                raise ScheduleConflictError(
                    f"job {job_id} is the pending job of schedule {owner!r}; remove the "
                    f"schedule instead (unschedule {owner!r})"
                )
            if parent_seq is not None:
                woken.update(flows.unlink(conn, [(seq, parent_seq)], now_ms()))
            conn.execute("DELETE FROM jobs WHERE seq = ?", (seq,))
            return True

        removed = await self.db.write(delete)
        for queue in woken:
            self.db.notify(queue)
        return removed

    async def request_cancel(self, job_id: str, reason: str) -> bool:
        where, params = self._id_clause(job_id)
        return await cancel.request_cancel(self.db, where, params, reason)

    async def promote(self, job_id: str) -> bool:
        where, params = self._id_clause(job_id)
        now = now_ms()

        def promote(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                f"UPDATE jobs SET state = 'waiting', run_at = ? WHERE {where} "
                "AND state = 'delayed'",
                (now, *params),
            )
            return cursor.rowcount == 1

        promoted = await self.db.write(promote)
        if promoted:
            self.db.notify(self.queue_name)
        return promoted

    # -- schedules -------------------------------------------------------------------------

    async def upsert_schedule(self, schedule: NewSchedule) -> None:
        queue = self.queue_name
        await self.db.write(lambda conn: schedules.upsert(conn, queue, schedule, now_ms()))
        self.db.notify(queue)

    async def remove_schedule(self, schedule_id: str) -> bool:
        queue = self.queue_name
        return await self.db.write(lambda conn: schedules.remove(conn, queue, schedule_id))

    async def list_schedules(self, schedule_id: str | None = None) -> list[ScheduleInfo]:
        sql, params = schedules.read_query(self.queue_name, schedule_id)
        return [schedules.info(self.queue_name, row) for row in self.db.read(sql, params)]

    async def pause(self) -> None:
        await self._set_paused(True)

    async def resume(self) -> None:
        await self._set_paused(False)
        self.db.notify(self.queue_name)

    async def _set_paused(self, paused: bool) -> None:
        await self.db.write(
            lambda conn: conn.execute(
                "INSERT INTO queues (name, paused) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
                (self.queue_name, int(paused)),
            )
        )

    async def is_paused(self) -> bool:
        rows = self.db.read("SELECT paused FROM queues WHERE name = ?", (self.queue_name,))
        return bool(rows and rows[0][0])

    async def purge(self) -> int:
        woken: set[str] = set()

        def delete(conn: sqlite3.Connection) -> int:
            children = conn.execute(
                "SELECT seq, parent_seq FROM jobs WHERE queue = ? AND state != 'active' AND "
                "parent_seq IS NOT NULL",
                (self.queue_name,),
            ).fetchall()
            woken.update(flows.unlink(conn, children, now_ms()))
            return conn.execute(
                "DELETE FROM jobs WHERE queue = ? AND state != 'active' AND (scheduler IS NULL "
                f"OR custom_id NOT IN ({schedules.CURRENT_JOBS}))",
                (self.queue_name, self.queue_name),
            ).rowcount

        deleted = await self.db.write(delete)
        for queue in woken - {self.queue_name}:
            self.db.notify(queue)
        return deleted

    # -- moving ----------------------------------------------------------------------------

    async def export_jobs(self, state: JobState, *, limit: int, offset: int = 0) -> list[JobRecord]:
        return transfer.export_jobs(self.db, self.queue_name, state, limit, offset)

    async def import_jobs(
        self, records: Sequence[JobRecord], *, dry_run: bool = False
    ) -> list[ImportOutcome]:
        return await transfer.import_jobs(self.db, self.queue_name, records, dry_run=dry_run)

    async def remove_exported(self, records: Sequence[JobRecord]) -> list[bool]:
        return await transfer.remove_exported(self.db, self.queue_name, records)

    async def close(self) -> None:
        if self._owns_db:
            self.db.close()

    # -- helpers ---------------------------------------------------------------------------

    def _id_clause(self, job_id: str) -> tuple[str, tuple[Any, ...]]:
        # Only the canonical decimal form is a queue-assigned id: "007" or "٣" is a custom one.
        if job_id.isascii() and job_id.isdigit() and str(int(job_id)) == job_id:
            seq = int(job_id) if len(job_id) <= 18 else -1  # past SQLite's integers: no job
            return "seq = ? AND queue = ?", (seq, self.queue_name)
        return "custom_id = ? AND queue = ?", (job_id, self.queue_name)


def _info(row: Sequence[Any], parent: JobRef | None = None) -> JobInfo:
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
        traces,
        _parent_seq,
    ) = row
    tracebacks = decode_lenient(traces)
    return JobInfo(
        id=custom_id if custom_id is not None else str(seq),
        name=name,
        data=decode_lenient(data),
        queue=queue,
        state=JobState(state),
        attempts_made=attempts_made,
        max_attempts=max_attempts,
        priority=priority,
        enqueued_at=to_datetime(enqueued_at) or datetime.fromtimestamp(0, UTC),
        run_at=to_datetime(run_at),
        finished_at=to_datetime(finished_at),
        result=decode_lenient(result),
        error=error,
        traceback=trace or None,
        tracebacks=[str(t) for t in tracebacks] if isinstance(tracebacks, list) else [],
        progress=decode_lenient(progress) if progress is not None else 0,
        logs=[str(line) for line in (decode_lenient(logs) or [])],
        parent=parent,
    )


def job_row(job: NewJob, queue: str, now: int) -> tuple[Any, ...]:
    """The parameters of :data:`~corral.backends.sqlite.schema.INSERT` for ``job`` (into
    ``job.queue``, else ``queue``), enqueued at ``now``."""
    delayed = job.delay_ms > 0
    return (
        job.queue or queue,
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
        job.trace_context,
    )


@functools.lru_cache(maxsize=256)
def _backoff_json(backoff: Retry) -> str:
    return json.dumps(backoff.to_bullmq())
