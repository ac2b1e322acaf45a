"""Following a queue's events: ``QueueService.events`` and ``corral events``.

Above the backends' :class:`~corral.backends.base.EventFeed`: it reads on from a position (the
newest event by default), so a reader that stops and resumes with ``since=`` the id of the last
event it handled loses nothing the store still keeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from corral.backends.base import QueueBackend
from corral.errors import ConfigError
from corral.message import Event

FOLLOW_BLOCK_S = 5.0
"""How long one read waits for a new event while following (then it reads again)."""
BATCH = 500
"""Events read at once."""


class QueueEvents:
    """Reading a queue's events; :class:`~corral.service.QueueService` inherits it."""

    @property
    def backend(self) -> QueueBackend:
        raise NotImplementedError

    def events(
        self,
        since: str | None = None,
        names: Iterable[str] | None = None,
        *,
        follow: bool = True,
    ) -> AsyncIterator[Event]:
        """The queue's events, oldest first: those after the event id ``since`` (``"0"``: from
        the oldest kept; ``None``, the default: from now on), only those ``names`` if given.

        With ``follow`` (the default) it waits for new events for ever; without, it ends once
        it has read what is stored. Close it (``contextlib.aclosing``) to release its
        connection at once when you stop early.

        Raises:
            ConfigError: ``since`` is not an event id of this backend, or a name is not text.
        """
        return follow_events(self.backend, since, _names(names), follow=follow)


def _names(names: Iterable[str] | None) -> frozenset[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    chosen = frozenset(names)
    if not all(isinstance(name, str) and name for name in chosen):
        raise ConfigError(f"event names must be non-empty strings, got {sorted(map(repr, chosen))}")
    return chosen


async def follow_events(
    backend: QueueBackend,
    since: str | None,
    names: frozenset[str] | None,
    *,
    follow: bool,
) -> AsyncIterator[Event]:
    """See :meth:`QueueEvents.events`."""
    feed = await backend.open_events()
    try:
        after = since if since is not None else await feed.last_id()
        while True:
            batch = await feed.read(after, block_s=FOLLOW_BLOCK_S if follow else 0.0, count=BATCH)
            if not batch and not follow:
                return
            for event in batch:
                after = event.id
                if names is None or event.name in names:
                    yield event
    finally:
        await feed.aclose()
