"""Job schedules: cron and fixed-interval jobs, one job per time slot, on both backends.

A schedule is a record in the queue's storage (BullMQ's *job scheduler* layout on Redis, the
``schedulers`` table on SQLite) that owns one pending job: the job of its next time slot, with
the id ``repeat:<schedule id>:<slot epoch ms>``. When a worker starts that job (it becomes
active), the worker creates the job of the following slot, in the same transaction on SQLite
and through BullMQ's ``updateJobScheduler`` script on Redis, exactly as Node.js BullMQ's
workers do. Only the job of the schedule's *current* slot may create the next one, and a slot's
id can exist once, so however many workers run (and however often a job is redelivered) each
slot gets one job. Slots are produced while at least one worker of the queue runs.

This module holds what both backends share: checking a schedule (:func:`new_schedule`), the
interval arithmetic (BullMQ's, ported from its Lua; the cron arithmetic is :mod:`corral.cron`),
the decision a worker takes when a slot job starts (:meth:`ScheduleRule.next_ms`) and the
:class:`ScheduleInfo` that ``schedules()`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from corral.cron import check_cron, check_tz, cron_next
from corral.errors import BackendError, ConfigError, PayloadError
from corral.jobs import new_job
from corral.message import JSON, NewJob
from corral.payload import decode_lenient
from corral.retry import Retry

if TYPE_CHECKING:
    from corral.backends.base import QueueBackend
    from corral.settings import QueueSettings

logger = logging.getLogger("corral.worker")

MAX_SCHEDULE_ID_LENGTH = 200
MAX_EVERY_S = 10 * 366 * 86400.0
MAX_LIMIT = 1_000_000_000
DEFAULT_TZ = "UTC"
"""The zone of a cron schedule given without ``tz``. corral writes it into the schedule, so
every worker (Node.js ones included, which would otherwise use their own local zone) agrees."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


SLOT_JOB_PREFIX = "repeat:"
"""How the ids of schedules' jobs begin (BullMQ's scheduler job ids)."""


def slot_job_id(schedule_id: str, slot_ms: int) -> str:
    """The id of a schedule's job for the slot at ``slot_ms`` (BullMQ's scheduler job id)."""
    return f"{SLOT_JOB_PREFIX}{schedule_id}:{slot_ms}"


def slot_of(job_id: str, schedule_id: str) -> int | None:
    """The slot (epoch ms) of ``schedule_id``'s job ``job_id``, or ``None`` for another job."""
    head = f"repeat:{schedule_id}:"
    tail = job_id[len(head) :]
    if job_id.startswith(head) and tail.isascii() and tail.isdigit():
        return int(tail)
    return None


# -- intervals ----------------------------------------------------------------------------------


def every_next(
    prev_ms: int | None, every_ms: int, now: int, offset_ms: int, start_ms: int | None
) -> tuple[int, int]:
    """The next slot of an interval schedule and its phase: BullMQ's
    ``getJobSchedulerEveryNextMillis`` (both backends use these numbers).

    A new schedule's first slot is now (or ``start_ms``, if later); then every ``every_ms``.
    Slots missed while no worker ran are skipped: the next one is the first on the phase grid
    after ``now``, never a backlog.
    """
    if prev_ms is None:
        if start_ms is not None:
            next_ms = max(start_ms, now)
        elif offset_ms > 0:
            next_ms = now // every_ms * every_ms + offset_ms
            if next_ms <= now:
                next_ms += every_ms
        else:
            next_ms = now
    else:
        next_ms = prev_ms + every_ms
        if next_ms < now:
            aligned = now // every_ms * every_ms + offset_ms
            next_ms = aligned + every_ms if aligned <= now else aligned
    if not offset_ms:
        offset_ms = next_ms - next_ms // every_ms * every_ms
    return next_ms, offset_ms


# -- a schedule's rule --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleRule:
    """When a schedule's slots fall: exactly one of ``cron`` and ``every_ms``."""

    cron: str | None = None
    every_ms: int | None = None
    tz: str | None = None
    limit: int | None = None
    start_ms: int | None = None
    end_ms: int | None = None

    def first_ms(self, now: int) -> int | None:
        """The first slot of a new schedule written now; ``None`` if none is left before
        ``end_ms``."""
        if self.every_ms is not None:
            first, _ = every_next(None, self.every_ms, now, 0, self.start_ms)
        else:
            assert self.cron is not None
            found = cron_next(now, self.cron, self.tz, self.start_ms, self.end_ms)
            if found is None:
                return None
            first = max(found, now)
        if self.end_ms is not None and first > self.end_ms:
            return None
        return first

    def next_ms(
        self, prev_ms: int, count: int, now: int, offset_ms: int | None = None
    ) -> int | None:
        """The slot after ``prev_ms``, whose job (the ``count``-th since the schedule was last
        written) just started; ``None`` when the schedule is done: ``limit`` jobs made,
        ``end_ms`` passed, or no cron time left before it. What a worker asks when a slot job
        becomes active (Node.js BullMQ's worker asks the same)."""
        if self.limit is not None and count + 1 > self.limit:
            return None
        if self.end_ms is not None and now > self.end_ms:
            return None
        if self.every_ms is not None:
            phase = prev_ms % self.every_ms if offset_ms is None else offset_ms
            next_ms, _ = every_next(prev_ms, self.every_ms, now, phase, self.start_ms)
        else:
            assert self.cron is not None
            found = cron_next(max(now, prev_ms), self.cron, self.tz, self.start_ms, self.end_ms)
            if found is None:
                return None
            next_ms = max(found, now)
        if self.end_ms is not None and next_ms > self.end_ms:
            return None
        return next_ms


