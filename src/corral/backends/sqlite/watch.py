"""Watching a SQLite file for changes from any process: what ``wait_for`` sleeps on, and the
reader of a queue's events (the ``events`` table, written by the schema's triggers).

A watch keeps its own baseline of the file (``PRAGMA data_version``, which moves when another
connection commits, and the count of this connection's own commits), taken when it is opened.
It sleeps on the worker's wake-up (:meth:`Database.changed`, one ``data_version`` poll per file
and process) and returns once either has moved, so no commit after the watch was opened is missed.
"""

from __future__ import annotations

import asyncio
import re

from corral.backends.base import EventFeed, JobWatch
from corral.backends.sqlite.database import Database
from corral.errors import ConfigError
from corral.message import Event

_READ = (
    "SELECT seq, name, job_id, fields FROM events WHERE queue = ? AND seq > ? ORDER BY seq LIMIT ?"
)

LOCAL_CHECK_S = 0.05
"""How often a watch looks at this connection's own commits (a worker of the same service),
which ``data_version`` does not count."""


class SQLiteWatch(JobWatch):
    """Returns from :meth:`wait` once anyone committed to the file since the last return."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._seen = self._mark()

    def _mark(self) -> tuple[int, int]:
        return self.db.data_version(), self.db.commits

    async def wait(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            mark = self._mark()
            if mark != self._seen:
                self._seen = mark
                return
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                return
            await self.db.changed(min(remaining_s, LOCAL_CHECK_S))


class SQLiteEvents(EventFeed):
    """A queue's events from the ``events`` table, waiting on the file's changes for more.

    An event's id is ``<row>-<n>``: a row holds one change, which is one event, or two for a
    job added waiting (BullMQ's ``added`` and ``waiting``). ``since`` may also be a bare row
    number, meaning after all of that row (what :meth:`last_id` gives).
    """

    def __init__(self, db: Database, queue: str) -> None:
        self.db = db
        self.queue = queue
        self._watch = SQLiteWatch(db)

    async def last_id(self) -> str:
        (newest,) = self.db.read("SELECT max(seq) FROM events")
        return str(newest[0] or 0)

    async def read(self, after: str, *, block_s: float, count: int) -> list[Event]:
        row, skip = _position(after)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_s
        while True:
            events: list[Event] = []
            for seq, name, job_id, prev, value in self.db.read(_READ, (row, self.queue, count)):
                events += [e for n, e in enumerate(_events(seq, name, job_id, prev, value))
                           if seq > row or n > skip]  # fmt: skip
            if events:
                return events[:count]
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                return []
            await self._watch.wait(remaining_s)


_READ = (
    "SELECT seq, name, job_id, prev, value FROM events WHERE seq >= ? AND queue = ? "
    "ORDER BY seq LIMIT ?"
)
_POSITION = re.compile(r"(\d{1,19})(?:-(\d))?")

_VALUE_FIELD = {
    "completed": "returnvalue",
    "failed": "failedReason",
    "delayed": "delay",
    "progress": "data",
    "retries-exhausted": "attemptsMade",
    "deduplicated": "deduplicationId",
}
"""The field a row's ``value`` is, by event name (BullMQ's field names)."""
_NO_PREV = frozenset({"delayed", "waiting-children"})
"""Events BullMQ writes without ``prev``."""


def _position(after: str) -> tuple[int, int]:
    """``after`` as (row, last event of it read); a bare row is read in full."""
    match = _POSITION.fullmatch(after) if isinstance(after, str) else None
    if match is None:
        raise ConfigError(f"{after!r} is not an event id of a SQLite queue (<row>-<n>)")
    return int(match[1]), int(match[2]) if match[2] is not None else 9


def _events(
    seq: int, name: str, job_id: str | None, prev: str | None, value: str | None
) -> list[Event]:
    if name == "added+waiting":
        return [
            Event(f"{seq}-0", "added", job_id, {"name": value or ""}),
            Event(f"{seq}-1", "waiting", job_id, {}),
        ]
    fields: dict[str, str] = {}
    if name == "added":
        fields["name"] = value or ""
    elif value is not None and name in _VALUE_FIELD:
        fields[_VALUE_FIELD[name]] = str(value)
    if prev is not None:
        fields["deduplicatedJobId" if name == "deduplicated" else "prev"] = prev
    if name in _NO_PREV:
        fields.pop("prev", None)
    return [Event(f"{seq}-0", name, job_id, fields)]
