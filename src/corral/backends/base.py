"""The seam between corral and its storage engines.

- :class:`QueueBackend`: what the service and the CLI call (enqueue, deliver, manage).
- :class:`PullBackend` and :class:`PullSource`: how a backend that delivers by *pulling* (claim a
  job with a lease, run it, settle it) plugs into the one worker loop,
  :mod:`corral.backends._consume`.
  Both backends are pull backends; a backend gives one :class:`PullSource` per queue it serves and
  gets the whole delivery contract of :meth:`QueueBackend.start_consuming` from that loop.

Everything else (payload and option checks, defaults, handler lookup, timeouts, retry arithmetic,
logging, the CLI) lives once above this seam, in :mod:`corral.service` and :mod:`corral.cli`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from corral.backends._consume import consume
from corral.message import (
    Child,
    Dispatch,
    Event,
    FlowEntry,
    FlowWrite,
    ImportOutcome,
    JobInfo,
    JobRecord,
    JobSearch,
    JobState,
    NewJob,
    Outcome,
    QueueMessage,
)
from corral.metrics import Throughput
from corral.schedules import NewSchedule, ScheduleInfo
from corral.settings import QueueSettings
from corral.workers import WorkerInfo, WorkerStats

H = TypeVar("H")
"""The backend-private handle a claim carries from claim to settle (a row id, a raw job)."""


class QueueBackend(ABC):
    """Storage and delivery of jobs, bound to one queue (``settings.name``).

    A backend connects lazily on first use and :meth:`close` releases everything it holds.
    :meth:`for_queue` gives a backend of another queue on the same storage and connection (a
    worker of several queues, dead letters, flows). Errors of the underlying driver are raised as
    :class:`~corral.errors.BackendError` (or ``BackendConnectionError``) with the driver error
    chained; no driver error, and no secret, reaches a caller unwrapped.

    Delivery is at-least-once. A job is never deleted when it is fetched: a worker *claims* it,
    which gives it a lease (a token and an expiry, or BullMQ's lock). Only the holder of a live
    lease may settle the job (complete it, fail it, schedule a retry, release it). A lease that
    expired may already have been given to another worker: a stale holder that tries to settle
    gets :class:`~corral.errors.LeaseLostError` and the job is left exactly as it is. A job whose
    lease expired is delivered again; a job whose lease expired more than ``settings.max_stalls``
    times is failed ("stalled"), so a job that kills its worker is not delivered for ever.
    """

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings

    @property
    def queue_name(self) -> str:
        """The queue this backend serves."""
        return self.settings.name

    def for_queue(self, name: str, settings: QueueSettings | None = None) -> QueueBackend:
        """A backend of queue ``name`` on the same storage, sharing this one's connection.

        ``settings`` (for that queue: its lease, dead letter, limits) default to this backend's
        with the name changed; they must name the same storage. The new backend lives as long
        as this one: closing it alone releases nothing shared.

        Raises:
            ConfigError: ``name`` is not a usable queue name.
        """
        if settings is None:
            if name == self.queue_name:
                return self
            settings = self.settings.with_name(name)
        return self._sibling(settings)

    @abstractmethod
    def _sibling(self, settings: QueueSettings) -> QueueBackend:
        """A backend with ``settings`` (another queue) on this one's connection."""

    # -- producing -------------------------------------------------------------------------

    @abstractmethod
    async def enqueue(self, jobs: Sequence[NewJob]) -> list[str]:
        """Write ``jobs`` and return their ids, in order.

        Atomic: either every job of the call is written or none is (a failure raises and leaves
        the queue as it was). A job with ``delay_ms > 0`` is *delayed* until then, otherwise
        *waiting*. Waiting jobs are delivered by ``priority`` (lower first; 0, the default, comes
        before any positive priority, as in BullMQ) and in enqueue order within a priority.

        Duplicate ids: when a job with ``job_id`` already exists in the target queue (in any
        state, until it is removed), nothing is written for it and the existing id is returned;
        the existing job is not changed.
        """

    @abstractmethod
    async def enqueue_flow(self, entries: Sequence[FlowEntry]) -> FlowWrite:
        """Write a flow: ``entries`` in pre-order (each parent before its children), every job
        with its ``queue`` set; the queues are any of this storage. Return the ids written.

        Atomic, as :meth:`enqueue`: every job of the flow or none. A job with children is
        *waiting-children* until each child has *settled*; then it is released (waiting, or
        delayed by its ``delay_ms`` counted from then) and runs like any job. A child settles
        when it completes (its result is recorded for the parent, and kept after the child
        itself is removed or trimmed) or fails for good, when its ``on_failure`` applies:

        - ``FAIL``: the failure is recorded and the parent is released at once to fail without
          running (its reason: ``child <queue>:<id> failed``, BullMQ's ``defa``); the parent's
          own failure then applies to its parent.
        - ``CONTINUE``: the failure is recorded and the parent is released at once, even with
          other children pending.
        - ``IGNORE``: the failure is recorded; the parent is released once no child is pending.
        - ``REMOVE``: nothing is recorded; the parent is released once no child is pending.

        Settling a child and releasing its parent happen in one atomic step with recording the
        child's outcome: no crash can leave a parent waiting for a child that has settled. A
        parent cannot complete while a child is pending or failed it: settling it ``Completed``
        then raises :class:`~corral.errors.ChildrenPendingError` and changes nothing (the
        worker loop fails that attempt instead). A child retried by :meth:`retry_failed` is
        pending again for its parent; removing a pending child releases its parent if it was
        the last one.

        Existing ids: if the root's ``job_id`` names an existing job, nothing is written and the
        result says so (``existed``). A non-root ``job_id`` naming an existing job that belongs
        to no flow *attaches* that job as the child (completed: its result counts at once;
        otherwise the parent waits for it) and its entries below are not written (``None``).

        Raises:
            PayloadError: a ``job_id`` names a job that already has a parent, or one that failed;
                nothing was written.
        """

    # -- consuming -------------------------------------------------------------------------

    @abstractmethod
    async def start_consuming(
        self,
        dispatch: Dispatch,
        *,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool = False,
        queues: Sequence[QueueSettings] | None = None,
        total_concurrency: int | None = None,
    ) -> None:
        """Deliver jobs to ``dispatch`` until ``stop`` is set, then shut down in phases.

        - ``queues``: the queues to serve, each with its own settings (name, concurrency, lease,
          limits), on this backend's storage; by default this backend's queue at
          ``concurrency``. ``total_concurrency`` caps the deliveries of all queues together.
          Each queue's pause and rate limit hold on their own.
        - At most that many deliveries run at once. Each holds a lease that the backend keeps
          alive while ``dispatch`` runs; the backend applies the returned
          :data:`~corral.message.Outcome` only while it still holds that lease.
        - A paused queue delivers nothing new; in-flight jobs finish.
        - Once ``stop`` is set no job is claimed; in-flight deliveries get
          ``settings.shutdown_grace_s`` to finish, then are cancelled and released (returned to
          waiting without using an attempt). Then the method returns.
        - ``burst=True``: also return once no job is ready to run and none is in flight; delayed
          jobs not yet due stay for a later worker.
        - A job that cannot be read (corrupt or foreign data) is failed with the reason and never
          reaches ``dispatch``.
        - Schedules (:meth:`upsert_schedule`): when a claim makes the job of a schedule's
          current slot active, the backend writes the job of the schedule's next slot before
          ``dispatch`` sees it, atomically with the claim where the storage allows (SQLite) and
          otherwise right after it (BullMQ's ``updateJobScheduler``, as Node.js workers call it).
          A job that is not the current one (a retry, a redelivery, an earlier slot) writes
          nothing, and a slot's job id exists once, so each slot gets one job however many
          workers run. A job of a schedule is never failed for stalling while the schedule
          exists.
        """

    # -- managing --------------------------------------------------------------------------
    # The reads (get_job, list_jobs, search_jobs, counts, is_paused, list_queues) write
    # nothing: looking at a queue, even one that does not exist, leaves the storage as it was.

    @abstractmethod
    async def get_job(self, job_id: str) -> JobInfo | None:
        """The job with ``job_id`` in this queue, or ``None`` if there is none."""

    @abstractmethod
    async def open_events(self) -> EventFeed:
        """A reader of this queue's events (see :class:`EventFeed`); the caller closes it.

        Events are written atomically with the change they tell of, so a reader never sees an
        event of a change that was rolled back, nor a change without its event.
        """

    async def watch_job(self, job_id: str) -> JobWatch:
        """Start watching the job ``job_id`` for changes (how :func:`corral.results.wait_for`
        sleeps between two reads of it); the caller closes it.

        A watch is opened *before* the caller reads the job: any change committed after this
        call returns, from a later :meth:`JobWatch.wait`, whichever process made it, so a job
        that finishes between the read and the wait is never missed. It writes nothing. The
        default polls; backends override it with their own wake-ups.
        """
        return JobWatch()

    @abstractmethod
    async def children(self, job_id: str) -> list[Child]:
        """The children of the job ``job_id`` of this queue, with their status for it; empty for
        a job without children, or no such job. Settled children come with their result or
        error, also after the child job itself was removed; removed pending ones are gone."""

    @abstractmethod
    async def list_jobs(
        self, state: JobState, *, limit: int = 50, offset: int = 0
    ) -> list[JobInfo]:
        """Jobs in ``state``: waiting/delayed in delivery order, finished ones newest first."""

    @abstractmethod
    async def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state is a key, zero included)."""

    @abstractmethod
    async def throughput(self, *, minutes: int = 60) -> Throughput:
        """Jobs of this queue that workers completed and failed in each of the last ``minutes``
        minutes, the current one last (zeros where nothing was recorded).

        Workers count a job when they settle it for good (completed, or failed with no attempt
        left; a stalled job failed by housekeeping is not counted, as in BullMQ), unless their
        ``metrics_minutes`` is 0; the points older than ``metrics_minutes`` are dropped.
        """

    @abstractmethod
    async def workers(self, *, every_queue: bool = False) -> list[WorkerInfo]:
        """The live workers of this queue (``every_queue``: of every queue on the storage).

        SQLite lists the heartbeat rows of worker loops not stale; BullMQ the named worker
        connections of ``CLIENT LIST``, as Node's ``Queue.getWorkers()`` (see
        :mod:`corral.workers`). A read: it writes nothing.
        """

    @abstractmethod
    async def retry_failed(self, *, limit: int | None = None) -> int:
        """Move failed jobs back to waiting with a fresh set of attempts; return how many."""

    @abstractmethod
    async def retry_job(self, job_id: str) -> bool:
        """Move one failed job back to waiting with a fresh set of attempts, as
        :meth:`retry_failed` does; ``False`` if there is no failed job with that id (a job in
        another state is left as it is)."""

    @abstractmethod
    async def clean(self, state: JobState, *, older_than_ms: int = 0, keep: int = 0) -> int:
        """Delete jobs of the finished ``state`` (completed or failed, checked by the caller)
        that finished at least ``older_than_ms`` ago, except the newest ``keep`` of that state;
        return how many were deleted.

        Deletes in batches of short writes, so workers are not held up while a large set is
        cleaned; jobs that finish meanwhile are newer than the cut-off and stay.
        """

    @abstractmethod
    async def search_jobs(
        self, state: JobState, *, name: str, offset: int = 0, limit: int = 50, window: int = 10_000
    ) -> JobSearch:
        """Jobs in ``state`` whose name contains ``name`` (case-insensitive), in
        :meth:`list_jobs` order, looking at the ``window`` jobs from position ``offset`` on.

        Bounded on purpose: neither backend indexes names, so one call reads at most ``window``
        names. It stops early once ``limit`` jobs matched; :attr:`JobSearch.next_offset` says
        where the next call continues (``None`` once the end of the state was reached).
        """

    @abstractmethod
    async def list_queues(self) -> list[str]:
        """Every queue on this backend's storage, sorted by name: each queue holding jobs in
        any state or paused, whoever wrote it (on Redis, queues under ``settings.prefix`` that
        only Node.js writes to as well).

        SQLite answers from its indexes (a step per queue). Redis has no list of queues: the
        keyspace is scanned (SCAN in small steps, never KEYS) for the queues' ``meta`` hashes,
        which takes time in proportion to the keys in the database (seconds for millions), so
        callers that show it often cache it.
        """

    @abstractmethod
    async def remove(self, job_id: str) -> bool:
        """Delete a job that is not active. ``False`` if there was none.

        Raises:
            JobActiveError: the job is active (held by a worker); remove it once it finishes.
            ScheduleConflictError: the job is a schedule's pending job; remove the schedule.
        """

    @abstractmethod
    async def request_cancel(self, job_id: str, reason: str) -> bool:
        """Ask the worker running the active job ``job_id`` to stop it; ``False`` if the job is
        not active. Any process may ask.

        The request is stored with the job and bound to its current lease, the attempt running
        now: the worker holding that lease finds it with :meth:`PullSource.cancel_requests`
        at its next lease renewal, and fails the attempt with ``reason`` and no retry; a later
        attempt (after a redelivery) is not affected.
        """

    @abstractmethod
    async def promote(self, job_id: str) -> bool:
        """Make a delayed job due now (it waits in its priority's place); ``False`` if there is
        no delayed job with that id."""

    # -- schedules -------------------------------------------------------------------------

    @abstractmethod
    async def upsert_schedule(self, schedule: NewSchedule) -> None:
        """Write ``schedule`` and the job of its first slot, replacing a schedule with its id.

        Atomic. The replaced schedule's pending job (not yet started) is deleted; a started one
        is left to finish. An interval schedule whose interval is unchanged keeps its pending
        slot (the job is rewritten with the new template), so writing the same schedule twice
        changes nothing; a new interval starts a new phase at once (or at ``start_at``). A cron
        schedule's first slot is the first matching time after now (and ``start_at``).
        Concurrent writes of one schedule leave exactly one pending job.

        Raises:
            ScheduleConflictError: the slot to write already holds a started or finished job
                (a cron schedule written again while its job of that second runs).
        """

    @abstractmethod
    async def remove_schedule(self, schedule_id: str) -> bool:
        """Delete a schedule and its pending job; ``False`` if there was none. A job of it that
        has started finishes, and writes no next job."""

    @abstractmethod
    async def list_schedules(self, schedule_id: str | None = None) -> list[ScheduleInfo]:
        """The queue's schedules (or the one with ``schedule_id``), the next to run first.

        Schedules written by others in the backend's layout (Node.js BullMQ's job schedulers)
        are listed too; legacy BullMQ repeatable jobs are not.
        """

    @abstractmethod
    async def pause(self) -> None:
        """Stop delivering jobs of this queue to every worker; enqueue keeps working."""

    @abstractmethod
    async def resume(self) -> None:
        """Undo :meth:`pause`."""

    @abstractmethod
    async def is_paused(self) -> bool:
        """Whether the queue is paused."""

    @abstractmethod
    async def purge(self) -> int:
        """Delete every waiting, delayed, completed and failed job; active jobs are left to
        finish, and so are the schedules' current jobs (as BullMQ's clean does). Return how
        many were deleted."""

    # -- moving between queues and backends --------------------------------------------------

    @abstractmethod
    async def export_jobs(self, state: JobState, *, limit: int, offset: int = 0) -> list[JobRecord]:
        """Up to ``limit`` jobs of this queue in ``state``, skipping the first ``offset``.

        ``state`` is ``waiting`` (delivery order: priority, then enqueue order), ``delayed``
        (due order) or ``failed`` (oldest failure first); any other state raises ``ValueError``.
        A read only: nothing changes, and a job that changes state meanwhile may be missed or
        returned in its old state (:meth:`remove_exported` is fenced on that state). Each record
        holds everything :meth:`import_jobs` needs to recreate the job on any backend.
        """

    @abstractmethod
    async def import_jobs(
        self, records: Sequence[JobRecord], *, dry_run: bool = False
    ) -> list[ImportOutcome]:
        """Recreate ``records`` as jobs of this queue, each in its state, with its id; return
        what happened to each, in order.

        A created job has the record's id, name, data text, priority, max attempts, backoff,
        attempts made, enqueue time, error and tracebacks, progress and logs; a delayed one is
        due at ``run_at_ms`` (already due: the next claim runs it), a failed one is failed at
        ``finished_at_ms`` and can be retried. Queue-assigned (integer) ids are kept too, and
        the ids this queue assigns later never reuse them.

        Idempotent by id: a record whose id exists in this queue (any state) is not written;
        its outcome is ``PRESENT`` if that job has the same name and data (an earlier copy),
        else ``CONFLICT``. Existence is checked and the job written atomically, so a job
        created concurrently under the same id is never overwritten. A call is atomic per
        record; on an error, records already created stay (re-running is safe). With
        ``dry_run`` nothing is written and the outcomes are those a real call would have now.
        """

    @abstractmethod
    async def remove_exported(self, records: Sequence[JobRecord]) -> list[bool]:
        """Delete each record's job from this queue if it is still in the record's state;
        return, in order, whether it was deleted.

        Fenced: a job that left that state since it was read (claimed by a worker, promoted,
        retried, removed) is left as it is and gives ``False``, so a job that started running
        is never deleted under its worker.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release connections and files. Idempotent; returns promptly even if the storage is
        unreachable."""


class EventFeed(ABC):
    """The events of one queue, oldest first, each with a position that only grows.

    The store keeps a bounded number (BullMQ's ``maxLenEvents``, SQLite's ``events_max_len``):
    a reader that falls further behind than that misses the oldest, which nothing else does.
    Reading writes nothing and holds up no producer or worker.
    """

    START = "0"
    """The position before the first event ever written."""

    @abstractmethod
    async def last_id(self) -> str:
        """The position of the newest event (:attr:`START` if there is none): reading after it
        gives every event written from now on."""

    @abstractmethod
    async def read(self, after: str, *, block_s: float, count: int) -> list[Event]:
        """Up to ``count`` events after position ``after``, oldest first; if there is none yet,
        wait up to ``block_s`` for one (an empty list then)."""

    async def aclose(self) -> None:  # noqa: B027 (optional: most readers hold nothing)
        """Release what the reader holds (a connection of its own)."""


@dataclass(frozen=True, slots=True)
class JobEnd:
    """How a job ended, as a backend's events told it (the job itself may be removed since)."""

    completed: bool
    result: Any = None
    reason: str = ""


