"""Per-minute throughput on SQLite: a ``metrics`` row per queue and minute, counted in the
transaction that settles the jobs (one upsert per settled batch, not per job)."""

from __future__ import annotations

import sqlite3

from corral.metrics import minute_of

_COUNT_SQL = (
    "INSERT INTO metrics (queue, minute, completed, failed) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (queue, minute) DO UPDATE SET completed = completed + excluded.completed, "
    "failed = failed + excluded.failed"
)

READ_SQL = "SELECT minute, completed, failed FROM metrics WHERE queue = ? AND minute > ?"
"""A queue's rows after a minute (parameters: the queue, the minute before the window)."""


class MinuteCounter:
    """Counts one queue's settled jobs. When a new minute starts it drops the rows before the
    ``keep_minutes`` minutes that precede it, as BullMQ then trims its list to that many
    points beside the open minute."""

    def __init__(self, queue: str, keep_minutes: int) -> None:
        self.queue = queue
        self.keep_minutes = keep_minutes
        self._minute = -1  # the last minute this process counted in

    def count(self, conn: sqlite3.Connection, now_ms: int, completed: int, failed: int) -> None:
        """Add ``completed`` and ``failed`` jobs to the minute of ``now_ms`` (in the caller's
        transaction)."""
        if not self.keep_minutes or not (completed or failed):
            return
        minute = minute_of(now_ms)
        conn.execute(_COUNT_SQL, (self.queue, minute, completed, failed))
        if minute != self._minute:
            self._minute = minute
            conn.execute(
                "DELETE FROM metrics WHERE queue = ? AND minute < ?",
                (self.queue, minute - self.keep_minutes),
            )
