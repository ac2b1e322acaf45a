"""Waiting for a job's result: ``QueueService.wait_for`` and ``corral wait``.

The same on every backend: open the backend's watch of the job (:meth:`QueueBackend.watch_job`),
*then* read the job, and sleep on the watch until it finishes. Since the watch sees every change
made after it was opened, a job that finished before the call, or between a read and a wait,
returns at once.
"""

from __future__ import annotations

import asyncio
import math

from corral._sync import SyncRunner
from corral.backends.base import QueueBackend
from corral.errors import ConfigError, JobFailedError, JobNotFoundError, WaitTimeoutError
from corral.message import JSON, JobState


class QueueResults:
    """Waiting for jobs' results; :class:`~corral.service.QueueService` inherits it."""

    _sync: SyncRunner

    @property
    def backend(self) -> QueueBackend:
        raise NotImplementedError

    async def wait_for(self, job_id: str, *, timeout_s: float | None = None) -> JSON:
        """Wait until the job ``job_id`` has finished and return its result (at once if it
        already has); ``timeout_s=None`` waits as long as it takes.

        Raises:
            JobFailedError: the job failed for good (``.reason``, ``.traceback``).
            JobNotFoundError: there is no such job.
            WaitTimeoutError: a ``TimeoutError``: it did not finish within ``timeout_s``.
        """
        return await wait_for(self.backend, job_id, timeout_s)

    def wait_for_sync(self, job_id: str, *, timeout_s: float | None = None) -> JSON:
        """:meth:`wait_for` for synchronous code (blocks the calling thread)."""
        return self._sync.run(lambda backend: wait_for(backend, job_id, timeout_s))


_END_GRACE_S = 1.0


def check_timeout(timeout_s: float | None) -> float | None:
    """``timeout_s`` as a float, or ``None`` (no limit); ConfigError for anything else."""
    if timeout_s is None:
        return None
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not (math.isfinite(timeout_s) and timeout_s > 0)
    ):
        raise ConfigError(f"timeout_s must be a number > 0 (or None: no limit), got {timeout_s!r}")
    return float(timeout_s)


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id:
        raise ConfigError(f"a job id is a non-empty string, got {job_id!r}")
    return job_id


async def wait_for(backend: QueueBackend, job_id: str, timeout_s: float | None) -> JSON:
    """The result of the job ``job_id`` of ``backend``'s queue once it has finished.

    Raises:
        JobFailedError: the job failed for good (its last attempt's reason and traceback).
        JobNotFoundError: there is no such job (or it was removed before it finished).
        WaitTimeoutError: it did not finish within ``timeout_s``; it is left as it is.
    """
    check_job_id(job_id)
    limit_s = check_timeout(timeout_s)
    loop = asyncio.get_running_loop()
    deadline = None if limit_s is None else loop.time() + limit_s
    watch = await backend.watch_job(job_id)
    seen = False
    try:
        while True:
            info = await backend.get_job(job_id)
            if info is None:
                if seen and watch.ended is None and watch.tells_end:
                    # Removed as it finished: the end is in the events, maybe not read yet
                    # (written with the removal, so this returns at once).
                    await watch.wait(_END_GRACE_S)
                ended = watch.ended
                if ended is None:
                    raise JobNotFoundError(
                        f"no job {job_id!r} in queue {backend.queue_name!r} (it never existed, "
                        "or it was removed)"
                    )
                if not ended.completed:
                    raise JobFailedError(job_id, ended.reason)
                return ended.result
            seen = True
            if info.state is JobState.COMPLETED:
                return info.result
            if info.state is JobState.FAILED:
                raise JobFailedError(job_id, info.error or "", info.traceback)
            remaining_s = 3600.0 if deadline is None else deadline - loop.time()
            if remaining_s <= 0:
                raise WaitTimeoutError(
                    f"job {job_id} did not finish within {limit_s:g}s (it is {info.state.value})"
                )
            await watch.wait(remaining_s)
    finally:
        await watch.aclose()
