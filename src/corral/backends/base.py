"""The QueueBackend seam: the few primitives every storage engine implements.

Everything else (payload validation, defaults, handler lookup, timeouts, retry arithmetic,
logging, the CLI) lives once above this seam, in :mod:`corral.service`, :mod:`corral._consumer`
and :mod:`corral.cli`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence

from corral.message import Dispatch, JobInfo, JobState, NewJob
from corral.settings import QueueSettings


class QueueBackend(ABC):
    """Storage and delivery of the jobs of one queue.

    A backend is bound to one queue (``settings.name``); it may write to other queues only for
    dead letters (``NewJob.queue``). Methods are coroutines; a backend connects lazily on first
    use and :meth:`close` releases everything it holds. Errors of the underlying driver are
    raised as :class:`~corral.errors.BackendError` (or ``BackendConnectionError``) with the
    driver error chained; no driver error, and no secret, reaches a caller unwrapped.

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

    # -- consuming -------------------------------------------------------------------------

    @abstractmethod
    async def start_consuming(
        self,
        dispatch: Dispatch,
        *,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool = False,
    ) -> None:
        """Deliver jobs to ``dispatch`` until ``stop`` is set, then shut down in phases.

        - At most ``concurrency`` deliveries run at once. Each holds a lease that the backend
          keeps alive while ``dispatch`` runs; the backend applies the returned
          :data:`~corral.message.Outcome` only while it still holds that lease.
        - A paused queue delivers nothing new; in-flight jobs finish.
        - Once ``stop`` is set no job is claimed; in-flight deliveries get
          ``settings.shutdown_grace_s`` to finish, then are cancelled and released (returned to
          waiting without using an attempt). Then the method returns.
        - ``burst=True``: also return once no job is ready to run and none is in flight; delayed
          jobs not yet due stay for a later worker.
        - A job that cannot be read (corrupt or foreign data) is failed with the reason and never
          reaches ``dispatch``.
        """

    # -- managing --------------------------------------------------------------------------

    @abstractmethod
    async def get_job(self, job_id: str) -> JobInfo | None:
        """The job with ``job_id`` in this queue, or ``None`` if there is none."""

    @abstractmethod
    async def list_jobs(
        self, state: JobState, *, limit: int = 50, offset: int = 0
    ) -> list[JobInfo]:
        """Jobs in ``state``: waiting/delayed in delivery order, finished ones newest first."""

    @abstractmethod
    async def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state is a key, zero included)."""

    @abstractmethod
    async def retry_failed(self, *, limit: int | None = None) -> int:
        """Move failed jobs back to waiting with a fresh set of attempts; return how many."""

    @abstractmethod
    async def remove(self, job_id: str) -> bool:
        """Delete a job that is not active. ``False`` if there was none.

        Raises:
            BackendError: the job is active (held by a worker); remove it once it finishes.
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
        finish. Return how many were deleted."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and files. Idempotent; returns promptly even if the storage is
        unreachable."""


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
