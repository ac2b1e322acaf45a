"""Live workers on SQLite: a heartbeat row per worker loop (see :mod:`corral.workers`)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

from corral.workers import WorkerInfo, WorkerStats

_BEAT_SQL = (
    "INSERT INTO workers (id, host, pid, queues, started_at, last_seen, expires_at, running, "
    "done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
    "last_seen = excluded.last_seen, expires_at = excluded.expires_at, "
    "running = excluded.running, done = excluded.done"
)

LIVE_SQL = (
    "SELECT id, host, pid, queues, started_at, last_seen, running, done FROM workers "
    "WHERE expires_at >= ? ORDER BY started_at, id"
)
"""The workers whose last heartbeat is still valid at the given time."""


def beat(conn: sqlite3.Connection, stats: WorkerStats, now_ms: int, *, leaving: bool) -> None:
    """Renew (or, ``leaving``, delete) the worker's row, and delete the stale rows of workers
    that stopped without saying so (killed, or their machine went away)."""
    if leaving:
        conn.execute("DELETE FROM workers WHERE id = ?", (stats.id,))
        return
    conn.execute(
        _BEAT_SQL,
        (
            stats.id,
            stats.host,
            stats.pid,
            json.dumps(stats.queues),
            stats.started_ms,
            now_ms,
            now_ms + stats.stale_after_ms,
            stats.running,
            stats.done,
        ),
    )
    conn.execute("DELETE FROM workers WHERE expires_at < ?", (now_ms,))


def read(rows: list[tuple[object, ...]], queue: str | None) -> list[WorkerInfo]:
    """The workers of :data:`LIVE_SQL`'s rows (of ``queue``, or all)."""
    listed: list[WorkerInfo] = []
    for worker_id, host, pid, queues_json, started, seen, running, done in rows:
        try:
            queues = [str(q) for q in json.loads(str(queues_json))]
        except ValueError:
            queues = []
        if queue is not None and queue not in queues:
            continue
        listed.append(
            WorkerInfo(
                id=str(worker_id),
                queues=queues,
                host=str(host),
                pid=pid if isinstance(pid, int) else None,
                started_at=_at(started),
                last_seen=_at(seen),
                running=running if isinstance(running, int) else None,
                done=done if isinstance(done, int) else None,
            )
        )
    return listed


def _at(ms: object) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if isinstance(ms, int) else None
