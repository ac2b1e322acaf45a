"""The management calls of a queue (look at jobs, retry, remove, pause, clean), above the
:class:`~corral.backends.base.QueueBackend` seam: arguments are checked here, once, for every
backend. :class:`~corral.service.QueueService` inherits them."""

from __future__ import annotations

import math

from corral.backends.base import QueueBackend
from corral.errors import ConfigError
from corral.flows import FlowNode, read_flow
from corral.message import Child, JobInfo, JobRef, JobSearch, JobState
from corral.metrics import Throughput
from corral.settings import QueueSettings
from corral.workers import WorkerInfo


class QueueManagement:
    """Look at and manage one queue (and its storage) through :attr:`backend`."""

    settings: QueueSettings

    @property
    def backend(self) -> QueueBackend:
        raise NotImplementedError

    async def get_job(self, job_id: str) -> JobInfo | None:
        """The job's state, attempts, result or error with tracebacks, progress and logs."""
        return await self.backend.get_job(job_id)

    async def get_children(self, job_id: str) -> list[Child]:
        """The children of a job in a flow and where each stands for it (pending, completed
        with its result, failed with its error)."""
        return await self.backend.children(job_id)

    async def get_flow(self, job_id: str, *, queue: str | None = None) -> FlowNode | None:
        """The flow under the job ``job_id`` (of ``queue``, by default this service's) as
        stored, or ``None`` if there is no such job."""
        root = JobRef(queue if queue is not None else self.settings.name, job_id)
        return await read_flow(self.backend, root, limit=self.settings.max_flow_jobs)

    async def list_jobs(
        self, state: JobState | str, *, limit: int = 50, offset: int = 0
    ) -> list[JobInfo]:
        """Jobs in ``state`` (see :meth:`QueueBackend.list_jobs`)."""
        return await self.backend.list_jobs(_state(state), limit=limit, offset=offset)

    async def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state."""
        return await self.backend.counts()

    async def throughput(self, *, minutes: int = 60) -> Throughput:
        """Jobs completed and failed per minute over the last ``minutes``, the current minute
        last (see :meth:`QueueBackend.throughput`)."""
        if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= 10_080:
            raise ConfigError(f"minutes must be a whole number 1-10080 (a week), got {minutes!r}")
        return await self.backend.throughput(minutes=minutes)

    async def workers(self, *, every_queue: bool = False) -> list[WorkerInfo]:
        """The live workers of the queue (``every_queue``: of every queue on the storage)."""
        return await self.backend.workers(every_queue=every_queue)

    async def retry_failed(self, *, limit: int | None = None) -> int:
        """Replay failed jobs (fresh attempts); return how many were moved back to waiting."""
        return await self.backend.retry_failed(limit=limit)

    async def retry_job(self, job_id: str) -> bool:
        """Replay one failed job (fresh attempts); ``False`` if there is no failed job with
        that id."""
        return await self.backend.retry_job(job_id)

    async def clean(self, state: JobState | str, *, older_than_s: float = 0, keep: int = 0) -> int:
        """Delete ``completed`` or ``failed`` jobs that finished at least ``older_than_s`` ago,
        except the newest ``keep``; return how many were deleted."""
        job_state = _state(state)
        if job_state not in (JobState.COMPLETED, JobState.FAILED):
            raise ConfigError(
                f"only finished jobs are cleaned: 'completed' or 'failed', not {state!r}"
            )
        if (
            isinstance(older_than_s, bool)
            or not isinstance(older_than_s, int | float)
            or not (math.isfinite(older_than_s) and older_than_s >= 0)
        ):
            raise ConfigError(f"older_than_s must be a number >= 0, got {older_than_s!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigError(f"keep must be a whole number >= 0, got {keep!r}")
        return await self.backend.clean(
            job_state, older_than_ms=round(older_than_s * 1000), keep=keep
        )

    async def search_jobs(
        self,
        state: JobState | str,
        name: str,
        *,
        offset: int = 0,
        limit: int = 50,
        window: int = 10_000,
    ) -> JobSearch:
        """Jobs in ``state`` whose name contains ``name`` (case-insensitive), looking at
        ``window`` jobs from ``offset`` on; continue from ``result.next_offset`` (see
        :meth:`QueueBackend.search_jobs`)."""
        if not isinstance(name, str) or not name:
            raise ConfigError("search for a non-empty part of a job name")
        for value, what, low in ((offset, "offset", 0), (limit, "limit", 1), (window, "window", 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{what} must be a whole number >= {low}, got {value!r}")
        return await self.backend.search_jobs(
            _state(state), name=name, offset=offset, limit=limit, window=window
        )

    async def list_queues(self) -> list[str]:
        """Every queue on this service's storage, sorted (see
        :meth:`QueueBackend.list_queues`: on Redis a keyspace scan)."""
        return await self.backend.list_queues()

    async def remove(self, job_id: str) -> bool:
        """Delete a job that is not active; ``False`` if it did not exist.

        Raises:
            JobActiveError: the job is running; remove it once it finishes.
        """
        return await self.backend.remove(job_id)

    async def promote(self, job_id: str) -> bool:
        """Run a delayed job now rather than when it is due; ``False`` if it is not delayed."""
        return await self.backend.promote(job_id)

    async def pause(self) -> None:
        """Stop every worker of this queue from starting jobs."""
        await self.backend.pause()

    async def resume(self) -> None:
        """Let workers start jobs again."""
        await self.backend.resume()

    async def is_paused(self) -> bool:
        """Whether the queue is paused."""
        return await self.backend.is_paused()

    async def purge(self) -> int:
        """Delete every job that is not active; return how many."""
        return await self.backend.purge()


def _state(state: JobState | str) -> JobState:
    try:
        return JobState(state)
    except ValueError:
        allowed = ", ".join(s.value for s in JobState)
        raise ConfigError(f"unknown state {state!r}; use one of {allowed}") from None
