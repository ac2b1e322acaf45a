"""Flows in SQLite: writing a tree of jobs, and settling a child for its parent.

Every function here runs inside the caller's write transaction, so a child's outcome, its
dependency row and its parent's release commit together or not at all. The rules are BullMQ's
(see ``QueueBackend.enqueue_flow``); each function returns the queue of a parent it released (or
marked to fail), whose workers the caller wakes after the commit.

The tables: a child row carries ``parent_seq`` and ``parent_policy``; ``dependencies`` holds one
row per (parent, child) with the child's status for its parent (``pending``, ``completed`` with
the result, ``ignored`` or ``failed`` with the error).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from corral.errors import PayloadError
from corral.message import Child, ChildPolicy, ChildStatus, FlowEntry, FlowWrite, JobRef, NewJob
from corral.payload import decode_lenient

INSERT_FLOW_JOB = (
    "INSERT INTO jobs (queue, custom_id, name, data, state, priority, run_at, enqueued_at, "
    "max_attempts, backoff, logs, trace_context, parent_seq, parent_policy) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq"
)

_INSERT_DEPENDENCY = (
    "INSERT INTO dependencies (parent_seq, child_seq, child_queue, child_id, status, value) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

# A released parent keeps its place in line (run_at = when it was enqueued), unless it has a
# delay: that counts from its release, as in BullMQ. A waiting-children row's run_at is
# enqueued_at + its delay.
_RELEASE = (
    "UPDATE jobs SET "
    "state = CASE WHEN run_at > enqueued_at THEN 'delayed' ELSE 'waiting' END, "
    "run_at = CASE WHEN run_at > enqueued_at THEN ? + run_at - enqueued_at ELSE run_at END"
)

_NONE_PENDING = (
    "NOT EXISTS (SELECT 1 FROM dependencies WHERE parent_seq = ? AND status = 'pending')"
)

OPEN_CHILDREN = (
    "NOT EXISTS (SELECT 1 FROM dependencies WHERE parent_seq = jobs.seq AND status = 'pending') "
    "AND NOT EXISTS (SELECT 1 FROM dependencies WHERE parent_seq = jobs.seq "
    "AND status = 'failed')"
)
"""Whether the job of the statement (``jobs``) may complete: no child pending or failing it.
Two lookups, not ``status IN (...)``: SQLite builds a temporary table for an IN list."""

RowBuilder = Callable[[NewJob, int], tuple[Any, ...]]


def insert_flow(
    conn: sqlite3.Connection, entries: Sequence[FlowEntry], now: int, row: RowBuilder
) -> tuple[FlowWrite, set[str]]:
    """Write the flow (see ``QueueBackend.enqueue_flow``); return it and the queues to wake.

    ``row`` gives the INSERT values of a job (as ``enqueue`` writes them) for the columns of
    INSERT, without the parent columns.
    """
    count = len(entries)
    ids: list[str | None] = [None] * count
    seqs: list[int | None] = [None] * count  # set for jobs written now
    woken: set[str] = set()
    for index, entry in enumerate(entries):
        job = entry.job
        queue = job.queue or ""
        parent_seq = seqs[entry.parent] if entry.parent is not None else None
        if entry.parent is not None and parent_seq is None:
            continue  # under a job that existed: its children are its own business
        if job.job_id is not None:
            found = conn.execute(
                "SELECT seq, state, parent_seq, result FROM jobs WHERE queue = ? AND custom_id = ?",
                (queue, job.job_id),
            ).fetchone()
            if found is not None:
                if entry.parent is None:
                    return FlowWrite([job.job_id] + [None] * (count - 1), existed=True), set()
                assert parent_seq is not None
                _attach(conn, entry, found, parent_seq)
                ids[index] = job.job_id
                continue
        values = row(job, now)
        state = "waiting-children" if entry.has_children else values[4]
        policy = entry.on_failure.value if entry.parent is not None else None
        (seq,) = conn.execute(
            INSERT_FLOW_JOB, (*values[:4], state, *values[5:], parent_seq, policy)
        ).fetchone()
        seqs[index] = seq
        ids[index] = job.job_id if job.job_id is not None else str(seq)
        woken.add(queue)
        if parent_seq is not None:
            conn.execute(_INSERT_DEPENDENCY, (parent_seq, seq, queue, ids[index], "pending", None))
    # A parent all of whose children existed and had completed runs at once.
    for index, entry in enumerate(entries):
        seq = seqs[index]
        if entry.has_children and seq is not None:
            release_parent(conn, seq, now)
    return FlowWrite(ids), woken


def _attach(
    conn: sqlite3.Connection, entry: FlowEntry, found: Sequence[Any], parent_seq: int
) -> None:
    """Make the existing job ``found`` a child of ``parent_seq`` (BullMQ's duplicated child)."""
    seq, state, its_parent, result = found
    job = entry.job
    if its_parent is not None:
        raise PayloadError(
            f"job {job.job_id!r} of queue {job.queue!r} already belongs to a flow (it has a "
            "parent); give this flow job another job_id"
        )
    if state == "failed":
        raise PayloadError(
            f"job {job.job_id!r} of queue {job.queue!r} exists and failed; retry or remove it "
            "before using its job_id in a flow"
        )
    conn.execute(
        "UPDATE jobs SET parent_seq = ?, parent_policy = ? WHERE seq = ?",
        (parent_seq, entry.on_failure.value, seq),
    )
    completed = state == "completed"
    conn.execute(
        _INSERT_DEPENDENCY,
        (
            parent_seq,
            seq,
            job.queue,
            job.job_id,
            "completed" if completed else "pending",
            result if completed else None,
        ),
    )


def release_parent(
    conn: sqlite3.Connection, parent_seq: int, now: int, *, when_settled: bool = True
) -> str | None:
    """Release a waiting-children parent (once no child is pending, with ``when_settled``);
    return its queue if it was released."""
    sql = f"{_RELEASE} WHERE seq = ? AND state = 'waiting-children'"
    params: tuple[Any, ...] = (now, parent_seq)
    if when_settled:
        sql += f" AND {_NONE_PENDING}"
        params += (parent_seq,)
    found = conn.execute(sql + " RETURNING queue", params).fetchall()
    return str(found[0][0]) if found else None


def child_completed(
    conn: sqlite3.Connection, child_seq: int, parent_seq: int, result_json: str, now: int
) -> str | None:
    """Record a completed child's result for its parent; release the parent if it was the last."""
    cursor = conn.execute(
        "UPDATE dependencies SET status = 'completed', value = ? "
        "WHERE parent_seq = ? AND child_seq = ? AND status = 'pending'",
        (result_json, parent_seq, child_seq),
    )
    if cursor.rowcount != 1:
        return None
    return release_parent(conn, parent_seq, now)


def child_failed(
    conn: sqlite3.Connection,
    child_seq: int,
    parent_seq: int,
    policy: str | None,
    error: str,
    now: int,
) -> str | None:
    """Apply a child's failure for good to its parent, by the child's policy."""
    found = conn.execute(
        "SELECT child_queue, child_id FROM dependencies "
        "WHERE parent_seq = ? AND child_seq = ? AND status = 'pending'",
        (parent_seq, child_seq),
    ).fetchone()
    if found is None:
        return None
    key = (parent_seq, child_seq)
    where = "WHERE parent_seq = ? AND child_seq = ?"
    if policy == ChildPolicy.REMOVE:
        conn.execute(f"DELETE FROM dependencies {where}", key)
        return release_parent(conn, parent_seq, now)
    if policy in (ChildPolicy.IGNORE, ChildPolicy.CONTINUE):
        conn.execute(
            f"UPDATE dependencies SET status = 'ignored', value = ? {where}", (error, *key)
        )
        return release_parent(conn, parent_seq, now, when_settled=policy == ChildPolicy.IGNORE)
    if policy != ChildPolicy.FAIL:
        return None  # no policy: the parent waits until the child is retried and completes
    conn.execute(f"UPDATE dependencies SET status = 'failed', value = ? {where}", (error, *key))
    reason = f"child {found[0]}:{found[1]} failed"
    released = (
        conn.execute(
            f"{_RELEASE}, deferred_failure = ? WHERE seq = ? AND state = 'waiting-children' "
            "RETURNING queue",
            (now, reason, parent_seq),
        ).fetchall()
        or conn.execute(
            "UPDATE jobs SET state = 'waiting', run_at = ?, deferred_failure = ? "
            "WHERE seq = ? AND state = 'delayed' RETURNING queue",
            (now, reason, parent_seq),
        ).fetchall()
    )
    if released:
        return str(released[0][0])
    # Waiting or running: it fails when next picked up (and cannot complete meanwhile).
    conn.execute(
        "UPDATE jobs SET deferred_failure = ? WHERE seq = ? AND state NOT IN ('failed', "
        "'completed')",
        (reason, parent_seq),
    )
    return None


def reopen(conn: sqlite3.Connection, pairs: Iterable[tuple[int, int]]) -> None:
    """Retried children (``(child_seq, parent_seq)``) are pending again for their parents."""
    conn.executemany(
        "UPDATE dependencies SET status = 'pending', value = NULL WHERE child_seq = ? AND "
        "parent_seq = ? AND status IN ('failed', 'ignored')",
        pairs,
    )


def unlink(conn: sqlite3.Connection, pairs: Iterable[tuple[int, int]], now: int) -> set[str]:
    """Children about to be deleted (``(child_seq, parent_seq)``) no longer count for their
    parents; a parent whose last pending child this was is released. Return their queues."""
    woken: set[str] = set()
    for child_seq, parent_seq in pairs:
        cursor = conn.execute(
            "DELETE FROM dependencies WHERE parent_seq = ? AND child_seq = ? AND "
            "status = 'pending'",
            (parent_seq, child_seq),
        )
        if cursor.rowcount:
            queue = release_parent(conn, parent_seq, now)
            if queue is not None:
                woken.add(queue)
    return woken


def read_children(rows: Iterable[Sequence[Any]]) -> list[Child]:
    """Children from rows of :data:`CHILDREN_SQL`."""
    children = []
    for queue, child_id, status, value, name, error in rows:
        state = ChildStatus(status)
        children.append(
            Child(
                queue=queue,
                id=child_id,
                status=state,
                name=name,
                result=decode_lenient(value) if state is ChildStatus.COMPLETED else None,
                error=(value or error)
                if state in (ChildStatus.IGNORED, ChildStatus.FAILED)
                else None,
            )
        )
    return children


CHILDREN_SQL = (
    "SELECT d.child_queue, d.child_id, d.status, d.value, j.name, j.error "
    "FROM dependencies AS d LEFT JOIN jobs AS j ON j.seq = d.child_seq "
    "WHERE d.parent_seq = ? ORDER BY d.child_seq"
)


def parent_refs(
    read: Callable[[str, Sequence[Any]], list[Any]], seqs: Iterable[int]
) -> dict[int, JobRef]:
    """The parents of these ``parent_seq`` values that still exist, as job references."""
    wanted = sorted(set(seqs))
    refs: dict[int, JobRef] = {}
    for start in range(0, len(wanted), 500):
        part = wanted[start : start + 500]
        marks = ",".join("?" * len(part))
        for seq, queue, custom_id in read(
            f"SELECT seq, queue, custom_id FROM jobs WHERE seq IN ({marks})", part
        ):
            refs[seq] = JobRef(queue, custom_id if custom_id is not None else str(seq))
    return refs