# -- checking a schedule ------------------------------------------------------------------------


@dataclass(slots=True)
class NewSchedule:
    """A checked schedule about to be written: its rule and the template of its jobs."""

    id: str
    rule: ScheduleRule
    job: NewJob
    """The template: name, data (encoded), priority, attempts, backoff."""


def check_schedule_id(schedule_id: Any) -> str:
    """``schedule_id`` if corral can use it, else ConfigError."""
    if (
        not isinstance(schedule_id, str)
        or not schedule_id
        or len(schedule_id) > MAX_SCHEDULE_ID_LENGTH
    ):
        raise ConfigError(
            f"schedule id must be a non-empty string of at most {MAX_SCHEDULE_ID_LENGTH} "
            f"characters, got {schedule_id!r}"
        )
    if ":" in schedule_id or any(ch.isspace() or ord(ch) < 32 for ch in schedule_id):
        raise ConfigError(
            f"schedule id may not contain ':', spaces or control characters: {schedule_id!r} "
            "(':' separates the parts of its jobs' ids)"
        )
    try:
        schedule_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"schedule id is not valid Unicode: {schedule_id!r}") from None
    return schedule_id


def to_ms(moment: Any, what: str) -> int | None:
    """An aware datetime (or ``None``) as epoch ms."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        raise ConfigError(f"{what} must be a datetime with a time zone, got {moment!r}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ConfigError(
            f"{what} {moment.isoformat()} has no time zone; pass an aware datetime, "
            "e.g. datetime(2030, 1, 1, tzinfo=UTC)"
        )
    return round(moment.timestamp() * 1000)


def new_schedule(
    schedule_id: str,
    job: NewJob,
    *,
    cron: str | None,
    every_s: float | None,
    tz: str | None,
    limit: int | None,
    start_at: datetime | None,
    end_at: datetime | None,
    now: int,
) -> NewSchedule:
    """Check a schedule; raise ConfigError before anything is written.

    ``job`` is the template, already checked (``corral.jobs.new_job``). A cron schedule without
    ``tz`` runs in UTC (:data:`DEFAULT_TZ`).
    """
    check_schedule_id(schedule_id)
    if (cron is None) == (every_s is None):
        raise ConfigError(
            f"schedule {schedule_id!r}: give exactly one of cron (e.g. '0 3 * * *') and "
            "every_s (seconds between runs)"
        )
    every_ms: int | None = None
    if cron is not None:
        check_cron(cron)
        tz = check_tz(tz) if tz is not None else DEFAULT_TZ
    else:
        if (
            isinstance(every_s, bool)
            or not isinstance(every_s, int | float)
            or not math.isfinite(every_s)
            or every_s <= 0
            or every_s > MAX_EVERY_S
            or round(every_s * 1000) < 1
        ):
            raise ConfigError(
                f"schedule {schedule_id!r}: every_s must be a number of seconds > 0 (at least "
                f"0.001, at most ten years), got {every_s!r}"
            )
        if tz is not None:
            raise ConfigError(
                f"schedule {schedule_id!r}: tz applies to cron patterns; an interval (every_s) "
                "is the same in every zone"
            )
        every_ms = round(every_s * 1000)
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT
    ):
        raise ConfigError(
            f"schedule {schedule_id!r}: limit must be a whole number of runs >= 1, got {limit!r}"
        )
    start_ms = to_ms(start_at, "start_at")
    end_ms = to_ms(end_at, "end_at")
    if start_ms is not None and end_ms is not None and end_ms < start_ms:
        raise ConfigError(
            f"schedule {schedule_id!r}: end_at ({_iso(end_ms)}) is before start_at "
            f"({_iso(start_ms)})"
        )
    if end_ms is not None and end_ms < now:
        raise ConfigError(f"schedule {schedule_id!r}: end_at ({_iso(end_ms)}) is in the past")
    rule = ScheduleRule(cron, every_ms, tz, limit, start_ms, end_ms)
    if rule.first_ms(now) is None:
        raise ConfigError(
            f"schedule {schedule_id!r} would never run: no time matching its cron pattern "
            f"falls between start_at and end_at ({_iso(end_ms or 0)})"
        )
    return NewSchedule(schedule_id, rule, job)


_RULE_OPTIONS = ("cron", "every_s", "tz", "limit", "start_at", "end_at")


def build_schedule(
    schedule_id: str,
    name: str,
    data: JSON,
    build_job: Callable[..., NewJob],
    options: dict[str, Any],
) -> NewSchedule:
    """Check a schedule: ``options`` are ``schedule()``'s keyword arguments, the rule's and the
    job options ``build_job`` (``QueueService.build_job``) takes."""
    rule = {key: options.pop(key, None) for key in _RULE_OPTIONS}
    for option, why in (
        ("job_id", "a schedule's jobs get the ids repeat:<schedule id>:<slot ms>"),
        ("delay_s", "use start_at to delay the first run"),
        ("deduplication", "a schedule writes one job per slot already"),
    ):
        if option in options:
            raise PayloadError(f"{option} is not an option of schedule(): {why}")
    try:
        job = build_job(name, data, **options)
    except TypeError as exc:
        raise PayloadError(f"schedule {schedule_id!r}: {exc}") from None
    return new_schedule(schedule_id, job, **rule, now=now_ms())


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def ms_to_datetime(ms: int | None) -> datetime | None:
    if ms is None:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        return None


@dataclass(frozen=True, slots=True)
class Periodic:
    """A schedule declared beside its handler (``@service.periodic``); workers write it."""

    schedule_id: str
    name: str
    data: JSON
    options: dict[str, Any]
    """The keyword arguments of ``schedule()``: cron or every_s, tz, limit, dates, priority..."""
    queue: str | None = None
    """The queue it belongs to; ``None``: the declaring service's."""


