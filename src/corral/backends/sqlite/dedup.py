"""Deduplication on SQLite (see :mod:`corral.dedup` for the modes): the ``deduplication`` table,
checked and written in the enqueue's own transaction."""

from __future__ import annotations

import sqlite3
from typing import Any

from corral.backends.sqlite.schema import FINISHED_STATES, INSERT
from corral.dedup import Deduplication

_STANDING = (
    "SELECT d.job_seq, d.expires_at, j.state, j.custom_id FROM deduplication d "
    "LEFT JOIN jobs j ON j.seq = d.job_seq WHERE d.queue = ? AND d.id = ?"
)
_HOLD = "INSERT OR REPLACE INTO deduplication (queue, id, job_seq, expires_at) VALUES (?, ?, ?, ?)"


def insert_deduplicated(
    conn: sqlite3.Connection, row: tuple[Any, ...], dedup: Deduplication, now: int
) -> str:
    """Write the job of ``row`` (:data:`INSERT`'s parameters) unless a job stands for
    ``dedup.id`` in its queue; return the id of the job that stands after the call. Runs inside
    the caller's write transaction."""
    queue, custom_id = row[0], row[1]
    if (
        custom_id is not None
        and conn.execute(
            "SELECT 1 FROM jobs WHERE queue = ? AND custom_id = ?", (queue, custom_id)
        ).fetchone()
    ):
        return str(custom_id)  # an existing id wins first, as BullMQ checks it first
    ttl_ms = dedup.ttl_ms
    found = conn.execute(_STANDING, (queue, dedup.id)).fetchone()
    if found is not None:
        seq, expires_at, state, standing_custom = found
        if expires_at is None:
            stands = state is not None and state not in FINISHED_STATES
        else:
            stands = expires_at > now
        if stands:
            standing = str(standing_custom) if standing_custom is not None else str(seq)
            if dedup.replace and state == "delayed":
                # Debounce: the standing job has not run yet; this one takes its place.
                conn.execute("DELETE FROM jobs WHERE seq = ?", (seq,))
                keep = expires_at if not dedup.extend and ttl_ms else None
                new = _insert(conn, row, dedup, keep if keep is not None else _expiry(now, ttl_ms))
                _deduplicated(conn, queue, new, dedup.id, replaced=standing)
                return new
            if dedup.extend and ttl_ms and not dedup.replace:
                conn.execute(
                    "UPDATE deduplication SET expires_at = ? WHERE queue = ? AND id = ?",
                    (now + ttl_ms, queue, dedup.id),
                )
            _deduplicated(conn, queue, standing, dedup.id)
            return standing
    return _insert(conn, row, dedup, _expiry(now, ttl_ms))


def _deduplicated(
    conn: sqlite3.Connection, queue: str, job_id: str, dedup_id: str, *, replaced: str = ""
) -> None:
    """BullMQ's ``deduplicated`` event: ``job_id`` stands for ``dedup_id`` (it replaced the
    job ``replaced``, in debounce mode)."""
    conn.execute(
        "INSERT INTO events (queue, name, job_id, prev, value) VALUES (?, 'deduplicated', ?, ?, ?)",
        (queue, job_id, replaced or None, dedup_id),
    )


def _expiry(now: int, ttl_ms: int | None) -> int | None:
    return None if ttl_ms is None else now + ttl_ms


def _insert(
    conn: sqlite3.Connection, row: tuple[Any, ...], dedup: Deduplication, expires_at: int | None
) -> str:
    (seq,) = conn.execute(INSERT + " RETURNING seq", row).fetchone()
    conn.execute(_HOLD, (row[0], dedup.id, seq, expires_at))
    return str(row[1]) if row[1] is not None else str(seq)