class JobWatch:
    """Wake-ups for changes of one job (see :meth:`QueueBackend.watch_job`).

    This base class polls every ``poll_s``: correct for any backend, if slow to notice.
    """

    poll_s = 0.5

    ended: JobEnd | None = None
    """The job's end, when the backend's wake-ups carry it (BullMQ's ``completed`` and
    ``failed`` events): what a waiter reports if the job was removed as it finished."""

    tells_end = False
    """Whether :attr:`ended` is set by this kind of watch."""

    async def wait(self, timeout_s: float) -> None:
        """Return once the job may have changed since the last return (or since the watch
        was opened), or after ``timeout_s``. May return early: the caller reads the job again."""
        await asyncio.sleep(max(0.0, min(timeout_s, self.poll_s)))

    async def aclose(self) -> None:
        """Release what the watch holds (a connection of its own)."""


@dataclass(eq=False, slots=True)
class Claim(Generic[H]):
    """A job this worker holds a lease on.

    ``message`` is ``None`` when the job must fail without running: ``deferred_failure`` says
    why when the job was marked to fail (a child failed it, or it stalled too often), else
    ``unreadable`` says what in it cannot be read. ``handle`` is the backend's own state carried
    from claim to settle.
    """

    job_id: str
    token: str
    message: QueueMessage | None
    handle: H
    unreadable: str | None = None
    deferred_failure: str | None = None


