"""Cancelling a job: ``QueueService.cancel`` and ``corral cancel``.

A job not started yet (waiting, delayed, waiting for its children) is removed. An active job
is asked to stop, from any process: the request is stored with the job, bound to the attempt
running now (its lease), and the worker holding it reads it when it renews its leases (every
``lease_s / 3``). An async handler is then cancelled (it may catch ``asyncio.CancelledError``
to clean up); a sync handler, which nothing can interrupt, sees ``message.cancelled`` become
true and should return. Either way the attempt fails as cancelled, with no retry.
"""

from __future__ import annotations

from corral._sync import SyncRunner
from corral.backends.base import QueueBackend
from corral.errors import JobActiveError, PayloadError
from corral.message import JobState
from corral.results import check_job_id

MAX_REASON_LENGTH = 1000


def cancel_reason(reason: str | None) -> str:
    """The error a cancelled attempt fails with."""
    return f"cancelled: {reason}" if reason else "cancelled"


class QueueCancel:
    """Cancelling jobs; :class:`~corral.service.QueueService` inherits it."""

    _sync: SyncRunner

    @property
    def backend(self) -> QueueBackend:
        raise NotImplementedError

    async def cancel(self, job_id: str, reason: str | None = None) -> bool:
        """Cancel the job ``job_id``: remove it if it has not started, else ask its worker to
        stop it (see :mod:`corral.cancel`); ``False`` if it has finished or does not exist.

        Raises:
            ScheduleConflictError: it is a schedule's pending job (unschedule it instead).
        """
        return await cancel_job(self.backend, job_id, reason)

    def cancel_sync(self, job_id: str, reason: str | None = None) -> bool:
        """:meth:`cancel` for synchronous code."""
        return self._sync.run(lambda backend: cancel_job(backend, job_id, reason))


async def cancel_job(backend: QueueBackend, job_id: str, reason: str | None) -> bool:
    """See :meth:`QueueCancel.cancel`."""
    check_job_id(job_id)
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH):
        raise PayloadError(
            f"a cancel reason is a string of at most {MAX_REASON_LENGTH} characters, got {reason!r}"
        )
    info = await backend.get_job(job_id)
    if info is None or info.state in (JobState.COMPLETED, JobState.FAILED):
        return False
    if info.state is not JobState.ACTIVE:
        try:
            return await backend.remove(job_id)
        except JobActiveError:
            pass  # it started meanwhile: ask its worker
    return await backend.request_cancel(job_id, cancel_reason(reason))
