"""Per-minute throughput: how many jobs of a queue completed and failed in each minute.

Workers record it as they settle jobs, on both backends, unless ``metrics_minutes`` is 0:

- BullMQ: in BullMQ's own metrics keys (``<prefix>:<queue>:metrics:completed`` and ``:failed``,
  each a hash ``count``/``prevTS``/``prevCount`` and a ``:data`` list of per-minute counts, newest
  first), through the ``maxMetricsSize`` option of the moveToFinished script, exactly as a
  Node.js worker with ``metrics: {maxDataPoints}`` does; Node's ``Queue.getMetrics()`` and Bull
  Board read them.
- SQLite: a row per queue and minute in the ``metrics`` table, counted in the transaction that
  settles the jobs.

:meth:`~corral.backends.base.QueueBackend.throughput` reads either as a :class:`Throughput`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Throughput:
    """Jobs finished per minute, oldest minute first; the last point is the minute ending at
    ``end`` (the current minute, still counting)."""

    completed: list[int]
    failed: list[int]
    end: datetime

    @property
    def minutes(self) -> int:
        return len(self.completed)


def minute_of(ms: int) -> int:
    """The minute (since the epoch) that the time ``ms`` falls in."""
    return ms // MINUTE_MS


def window_end(now_ms: int) -> datetime:
    """The end of the minute holding ``now_ms``: where a series read at ``now_ms`` ends."""
    return datetime.fromtimestamp((minute_of(now_ms) + 1) * MINUTE_MS / 1000, UTC)


def series_from_rows(rows: Mapping[int, int], *, minutes: int, now_ms: int) -> list[int]:
    """The ``minutes`` points ending with the current minute, from counts keyed by minute;
    minutes without a row count zero."""
    last = minute_of(now_ms)
    return [rows.get(minute, 0) for minute in range(last - minutes + 1, last + 1)]


def series_from_bullmq(
    count: int | None,
    prev_ts_ms: int | None,
    prev_count: int | None,
    data: Sequence[int],
    *,
    minutes: int,
    now_ms: int,
) -> list[int]:
    """The ``minutes`` points ending with the current minute, from BullMQ's metrics keys.

    BullMQ's collectMetrics keeps ``count`` (jobs ever counted), ``prevTS`` (the time it last
    closed a minute, or of the first job) and ``prevCount`` (``count`` then, without the job
    that closed it). When a job finishes in a later minute than ``prevTS``, the jobs counted
    since are pushed as the point of ``prevTS``'s minute, followed by a zero for each minute
    between. So ``data[i]`` is the minute ``i + 1`` before ``prevTS``'s, and ``count -
    prevCount`` is what finished from ``prevTS``'s minute on (its minute is still open: later
    minutes had no job, or the next job would have closed it).
    """
    if prev_ts_ms is None or count is None:
        return [0] * minutes
    rows: dict[int, int] = {}
    open_minute = minute_of(prev_ts_ms)
    rows[open_minute] = max(0, count - (prev_count or 0))
    for i, point in enumerate(data):
        rows[open_minute - 1 - i] = point
    return series_from_rows(rows, minutes=minutes, now_ms=now_ms)