def carried_over(info: ScheduleInfo, settings: QueueSettings, now: int) -> NewSchedule | None:
    """``info`` as a schedule to write elsewhere (moving a queue to ``settings``), or ``None``
    if it is done (its limit reached, its end passed): nothing of it is left to run. Its
    ``limit`` counts the runs left; an interval starts its phase anew."""
    limit = None if info.limit is None else info.limit - info.runs
    if (limit is not None and limit < 1) or (info.next_run_at is None and info.runs > 0):
        return None
    job = new_job(
        info.name,
        info.data,
        delay_s=0,
        priority=info.priority,
        attempts=info.attempts,
        backoff=info.backoff or Retry.fixed(0),  # a job without one retries at once
        job_id=None,
        queue=None,
        max_payload_bytes=settings.max_payload_bytes,
        safe_integers=settings.backend == "bullmq" and not settings.allow_unsafe_integers,
    )
    try:
        return new_schedule(
            info.id,
            job,
            cron=info.cron,
            every_s=info.every_s,
            tz=info.tz if info.cron else None,
            limit=limit,
            start_at=info.start_at,
            end_at=info.end_at,
            now=now,
        )
    except ConfigError:  # e.g. its end_at passed since it was written
        return None


def include_periodics(into: dict[str, Periodic], declared: Iterable[Periodic], queue: str) -> None:
    """Add ``declared`` (of a service of ``queue``) to a worker's periodic schedules."""
    for periodic in declared:
        placed = replace(periodic, queue=periodic.queue or queue)
        known = into.get(periodic.schedule_id)
        if known is not None and known != placed:
            raise ConfigError(f"two periodic schedules are declared as {placed.schedule_id!r}")
        into[periodic.schedule_id] = placed


def periodic_writes(
    backend: QueueBackend,
    periodics: Mapping[str, Periodic],
    default_queue: str,
    served: Sequence[QueueSettings],
) -> list[tuple[QueueBackend, Periodic]]:
    """The declared schedules of the queues a worker serves, each with its queue's backend."""
    by_queue = {each.name: each for each in served}
    return [
        (backend.for_queue(queue, by_queue[queue]), periodic)
        for periodic in periodics.values()
        if (queue := periodic.queue or default_queue) in by_queue
    ]


async def write_declared(
    declared: Sequence[tuple[QueueBackend, Periodic]],
    build: Callable[[Periodic], NewSchedule],
    stop: asyncio.Event,
) -> None:
    """Write the declared schedules that are missing or changed (what a worker does when it
    starts), each on its queue's backend; retried while the storage is unreachable."""
    pending = list(declared)
    pause_s = 1.0
    while pending and not stop.is_set():
        backend, periodic = pending[0]
        try:
            built = build(periodic)
            stored = await backend.list_schedules(periodic.schedule_id)
            if not (stored and stored[0].same_as(built)):
                await backend.upsert_schedule(built)
                logger.info(
                    "schedule %r written on queue %r", periodic.schedule_id, backend.queue_name
                )
            pending.pop(0)
            pause_s = 1.0
        except (ConfigError, PayloadError) as exc:  # e.g. its end_at has passed
            logger.error("periodic schedule %r not written: %s", periodic.schedule_id, exc)
            pending.pop(0)
        except BackendError as exc:
            logger.error(
                "writing periodic schedule %r failed: %s; retrying in %.0fs",
                periodic.schedule_id,
                exc,
                pause_s,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause_s)
            pause_s = min(pause_s * 2, 30.0)


