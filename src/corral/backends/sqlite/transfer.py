"""Moving jobs out of and into a SQLite queue: the backend's ``export_jobs``, ``import_jobs`` and
``remove_exported`` (see :class:`~corral.backends.base.QueueBackend` for the contract)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from corral.backends.sqlite.database import Database
from corral.backends.sqlite.source import now_ms
from corral.message import ImportOutcome, JobRecord, JobState
from corral.payload import decode_lenient, same_json
from corral.retry import Retry

MOVABLE = (JobState.WAITING, JobState.DELAYED, JobState.FAILED)

_EXPORT_ORDER = {
    JobState.WAITING: "priority, run_at, seq",
    JobState.DELAYED: "run_at, seq",
    JobState.FAILED: "finished_at, seq",
}

_EXPORT_COLUMNS = (
    "seq, custom_id, name, data, priority, max_attempts, attempts_made, backoff, enqueued_at, "
    "run_at, finished_at, error, traceback, tracebacks, progress, logs, parent_seq IS NOT NULL "
    "OR EXISTS (SELECT 1 FROM dependencies WHERE dependencies.parent_seq = jobs.seq)"
)

_IMPORT = (
    "INSERT INTO jobs (seq, queue, custom_id, name, data, state, priority, run_at, enqueued_at, "
    "attempts_made, max_attempts, backoff, finished_at, error, traceback, tracebacks, progress, "
    "logs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_MAX_SEQ_DIGITS = 18  # past this a number does not fit SQLite's integers


def check_movable(state: JobState) -> None:
    if state not in MOVABLE:
        raise ValueError(f"only waiting, delayed and failed jobs are moved, not {state.value}")


def queue_seq(job_id: str) -> int | None:
    """The row number a queue-assigned id names, ``None`` for a custom id (``"007"`` is one)."""
    if job_id.isascii() and job_id.isdigit() and str(int(job_id)) == job_id:
        return int(job_id) if len(job_id) <= _MAX_SEQ_DIGITS else -1
    return None


def export_jobs(
    db: Database, queue: str, state: JobState, limit: int, offset: int
) -> list[JobRecord]:
    check_movable(state)
    rows = db.read(
        f"SELECT {_EXPORT_COLUMNS} FROM jobs WHERE queue = ? AND state = '{state.value}' "
        f"ORDER BY {_EXPORT_ORDER[state]} LIMIT ? OFFSET ?",
        (queue, max(0, int(limit)), max(0, int(offset))),
    )
    return [_record(row, state) for row in rows]


def _record(row: Sequence[Any], state: JobState) -> JobRecord:
    (
        seq,
        custom_id,
        name,
        data,
        priority,
        max_attempts,
        attempts_made,
        backoff,
        enqueued_at,
        run_at,
        finished_at,
        error,
        trace,
        traces,
        progress,
        logs,
        in_flow,
    ) = row
    tracebacks = decode_lenient(traces)
    if not isinstance(tracebacks, list):
        tracebacks = [trace] if trace else []
    lines = decode_lenient(logs)
    try:
        retry = Retry.from_bullmq(decode_lenient(backoff)) if backoff else None
    except (ValueError, TypeError):
        retry = None
    return JobRecord(
        id=custom_id if custom_id is not None else str(seq),
        name=str(name),
        data_json=data if isinstance(data, str) else json.dumps(decode_lenient(data)),
        state=state,
        priority=_int(priority),
        max_attempts=max(1, _int(max_attempts)),
        attempts_made=_int(attempts_made),
        backoff=retry,
        enqueued_at_ms=_int(enqueued_at),
        run_at_ms=_int(run_at) if state is JobState.DELAYED else None,
        finished_at_ms=_int(finished_at) if state is JobState.FAILED else None,
        error=error if isinstance(error, str) and error else None,
        tracebacks=[str(t) for t in tracebacks],
        progress_json=progress if isinstance(progress, str) else None,
        logs=[str(line) for line in lines] if isinstance(lines, list) else [],
        in_flow=bool(in_flow),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


async def import_jobs(
    db: Database, queue: str, records: Sequence[JobRecord], *, dry_run: bool
) -> list[ImportOutcome]:
    for record in records:
        check_movable(record.state)

    def write(conn: sqlite3.Connection) -> list[ImportOutcome]:
        outcomes = []
        for record in records:
            outcome = _existing(conn, queue, record, dry_run=dry_run)
            if outcome is None:
                outcome = ImportOutcome.CREATED
                if not dry_run:
                    conn.execute(_IMPORT, _import_row(queue, record))
            outcomes.append(outcome)
        return outcomes

    if dry_run:
        # A read: the same checks without the write lock.
        return write(db.conn)
    outcomes = await db.write(write)
    if any(outcome is ImportOutcome.CREATED for outcome in outcomes):
        db.notify(queue)
    return outcomes


def _existing(
    conn: sqlite3.Connection, queue: str, record: JobRecord, *, dry_run: bool
) -> ImportOutcome | None:
    """``None`` if the record's id is free in ``queue`` (made free), else PRESENT or CONFLICT."""
    seq = queue_seq(record.id)
    if seq is None:
        found = conn.execute(
            "SELECT name, data FROM jobs WHERE queue = ? AND custom_id = ?", (queue, record.id)
        ).fetchone()
    elif seq < 0:
        return ImportOutcome.CONFLICT  # a number SQLite cannot store as a row number
    else:
        row = conn.execute(
            "SELECT queue, custom_id, name, data, state FROM jobs WHERE seq = ?", (seq,)
        ).fetchone()
        found = None
        if row is not None:
            owner, custom_id, name, data, state = row
            if custom_id is not None and state != "active":
                # The number is only that job's row handle (its id is custom), e.g. a job moved
                # in earlier: give it another, so that this job keeps its number. An active job
                # keeps its row (its worker's lease names it).
                if not dry_run:
                    _renumber(conn, seq)
                return None
            if custom_id is not None or owner != queue:
                return ImportOutcome.CONFLICT  # another job's own id, or an active job's row
            found = (name, data)
    if found is None:
        return None
    same = found[0] == record.name and same_json(found[1], record.data_json)
    return ImportOutcome.PRESENT if same else ImportOutcome.CONFLICT


