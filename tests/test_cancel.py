"""Cancelling jobs (``service.cancel``, ``corral cancel``) on both backends: jobs not started are
removed; a running one is stopped by its worker, also when asked from another process, and its
attempt fails as cancelled with no retry."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from corral import JobState, PayloadError, QueueMessage, QueueService, QueueSettings
from test_results import until, worker_process

from conftest import PYTHON, SettingsFactory, python_env

pytestmark = pytest.mark.timeout(60)


async def test_jobs_not_started_are_removed(service: QueueService) -> None:
    waiting = await service.enqueue("job", 1)
    delayed = await service.enqueue("job", 2, delay_s=60)
    assert await service.cancel(waiting)
    assert await service.cancel(delayed, reason="not needed")
    assert await service.get_job(waiting) is None and await service.get_job(delayed) is None
    assert not await service.cancel(waiting)  # gone
    assert not await service.cancel("nope")

    @service.handler("job")
    async def job(message: QueueMessage) -> str:
        return "done"

    finished = await service.enqueue("job", 3)
    await service.start_worker(burst=True)
    assert not await service.cancel(finished)  # finished: nothing to cancel
    info = await service.get_job(finished)
    assert info is not None and info.state is JobState.COMPLETED
    with pytest.raises(PayloadError, match="a cancel reason is a string"):
        await service.cancel(finished, reason=7)  # type: ignore[arg-type]


async def test_a_running_job_is_cancelled_from_another_process(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(lease_s=0.6)
    out = tmp_path / "trace"
    async with QueueService(settings) as service:
        job = await service.enqueue("sleep", {"out": str(out), "seconds": 60}, attempts=3)
        with worker_process(settings):
            await until(lambda: out.exists() and out.read_text().startswith("start"))
            asked = time.monotonic()
            assert await service.cancel(job, reason="the user left")
            info = await wait_state(service, job, JobState.FAILED)
            stopped_s = time.monotonic() - asked
        assert info.error == "cancelled: the user left"
        assert info.attempts_made == 1  # no retry, though attempts remained
        assert [line.split()[0] for line in out.read_text().splitlines()] == ["start"]
        assert stopped_s < 5  # within a lease renewal (0.2 s here), not the 60 s sleep
        assert not await service.cancel(job)


async def test_handlers_see_the_cancellation(make_settings: SettingsFactory) -> None:
    async with QueueService(make_settings(lease_s=0.6)) as service:
        await handlers_see_the_cancellation(service)


async def handlers_see_the_cancellation(service: QueueService) -> None:
    seen: list[str] = []

    @service.handler("async")
    async def async_handler(message: QueueMessage) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("async cleaned up")
            raise
        return "slept"

    @service.handler("sync")
    def sync_handler(message: QueueMessage) -> str:
        deadline = time.monotonic() + 30
        while not message.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(f"sync saw cancelled={message.cancelled}")
        return "stopped early"

    jobs = [await service.enqueue("async", attempts=2), await service.enqueue("sync", attempts=2)]
    worker = asyncio.create_task(service.start_worker(concurrency=2))
    try:
        for job in jobs:
            await wait_state(service, job, JobState.ACTIVE)
        assert all([await service.cancel(job) for job in jobs])
        infos = [await wait_state(service, job, JobState.FAILED) for job in jobs]
    finally:
        service.stop()
        await asyncio.wait_for(worker, 15)
    assert sorted(seen) == ["async cleaned up", "sync saw cancelled=True"]
    assert [(info.error, info.attempts_made) for info in infos] == [("cancelled", 1)] * 2


async def wait_state(service: QueueService, job_id: str, state: JobState) -> Any:
    deadline = time.monotonic() + 20
    while True:
        info = await service.get_job(job_id)
        if info is not None and info.state is state:
            return info
        assert time.monotonic() < deadline, f"job {job_id} is {info and info.state}"
        await asyncio.sleep(0.02)


def test_corral_cancel(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"

    async def prepare() -> str:
        async with QueueService(QueueSettings(sqlite_path=str(db))) as service:
            return await service.enqueue("job")

    job_id = asyncio.run(prepare())

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "corral", "cancel", *args],
            env=python_env(QUEUE_SQLITE_PATH=str(db)),
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = corral(job_id, "--reason", "typo")
    assert (done.returncode, done.stdout) == (0, f"cancelled job {job_id}\n")
    again = corral(job_id)
    assert again.returncode == 1
    assert again.stderr == f"error: job {job_id} is not waiting, delayed or running\n"
