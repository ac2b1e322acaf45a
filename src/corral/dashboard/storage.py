"""What the dashboard reads and changes: one storage (a SQLite file, or a Redis prefix) and
every queue on it, through the :class:`~corral.backends.base.QueueBackend` seam.

This is the one place the pages get their data from. A capability that a later version of corral
adds (worker heartbeats, per-minute metrics, schedules, flows) is one method here, filled in
from the seam, and one panel or page that shows it when the method returns something.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from corral.backends.base import QueueBackend
from corral.message import STATE_ORDER, JobInfo, JobState
from corral.metrics import Throughput
from corral.schedules import SLOT_JOB_PREFIX, ScheduleInfo, slot_job_id, slot_of
from corral.service import QueueService
from corral.settings import QueueSettings
from corral.workers import WorkerInfo

logger = logging.getLogger("corral.dashboard")
T = TypeVar("T")
MAX_CHILDREN_SHOWN = 200


def states() -> list[JobState]:
    """Every state, in :data:`STATE_ORDER` and then any other the enum has."""
    return [*STATE_ORDER, *(state for state in JobState if state not in STATE_ORDER)]


@dataclass(slots=True)
class QueueSummary:
    """One queue as the overview shows it."""

    name: str
    counts: dict[JobState, int]
    paused: bool
    workers: int | None = None
    """Live workers of the queue; ``None`` where worker heartbeats are not recorded."""
    throughput: Throughput | None = None
    """Completed and failed per minute; ``None`` where no metrics are recorded."""
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class LinkedJob:
    """Another job a job page links to (its parent, a child)."""

    queue: str
    id: str
    name: str | None = None
    state: JobState | None = None
    """Where the job is now; ``None`` when it is gone (a child's outcome outlives it)."""
    status: str | None = None
    """A child's status for its parent: pending, completed, ignored or failed."""


@dataclass(slots=True)
class Related:
    """What a job page shows about the job's relations."""

    parent: LinkedJob | None = None
    children: list[LinkedJob] = field(default_factory=list)
    more_children: int = 0
    """Children beyond those listed."""
    schedule: str | None = None
    """The id of the schedule that made the job."""

    @property
    def empty(self) -> bool:
        return self.parent is None and not self.children and self.schedule is None


class Storage:
    """The dashboard's storage: a backend per queue, sharing one connection, and the list of
    queues, which is cached since on Redis it costs a keyspace scan."""

    def __init__(
        self, settings: QueueSettings, *, queues_ttl_s: float = 30.0, counts_ttl_s: float = 2.0
    ) -> None:
        self.settings = settings
        self.service = QueueService(settings)
        self.queues_ttl_s = queues_ttl_s
        self.counts_ttl_s = counts_ttl_s
        self._counts: dict[str, tuple[dict[JobState, int], float]] = {}
        self._counting: dict[str, asyncio.Task[dict[JobState, int]]] = {}
        self._counter: QueueService | None = None  # SQLite: its own connection, off the loop
        self._counter_lock = threading.Lock()
        self._backends: dict[str, QueueBackend] = {}
        self._queues: list[str] | None = None
        self._queues_at = 0.0
        self._refresh: asyncio.Task[list[str]] | None = None
        self._workers: tuple[list[WorkerInfo], float] | None = None

    @property
    def where(self) -> str:
        """Where the jobs are, safe to show: the SQLite file, or Redis without its password."""
        s = self.settings
        if s.backend == "sqlite":
            return f"SQLite {s.sqlite_path}"
        return f"Redis {s.redis_url_redacted} prefix {s.prefix}"

    def backend(self, queue: str) -> QueueBackend:
        """The backend of ``queue`` on this storage."""
        backend = self._backends.get(queue)
        if backend is None:
            if len(self._backends) > 1000:  # names typed into URLs must not grow this for ever
                self._backends.clear()
            backend = self._backends[queue] = self.service.backend.for_queue(queue)
        return backend

    # -- queues ----------------------------------------------------------------------------

    async def queues(self) -> list[str]:
        """Every queue of the storage; a list older than ``queues_ttl_s`` is served while a
        fresh one is read in the background."""
        if self._queues is None:
            return await self._read_queues()
        if time.monotonic() - self._queues_at > self.queues_ttl_s:
            running = self._refresh
            loop = asyncio.get_running_loop()
            if running is None or running.done() or running.get_loop() is not loop:
                self._refresh = _background(loop, self._read_queues())
        return self._queues

    async def _read_queues(self) -> list[str]:
        found = await self.service.backend.list_queues()
        self._queues, self._queues_at = found, time.monotonic()
        return found

    def known(self, queue: str) -> None:
        """``queue`` exists now (a job was just written to it): list it without a new scan."""
        if self._queues is not None and queue not in self._queues:
            self._queues = sorted([*self._queues, queue])

    async def counts(self, queue: str) -> dict[JobState, int]:
        """The queue's jobs per state, at most ``counts_ttl_s`` old; older counts are served
        while fresh ones are read in the background.

        SQLite counts a state by walking its index, which takes about a third of a second for a
        million jobs: every page shows counts, and auto-refresh asks for pages all the time, so
        each queue is counted at most once per ``counts_ttl_s`` however many pages are viewed.
        """
        cached = self._counts.get(queue)
        if cached is None:
            return await self._count(queue)
        if time.monotonic() - cached[1] > self.counts_ttl_s:
            running = self._counting.get(queue)
            loop = asyncio.get_running_loop()
            if running is None or running.done() or running.get_loop() is not loop:
                self._counting[queue] = _background(loop, self._count(queue))
        return cached[0]

    async def _count(self, queue: str) -> dict[JobState, int]:
        if self.settings.backend == "sqlite":
            # SQLite reads block their thread (the GIL is released meanwhile): a long count
            # runs off the event loop, which may be an application's that mounts the dashboard.
            counts = await asyncio.to_thread(self._count_in_thread, queue)
        else:
            counts = await self.backend(queue).counts()
        if len(self._counts) > 1000:
            self._counts.clear()
        self._counts[queue] = (counts, time.monotonic())
        return counts

    def _count_in_thread(self, queue: str) -> dict[JobState, int]:
        with self._counter_lock:
            if self._counter is None:
                self._counter = QueueService(self.settings)
            return asyncio.run(self._counter.backend.for_queue(queue).counts())

    def changed(self, queue: str) -> None:
        """Count ``queue`` afresh next time (an action just changed it)."""
        self._counts.pop(queue, None)

    async def summary(self, queue: str) -> QueueSummary:
        backend = self.backend(queue)
        counts = await self.counts(queue)
        return QueueSummary(
            name=queue,
            counts=counts,
            paused=await backend.is_paused(),
            workers=await self.workers(queue),
            throughput=await self.throughput(queue),
        )

    async def summaries(self) -> list[QueueSummary]:
        return [await self.summary(queue) for queue in await self.queues()]

    # -- capabilities of later versions -----------------------------------------------------

    async def workers(self, queue: str) -> int | None:
        """Live workers of ``queue`` (see :meth:`all_workers`)."""
        return sum(1 for worker in await self.all_workers() if queue in worker.queues)

    async def all_workers(self) -> list[WorkerInfo]:
        """The live workers of every queue, read at most every ``counts_ttl_s`` (on Redis a
        ``CLIENT LIST``, which every queue's count shares)."""
        cached = self._workers
        if cached is not None and time.monotonic() - cached[1] <= self.counts_ttl_s:
            return cached[0]
        found = await self.service.backend.workers(every_queue=True)
        self._workers = (found, time.monotonic())
        return found

    async def throughput(self, queue: str) -> Throughput | None:
        """Completed and failed jobs per minute over the last hour, as workers record them;
        ``None`` when these settings turn metrics off (``metrics_minutes`` 0: the chart is
        then left out)."""
        if not self.settings.metrics_minutes:
            return None
        return await self.backend(queue).throughput(minutes=min(60, self.settings.metrics_minutes))

    async def related(self, job: JobInfo) -> Related:
        """The job's parent and children in a flow, and the schedule that made it."""
        parent = None
        if job.parent is not None:
            found = await self.backend(job.parent.queue).get_job(job.parent.id)
            parent = LinkedJob(
                job.parent.queue,
                job.parent.id,
                found.name if found else None,
                found.state if found else None,
            )
        children = await self.backend(job.queue).children(job.id)
        shown = [
            LinkedJob(child.queue, child.id, child.name, status=child.status.value)
            for child in children[:MAX_CHILDREN_SHOWN]
        ]
        return Related(
            parent=parent,
            children=shown,
            more_children=max(0, len(children) - MAX_CHILDREN_SHOWN),
            schedule=schedule_of(job.id),
        )

    # -- schedules -------------------------------------------------------------------------

    async def schedules(self, queue: str) -> list[ScheduleInfo]:
        """The queue's schedules, the next to run first (Node.js BullMQ's job schedulers
        included)."""
        return await self.backend(queue).list_schedules()

    async def close(self) -> None:
        refresh, self._refresh = self._refresh, None
        tasks = [refresh, *self._counting.values()]
        self._counting.clear()
        for task in tasks:
            if task is not None and not task.done():
                task.cancel()
        self._backends.clear()
        await self.service.close()
        counter, self._counter = self._counter, None
        if counter is not None:
            await asyncio.to_thread(self._close_counter, counter)

    def _close_counter(self, counter: QueueService) -> None:
        with self._counter_lock:
            asyncio.run(counter.close())


def _background(loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A refresh nobody awaits: its failure is logged (the next page reports it), not lost."""
    task = loop.create_task(work)

    def done(finished: asyncio.Task[T]) -> None:
        if not finished.cancelled() and finished.exception() is not None:
            logger.warning("dashboard: a background refresh failed: %s", finished.exception())

    task.add_done_callback(done)
    return task


def schedule_of(job_id: str) -> str | None:
    """The id of the schedule whose slot job ``job_id`` is (``repeat:<schedule id>:<ms>``)."""
    if not job_id.startswith(SLOT_JOB_PREFIX):
        return None
    schedule_id = job_id[len(SLOT_JOB_PREFIX) :].rpartition(":")[0]
    return schedule_id if schedule_id and slot_of(job_id, schedule_id) is not None else None


def next_job_id(schedule: ScheduleInfo) -> str | None:
    """The id of the schedule's pending job, if it has one."""
    if schedule.next_run_at is None:
        return None
    return slot_job_id(schedule.id, round(schedule.next_run_at.timestamp() * 1000))