class PullSource(ABC, Generic[H]):
    """One queue's jobs, as a pull backend gives them to the worker loop.

    The loop owns the claims: it keeps every claim it holds (running or buffered) in the
    heartbeat's renewals and gives each back with :meth:`settle`, so a source keeps no claims of
    its own.
    """

    queue: str
    lease_s: float

    @abstractmethod
    async def claim(self, max_jobs: int) -> list[Claim[H]]:
        """Atomically lease up to ``max_jobs`` ready jobs (none if the queue is paused)."""

    @abstractmethod
    async def settle(
        self, claim: Claim[H], outcome: Outcome, *, fetch_next: bool = False
    ) -> list[Claim[H]]:
        """Apply ``outcome`` if ``claim``'s lease is still held, else raise LeaseLostError.

        ``Completed`` for a parent with children pending (or that failed it) raises
        ChildrenPendingError and changes nothing; the lease is still held.

        With ``fetch_next`` the source may lease the next ready job in the same round trip
        (BullMQ's fetch-next) and return it: the caller then holds it as if it came from
        :meth:`claim`.
        """

    @abstractmethod
    async def extend(self, claims: Sequence[Claim[H]]) -> list[Claim[H]]:
        """Push the leases of ``claims`` ``lease_s`` into the future; return those already lost."""

    @abstractmethod
    async def wait_for_work(self, timeout_s: float) -> None:
        """Return when a job may be ready, or after ``timeout_s`` (a hint; may return early)."""

    async def cancel_requests(self, claims: Sequence[Claim[H]]) -> dict[Claim[H], str]:
        """Those of ``claims`` whose attempt was asked to stop
        (:meth:`QueueBackend.request_cancel`), with the reason; read at every lease renewal.
        A request for another lease of the same job does not count. None by default."""
        return {}

    async def maintain(self) -> None:
        """Periodic housekeeping (stalled jobs, promotions); called about every ``lease_s / 3``."""

    async def beat(self, stats: WorkerStats, *, leaving: bool = False) -> None:
        """Record that the worker loop ``stats`` describes is alive (``leaving``: that it
        stops). Called on one source of the loop when it starts, every ``stats.beat_s``, and
        when it stops; a backend whose connections show its workers records nothing."""

    def wake(self) -> None:
        """Interrupt a pending :meth:`wait_for_work` (a job was enqueued in this process)."""

    async def aclose(self) -> None:
        """Release what the source opened for waiting (a blocking connection)."""


