"""Job schedules in the SQLite file: the ``schedulers`` table and its slot jobs.

The same semantics as BullMQ's job schedulers (:mod:`corral.schedules`), in SQL: a schedule row
records the slot of its *current* job (``current_ms``, BullMQ's score in the ``repeat`` set);
that job has the id ``repeat:<id>:<current_ms>`` and the column ``scheduler`` (BullMQ's ``rjk``).
When a worker's claim makes that job active, :func:`advance` writes the next slot's job in the
same transaction; a redelivered or retried job is not the current one any more and changes
nothing, and the unique custom id keeps a slot to one job. Every function here runs inside the
caller's write transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from corral.errors import ConfigError, ScheduleConflictError
from corral.payload import decode_lenient
from corral.retry import Retry
from corral.schedules import (
    NewSchedule,
    ScheduleInfo,
    ScheduleRule,
    every_next,
    ms_to_datetime,
    slot_job_id,
)

_INSERT_SLOT = (
    "INSERT INTO jobs (queue, custom_id, name, data, state, priority, run_at, enqueued_at, "
    "max_attempts, backoff, scheduler) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING RETURNING seq"
)

_SLOT_SCANS = 32  # BullMQ's bound on the interval slots an upsert walks past taken ones

CURRENT_JOBS = "SELECT 'repeat:' || id || ':' || current_ms FROM schedulers WHERE queue = ?"
"""The ids of the queue's schedules' current jobs (one parameter: the queue)."""


def upsert(conn: sqlite3.Connection, queue: str, schedule: NewSchedule, now: int) -> int:
    """Write ``schedule`` (replacing one with its id) and its pending job; return its slot.

    As BullMQ's ``addJobScheduler``: the pending job of the schedule it replaces is deleted
    (a running or finished one is left alone); an interval schedule whose interval did not
    change keeps its slot, so writing the same schedule again changes nothing you can see.
    """
    rule, job = schedule.rule, schedule.job
    prev = conn.execute(
        "SELECT current_ms, every_ms FROM schedulers WHERE queue = ? AND id = ?",
        (queue, schedule.id),
    ).fetchone()
    prev_ms = prev[0] if prev is not None else None
    removed = prev_ms is not None and _delete_pending(conn, queue, schedule.id, prev_ms)
    if rule.every_ms is not None:
        kept_every = prev is not None and prev[1] == rule.every_ms
        if removed and kept_every:
            next_ms = prev_ms
        else:
            phase = prev_ms % rule.every_ms if kept_every and prev_ms is not None else 0
            next_ms, _ = every_next(
                prev_ms if kept_every else None, rule.every_ms, now, phase, rule.start_ms
            )
    else:
        next_ms = rule.first_ms(now)
        if next_ms is None:
            raise ConfigError(f"schedule {schedule.id!r} has no run left before its end_at")
    assert next_ms is not None
    next_ms = int(next_ms)
    for _ in range(_SLOT_SCANS):
        if not _exists(conn, queue, slot_job_id(schedule.id, next_ms)):
            break
        if rule.every_ms is None:
            raise _busy(schedule.id, next_ms)
        next_ms += rule.every_ms
    else:
        raise _busy(schedule.id, next_ms)
    backoff = json.dumps(job.backoff.to_bullmq()) if job.backoff else None
    conn.execute(
        "INSERT INTO schedulers (queue, id, name, data, cron, every_ms, tz, max_runs, start_ms, "
        "end_ms, offset_ms, priority, max_attempts, backoff, current_ms, count, iterations, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 1, ?) "
        "ON CONFLICT (queue, id) DO UPDATE SET name = excluded.name, data = excluded.data, "
        "cron = excluded.cron, every_ms = excluded.every_ms, tz = excluded.tz, "
        "max_runs = excluded.max_runs, start_ms = excluded.start_ms, end_ms = excluded.end_ms, "
        "offset_ms = excluded.offset_ms, priority = excluded.priority, "
        "max_attempts = excluded.max_attempts, backoff = excluded.backoff, "
        "current_ms = excluded.current_ms, count = 1, updated_at = excluded.updated_at",
        (
            queue,
            schedule.id,
            job.name,
            job.data_json,
            rule.cron,
            rule.every_ms,
            rule.tz,
            rule.limit,
            rule.start_ms,
            rule.end_ms,
            next_ms % rule.every_ms if rule.every_ms else 0,
            job.priority,
            job.attempts,
            backoff,
            next_ms,
            now,
        ),
    )
    _insert_slot(
        conn,
        queue,
        schedule.id,
        next_ms,
        now,
        (job.name, job.data_json, job.priority, job.attempts, backoff),
    )
    return next_ms


def advance(conn: sqlite3.Connection, queue: str, schedule_id: str, job_id: str, now: int) -> None:
    """A job of ``schedule_id`` was just claimed: if it is the schedule's current job and the
    schedule goes on, write the next slot's job (Node.js BullMQ's worker does the same)."""
    row = conn.execute(
        "SELECT current_ms, count, cron, every_ms, tz, max_runs, start_ms, end_ms, offset_ms, "
        "name, data, priority, max_attempts, backoff FROM schedulers WHERE queue = ? AND id = ?",
        (queue, schedule_id),
    ).fetchone()
    if row is None or job_id != slot_job_id(schedule_id, row[0]):
        return  # unscheduled, or a retried or redelivered job of an earlier slot
    current_ms, count, cron, every_ms, tz, limit, start_ms, end_ms, offset_ms = row[:9]
    rule = ScheduleRule(cron, every_ms, tz, limit, start_ms, end_ms)
    next_ms = rule.next_ms(current_ms, count, now, offset_ms)
    if next_ms is None:
        return  # done: its limit or end_at was reached
    if _insert_slot(conn, queue, schedule_id, next_ms, now, tuple(row[9:])):
        conn.execute(
            "UPDATE schedulers SET current_ms = ?, count = count + 1, "
            "iterations = iterations + 1 WHERE queue = ? AND id = ?",
            (next_ms, queue, schedule_id),
        )


def remove(conn: sqlite3.Connection, queue: str, schedule_id: str) -> bool:
    """Delete the schedule and its pending job (a running one finishes); ``False`` if none."""
    row = conn.execute(
        "SELECT current_ms FROM schedulers WHERE queue = ? AND id = ?", (queue, schedule_id)
    ).fetchone()
    if row is None:
        return False
    _delete_pending(conn, queue, schedule_id, row[0])
    conn.execute("DELETE FROM schedulers WHERE queue = ? AND id = ?", (queue, schedule_id))
    return True


def read_query(queue: str, schedule_id: str | None = None) -> tuple[str, tuple[Any, ...]]:
    """The query (and its parameters) of the queue's schedules, or of the one with
    ``schedule_id``, the next to run first; :func:`info` reads its rows."""
    where = "s.queue = ?" + (" AND s.id = ?" if schedule_id is not None else "")
    params: tuple[Any, ...] = (queue,) if schedule_id is None else (queue, schedule_id)
    sql = (
        "SELECT s.id, s.name, s.data, s.cron, s.every_ms, s.tz, s.max_runs, s.start_ms, "
        "s.end_ms, s.priority, s.max_attempts, s.backoff, s.current_ms, s.iterations, "
        "j.state, j.started_at FROM schedulers s LEFT JOIN jobs j ON j.queue = s.queue AND "
        "j.custom_id = 'repeat:' || s.id || ':' || s.current_ms "
        f"WHERE {where} ORDER BY s.current_ms, s.id"
    )
    return sql, params


def is_current(conn: sqlite3.Connection, queue: str, job_id: str) -> str | None:
    """The schedule whose current job ``job_id`` is, if it is one."""
    row = conn.execute(
        "SELECT id FROM schedulers WHERE queue = ? AND 'repeat:' || id || ':' || current_ms = ?",
        (queue, job_id),
    ).fetchone()
    return str(row[0]) if row is not None else None


def schedule_exists(conn: sqlite3.Connection, queue: str, schedule_id: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM schedulers WHERE queue = ? AND id = ?", (queue, schedule_id)
        ).fetchone()
        is not None
    )


def info(queue: str, row: Sequence[Any]) -> ScheduleInfo:
    """A row of :func:`read_query`."""
    (
        schedule_id,
        name,
        data,
        cron,
        every_ms,
        tz,
        limit,
        start_ms,
        end_ms,
        priority,
        attempts,
        backoff,
        current_ms,
        iterations,
        state,
        started_at,
    ) = row
    pending = state in ("waiting", "delayed") and started_at is None
    try:
        retry = Retry.from_bullmq(decode_lenient(backoff)) if backoff else None
    except (ValueError, TypeError):
        retry = None
    return ScheduleInfo(
        id=schedule_id,
        name=name,
        data=decode_lenient(data),
        queue=queue,
        cron=cron,
        every_s=every_ms / 1000 if every_ms is not None else None,
        tz=tz,
        next_run_at=ms_to_datetime(current_ms) if pending else None,
        runs=max(0, iterations - 1 if pending else iterations),
        limit=limit,
        start_at=ms_to_datetime(start_ms),
        end_at=ms_to_datetime(end_ms),
        priority=priority,
        attempts=attempts,
        backoff=retry,
    )


def _delete_pending(conn: sqlite3.Connection, queue: str, schedule_id: str, slot_ms: int) -> bool:
    """Delete the job of a slot unless it is running or finished (BullMQ removes it from the
    delayed set, a retry waiting out its backoff included, and from waiting)."""
    cursor = conn.execute(
        "DELETE FROM jobs WHERE queue = ? AND custom_id = ? AND (state = 'delayed' OR "
        "(state = 'waiting' AND started_at IS NULL))",
        (queue, slot_job_id(schedule_id, slot_ms)),
    )
    return cursor.rowcount == 1


def _exists(conn: sqlite3.Connection, queue: str, job_id: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM jobs WHERE queue = ? AND custom_id = ?", (queue, job_id)
    ).fetchone()
    return found is not None


def _insert_slot(
    conn: sqlite3.Connection,
    queue: str,
    schedule_id: str,
    slot_ms: int,
    now: int,
    template: tuple[Any, ...],
) -> bool:
    name, data, priority, attempts, backoff = template
    inserted = conn.execute(
        _INSERT_SLOT,
        (
            queue,
            slot_job_id(schedule_id, slot_ms),
            name,
            data,
            "delayed" if slot_ms > now else "waiting",
            priority,
            slot_ms,
            now,
            attempts,
            backoff,
            schedule_id,
        ),
    ).fetchone()
    return inserted is not None


def _busy(schedule_id: str, slot_ms: int) -> ScheduleConflictError:
    return ScheduleConflictError(
        f"the slot {ms_to_datetime(slot_ms)} of schedule {schedule_id!r} already has a job "
        f"({slot_job_id(schedule_id, slot_ms)}, running or finished); write the schedule again "
        "once that job has started the next slot, or remove the finished job"
    )
