"""Waiting for a job's result (``wait_for``, ``wait_for_sync``, ``corral wait``) on both backends,
with the worker in another process: a real ``python -m corral.worker`` subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral import (
    ConfigError,
    JobFailedError,
    JobNotFoundError,
    JobState,
    QueueMessage,
    QueueService,
    QueueSettings,
    WaitTimeoutError,
)

from conftest import PYTHON, SettingsFactory, python_env

pytestmark = pytest.mark.timeout(60)


def settings_env(settings: QueueSettings) -> dict[str, str]:
    """The ``QUEUE_*`` variables that make a subprocess use ``settings``' queue."""
    return {
        "QUEUE_BACKEND": settings.backend,
        "QUEUE_NAME": settings.name,
        "QUEUE_SQLITE_PATH": settings.sqlite_path,
        "QUEUE_REDIS_URL": settings.redis_url,
        "QUEUE_LEASE_S": str(settings.lease_s),
        "QUEUE_ATTEMPTS": "1",
        "QUEUE_BACKOFF_DELAY_S": "0",
        "QUEUE_TASKS": "tasks_worker",
    }


@contextlib.contextmanager
def worker_process(settings: QueueSettings) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m corral.worker`` serving ``settings``' queue with tests/tasks_worker.py."""
    process = subprocess.Popen(
        [PYTHON, "-m", "corral.worker"],
        env=python_env(**settings_env(settings)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def test_wait_for_sees_another_process_finish_jobs(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings()
    out = str(tmp_path / "trace")
    async with QueueService(settings) as service:
        echo = await service.enqueue("echo", {"out": out, "value": {"x": [1, "ü"]}})
        flaky = await service.enqueue("flaky", {"out": out}, attempts=3)  # fails once
        boom = await service.enqueue("boom", {"value": 7})
        # Waiting before any worker runs: each wait sees the job finish in the other process.
        waits = asyncio.gather(
            service.wait_for(echo, timeout_s=30),
            service.wait_for(flaky, timeout_s=30),
            service.wait_for(boom, timeout_s=30),
            asyncio.to_thread(service.wait_for_sync, echo, timeout_s=30),
            return_exceptions=True,
        )
        with worker_process(settings):
            echoed, flaky_result, failure, echoed_sync = await waits

        assert echoed == echoed_sync == {"x": [1, "ü"]}
        assert flaky_result == 2  # its first attempt's failure did not end the wait
        assert isinstance(failure, JobFailedError), failure
        assert failure.job_id == boom
        assert failure.reason == "ValueError: bad input 7"
        assert failure.traceback is not None and "ValueError" in failure.traceback

        # Already finished, with no worker left: the answer comes without waiting.
        assert await service.wait_for(echo, timeout_s=0.05) == {"x": [1, "ü"]}
        with pytest.raises(JobFailedError, match="bad input 7"):
            await service.wait_for(boom, timeout_s=0.05)
        assert service.wait_for_sync(flaky, timeout_s=0.05) == 2


async def test_wait_for_times_out_and_leaves_the_job(service: QueueService) -> None:
    job = await service.enqueue("echo", {"value": 1})
    started = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        await service.wait_for(job, timeout_s=0.3)
    assert time.monotonic() - started >= 0.3
    assert isinstance(raised.value, WaitTimeoutError)
    assert str(raised.value) == f"job {job} did not finish within 0.3s (it is waiting)"
    info = await service.get_job(job)
    assert info is not None and info.state is JobState.WAITING

    with pytest.raises(JobNotFoundError, match="no job 'nope'"):
        await service.wait_for("nope", timeout_s=1)
    for bad in (0, -1, float("nan"), "5"):
        with pytest.raises(ConfigError, match="timeout_s must be a number > 0"):
            await service.wait_for(job, timeout_s=bad)  # type: ignore[arg-type]


async def test_wait_for_a_worker_of_the_same_service(service: QueueService) -> None:
    release = asyncio.Event()

    @service.handler("double")
    async def double(message: QueueMessage) -> int:
        await release.wait()
        return int(message.data) * 2

    job = await service.enqueue("double", 21)
    worker = asyncio.create_task(service.start_worker(concurrency=1))
    try:
        waiting = asyncio.create_task(service.wait_for(job, timeout_s=20))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        release.set()
        assert await waiting == 42
    finally:
        service.stop()
        await asyncio.wait_for(worker, 15)


async def test_wait_for_outlasts_a_killed_worker(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(lease_s=1.0)
    out = tmp_path / "trace"
    async with QueueService(settings) as service:
        feed = await service.backend.open_events()
        since = await feed.last_id()
        await feed.aclose()
        # Its first run sleeps until the worker is killed; the redelivery returns at once.
        job = await service.enqueue("sleep", {"out": str(out), "seconds": 60, "once": True})
        waiting = asyncio.create_task(service.wait_for(job, timeout_s=40))
        with worker_process(settings) as first:
            await until(lambda: out.exists() and out.read_text().startswith("start"))
            first.kill()
            first.wait()
        assert not waiting.done()
        with worker_process(settings):
            assert await waiting == "quick"
        assert [line.split()[0] for line in out.read_text().splitlines()] == [
            "start",
            "start",
            "end",
        ]
        # The same events on both backends, in the order of BullMQ's stalled-job check.
        names = [e.name async for e in service.events(since, follow=False) if e.job_id == job]
        assert names == ["added", "waiting", "active", "waiting", "stalled", "active", "completed"]


async def until(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_corral_wait_exit_codes(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    settings = QueueSettings(sqlite_path=str(db), attempts=1)

    async def prepare() -> list[str]:
        async with QueueService(settings) as service:

            @service.handler("ok")
            async def ok(message: QueueMessage) -> Any:
                return {"got": message.data}

            @service.handler("bad")
            async def bad(message: QueueMessage) -> None:
                raise RuntimeError("no luck")

            ids = [await service.enqueue("ok", [1]), await service.enqueue("bad")]
            await service.start_worker(burst=True)
            ids.append(await service.enqueue("ok", "never run"))
            return ids

    done, failed, pending = asyncio.run(prepare())

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "corral", "wait", *args],
            env=python_env(QUEUE_SQLITE_PATH=str(db)),
            capture_output=True,
            text=True,
            timeout=60,
        )

    completed = corral(done)
    assert (completed.returncode, completed.stdout) == (0, '{"got": [1]}\n')
    failure = corral(failed, "--timeout-s", "5")
    assert (failure.returncode, failure.stderr) == (1, "RuntimeError: no luck\n")
    late = corral(pending, "--timeout-s", "0.2")
    assert late.returncode == 124
    assert late.stderr == f"job {pending} did not finish within 0.2s (it is waiting)\n"
    missing = corral("404")
    assert missing.returncode == 1 and "no job '404'" in missing.stderr


@pytest.mark.parametrize("backend_kind", ["bullmq"])
async def test_bullmq_wait_for_a_job_removed_as_it_completes(
    make_settings: SettingsFactory,
) -> None:
    async with QueueService(make_settings(keep_completed=0)) as service:

        @service.handler("answer")
        async def answer(message: QueueMessage) -> int:
            return 42

        job = await service.enqueue("answer")
        waiting = asyncio.create_task(service.wait_for(job, timeout_s=20))
        await asyncio.sleep(0.05)  # the wait is watching: the result comes from the event
        await service.start_worker(burst=True)
        assert await waiting == 42
        assert await service.get_job(job) is None