class PullBackend(QueueBackend):
    """A backend that delivers through :class:`PullSource` objects and the shared worker loop."""

    def for_queue(self, name: str, settings: QueueSettings | None = None) -> PullBackend:
        backend = super().for_queue(name, settings)
        assert isinstance(backend, PullBackend)
        return backend

    @abstractmethod
    def open_source(self, *, stop: asyncio.Event, burst: bool) -> PullSource[Any]:
        """The worker side of this backend's queue for one run of :meth:`start_consuming`."""

    async def start_consuming(
        self,
        dispatch: Dispatch,
        *,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool = False,
        queues: Sequence[QueueSettings] | None = None,
        total_concurrency: int | None = None,
    ) -> None:
        served = (
            list(queues)
            if queues
            else [self.settings.model_copy(update={"concurrency": concurrency})]
        )
        sources = [
            (self.for_queue(each.name, each).open_source(stop=stop, burst=burst), each.concurrency)
            for each in served
        ]
        try:
            await consume(
                sources,
                dispatch,
                total=total_concurrency,
                stop=stop,
                burst=burst,
                shutdown_grace_s=max(each.shutdown_grace_s for each in served),
            )
        finally:
            for source, _ in sources:
                await source.aclose()


def dead_letter_id(queue: str, job_id: str) -> str:
    """The id of a job's dead-lettered copy, the same on every backend: fixed, so a failure
    recorded twice (at-least-once) adds the copy once."""
    return f"{queue}.{job_id}"


def dead_letter_note(queue: str, job_id: str, attempts_made: int, reason: str) -> str:
    """The log line a dead-lettered copy carries: where it came from and why."""
    return (
        f"dead-lettered from queue {queue!r} job {job_id} after {attempts_made} attempt(s): "
        f"{reason}"
    )


def name_matches(needle: str, name: str) -> bool:
    """How :meth:`QueueBackend.search_jobs` matches a job's name, the same on every backend."""
    return needle.casefold() in name.casefold()