# -- what schedules() returns ------------------------------------------------------------------


@dataclass(slots=True)
class ScheduleInfo:
    """A schedule as stored: what ``schedules()`` returns and ``corral schedules`` prints."""

    id: str
    name: str
    """The name of the jobs it makes (their handler)."""
    data: JSON
    queue: str
    cron: str | None
    every_s: float | None
    tz: str | None
    next_run_at: datetime | None
    """The slot of its pending job (in the past if no worker has run it yet); ``None`` when it
    has none: its ``limit`` or ``end_at`` was reached."""
    runs: int
    """Jobs it made that have started (the pending one not counted)."""
    limit: int | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    priority: int = 0
    attempts: int = 1
    backoff: Retry | None = None

    def same_as(self, schedule: NewSchedule) -> bool:
        """Whether writing ``schedule`` would change nothing."""
        rule, job = schedule.rule, schedule.job
        every_s = rule.every_ms / 1000 if rule.every_ms is not None else None
        return (
            (self.name, self.data, self.cron, self.every_s, self.tz, self.limit)
            == (job.name, decode_lenient(job.data_json), rule.cron, every_s, rule.tz, rule.limit)
            and (self.start_at, self.end_at)
            == (ms_to_datetime(rule.start_ms), ms_to_datetime(rule.end_ms))
            and (self.priority, self.attempts, self.backoff)
            == (job.priority, job.attempts, job.backoff)
        )


class QueueSchedules:
    """A queue's schedules; :class:`~corral.service.QueueService` inherits them."""

    build_job: Callable[..., NewJob]

    @property
    def backend(self) -> QueueBackend:
        raise NotImplementedError

    def build_schedule(
        self, schedule_id: str, name: str, data: Any = None, **options: Any
    ) -> NewSchedule:
        """Check a schedule (:meth:`schedule`'s arguments); raise before anything is written."""
        return build_schedule(schedule_id, name, data, self.build_job, options)

    async def schedule(
        self,
        schedule_id: str,
        name: str,
        data: Any = None,
        *,
        cron: str | None = None,
        every_s: float | None = None,
        tz: str | None = None,
        limit: int | None = None,
        start_at: datetime | None = None,
        end_at: datetime | None = None,
        **options: Any,
    ) -> ScheduleInfo:
        """Create or replace the schedule ``schedule_id``: jobs ``name`` with ``data``, one per
        time slot, while a worker of the queue runs; return it as stored.

        Exactly one of ``cron`` (5 fields, or 6 with the second first, as Node.js BullMQ reads
        them; in ``tz``, UTC by default) and ``every_s`` (the first run is now, or at
        ``start_at``). ``limit`` caps the runs counted from this call; ``start_at`` and
        ``end_at`` (aware datetimes) bound them; ``options`` are :meth:`enqueue`'s
        (``priority``, ``attempts``, ``backoff``), for every job. Writing it again replaces it;
        an unchanged interval keeps its phase. See :mod:`corral.schedules`.

        Raises:
            ConfigError: a bad id, cron pattern (naming the field), zone, interval, limit or
                dates; PayloadError: bad data or job options. Nothing was written.
        """
        rule: dict[str, Any] = {"cron": cron, "every_s": every_s, "tz": tz, "limit": limit}
        rule.update(start_at=start_at, end_at=end_at)
        built = self.build_schedule(schedule_id, name, data, **rule, **options)
        await self.backend.upsert_schedule(built)
        (stored,) = await self.backend.list_schedules(schedule_id)
        return stored

    async def unschedule(self, schedule_id: str) -> bool:
        """Delete a schedule and its pending job (a job of it already running finishes);
        ``False`` if there was none."""
        return await self.backend.remove_schedule(schedule_id)

    async def schedules(self) -> list[ScheduleInfo]:
        """The queue's schedules, the next to run first (Node.js BullMQ's job schedulers
        included)."""
        return await self.backend.list_schedules()

    async def get_schedule(self, schedule_id: str) -> ScheduleInfo | None:
        """The schedule ``schedule_id``, or ``None``."""
        found = await self.backend.list_schedules(schedule_id)
        return found[0] if found else None

    def _build_periodic(self, declared: Periodic) -> NewSchedule:
        return self.build_schedule(
            declared.schedule_id, declared.name, declared.data, **declared.options
        )
