"""Watching a SQLite file for changes from any process: what ``wait_for`` sleeps on.

A watch keeps its own baseline of the file (``PRAGMA data_version``, which moves when another
connection commits, and the count of this connection's own commits), taken when it is opened.
It sleeps on the worker's wake-up (:meth:`Database.changed`, one ``data_version`` poll per file
and process) and returns once either has moved, so no commit after the watch was opened is missed.
"""

from __future__ import annotations

import asyncio

from corral.backends.base import JobWatch
from corral.backends.sqlite.database import Database

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
