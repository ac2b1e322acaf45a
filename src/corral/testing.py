"""Testing code that enqueues jobs, and the handlers that run them, without a worker process.

:func:`isolated` points a :class:`~corral.service.QueueService` (your application's own, usually
a module-level one) at a private in-memory SQLite queue for the duration of a test. Code under
test enqueues as it always does (``enqueue``, ``enqueue_sync``, ``enqueue_many``); the test then
calls :meth:`JobRunner.run` to run every job to the end in-process: retries and delayed jobs
included, without waiting for their time (the clock is fast-forwarded to the next due job).

Example (pytest with pytest-asyncio)::

    import pytest
    from corral.testing import isolated
    from myapp.tasks import service

    @pytest.fixture
    async def jobs():
        async with isolated(service) as runner:
            yield runner

    async def test_signup_sends_a_welcome_email(jobs):
        await signup("ada@example.com")          # enqueues "send_welcome"
        done = await jobs.run()
        (welcome,) = done.values()
        assert welcome.state == "completed" and welcome.result == {"sent": True}
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from corral._sync import SyncRunner
from corral.errors import ConfigError
from corral.message import JobInfo, JobState
from corral.schedules import SLOT_JOB_PREFIX
from corral.service import QueueService
from corral.settings import QueueSettings

__all__ = ["JobRunner", "isolated"]

_FINISHED = (JobState.COMPLETED, JobState.FAILED)


class JobRunner:
    """Runs the jobs of an :func:`isolated` service to the end, in this process."""

    def __init__(self, service: QueueService) -> None:
        self.service = service

    async def run(self, *, max_rounds: int = 1000) -> dict[str, JobInfo]:
        """Run every job until none is waiting or delayed; return the jobs that finished in
        this call, by id (completed and failed ones; each with its result or error).

        Delayed jobs and retries after a backoff run without waiting: whenever nothing is
        ready, the earliest delayed jobs are made due. A schedule's next slots are not: a
        schedule never ends, so its jobs run when they are due. A job whose handler keeps
        enqueuing more jobs stops the run after ``max_rounds`` rounds with a RuntimeError.
        """
        service = self.service
        before = await self._finished_ids()
        for _ in range(max_rounds):
            await service.start_worker(burst=True)
            if not await self._promote_earliest():
                break
        else:
            raise RuntimeError(
                f"jobs were still being added after {max_rounds} rounds; does a handler "
                "enqueue a job for ever?"
            )
        done: dict[str, JobInfo] = {}
        for state in _FINISHED:
            offset = 0
            while page := await service.list_jobs(state, limit=500, offset=offset):
                for job in page:
                    if job.id not in before:
                        done[job.id] = job
                offset += len(page)
        return done

    async def jobs(self, state: JobState | str) -> list[JobInfo]:
        """The jobs in ``state`` now (for jobs left waiting on a paused queue, say)."""
        return await self.service.list_jobs(state, limit=100_000)

    async def _finished_ids(self) -> set[str]:
        ids: set[str] = set()
        for state in _FINISHED:
            ids.update(job.id for job in await self.jobs(state))
        return ids

    async def _promote_earliest(self) -> bool:
        """Make the earliest delayed jobs due (the clock jumps to them); ``False`` if none."""
        delayed = [
            job
            for job in await self.service.list_jobs(JobState.DELAYED, limit=1000)
            if not job.id.startswith(SLOT_JOB_PREFIX)
        ]
        if not delayed:
            return False
        first = min(job.run_at for job in delayed if job.run_at is not None)
        for job in delayed:
            if job.run_at == first or job.run_at is None:
                await self.service.promote(job.id)
        return True


@asynccontextmanager
async def isolated(
    service: QueueService, *, settings: QueueSettings | None = None
) -> AsyncIterator[JobRunner]:
    """Point ``service`` at a private in-memory SQLite queue until the block ends.

    ``settings`` default to the service's own with ``backend="sqlite"`` and
    ``sqlite_path=":memory:"`` (its handlers, attempts and backoff stay as they are). The
    service's own backend, if it had one, is left untouched and restored afterwards.
    """
    if settings is None:
        values = {key: getattr(service.settings, key) for key in service.settings.explicit}
        values.update(backend="sqlite", sqlite_path=":memory:")
        settings = QueueSettings(**values)
    if settings.backend != "sqlite" or settings.sqlite_path != ":memory:":
        raise ConfigError("isolated() runs on SQLite ':memory:' only")
    saved = (service.settings, service._backend, service._sync)
    service.settings = settings
    service._backend = None
    service._sync = SyncRunner(service._init_backend)
    try:
        yield JobRunner(service)
    finally:
        try:
            await asyncio.shield(service.close())
        finally:
            service.settings, service._backend, service._sync = saved