def _renumber(conn: sqlite3.Connection, seq: int) -> None:
    """Give the row ``seq`` the next free row number (AUTOINCREMENT's counter follows)."""
    (top,) = conn.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0), "
        "coalesce((SELECT max(seq) FROM jobs), 0))"
    ).fetchone()
    conn.execute("UPDATE jobs SET seq = ? WHERE seq = ?", (top + 1, seq))
    conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'jobs'", (top + 1,))


def _import_row(queue: str, record: JobRecord) -> tuple[Any, ...]:
    seq = queue_seq(record.id)
    if record.state is JobState.DELAYED:
        run_at = record.run_at_ms if record.run_at_ms is not None else now_ms()
    else:
        # Waiting jobs are claimed by priority, run_at, seq: the enqueue time keeps their order.
        run_at = record.enqueued_at_ms
    failed = record.state is JobState.FAILED
    return (
        seq,
        queue,
        record.id if seq is None else None,
        record.name,
        record.data_json,
        record.state.value,
        record.priority,
        run_at,
        record.enqueued_at_ms,
        record.attempts_made,
        record.max_attempts,
        json.dumps(record.backoff.to_bullmq()) if record.backoff else None,
        (record.finished_at_ms or now_ms()) if failed else None,
        record.error,
        record.tracebacks[-1] if record.tracebacks else None,
        json.dumps(record.tracebacks) if record.tracebacks else None,
        record.progress_json,
        json.dumps(record.logs) if record.logs else None,
    )


async def remove_exported(db: Database, queue: str, records: Sequence[JobRecord]) -> list[bool]:
    def delete(conn: sqlite3.Connection) -> list[bool]:
        removed = []
        for record in records:
            seq = queue_seq(record.id)
            where = "custom_id = ?" if seq is None else "seq = ?"
            cursor = conn.execute(
                f"DELETE FROM jobs WHERE queue = ? AND {where} AND state = ?",
                (queue, record.id if seq is None else seq, record.state.value),
            )
            removed.append(cursor.rowcount == 1)
        return removed

    return await db.write(delete)
