"""Handlers that misbehave: a sync handler that outlives its timeout, one that calls sys.exit()
or raises KeyboardInterrupt. Each fails its own attempt; the worker and the other jobs go on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from corral import JobState, QueueMessage, QueueService

from conftest import PYTHON, SettingsFactory, finished, python_env, run_worker_until


async def test_a_timed_out_sync_handler_frees_its_slot(make_settings: SettingsFactory) -> None:
    release = threading.Event()
    async with QueueService(make_settings(concurrency=2)) as service:

        @service.handler("stuck", timeout_s=0.3)
        def stuck(message: QueueMessage) -> None:
            release.wait(30)  # a blocking call that ignores the timeout

        @service.handler("quick")
        def quick(message: QueueMessage) -> int:
            return int(message.data)

        for _ in range(2):
            await service.enqueue("stuck", None)
        quick_ids = [await service.enqueue("quick", i) for i in range(4)]
        try:
            # Both slots start with a stuck job; after their timeouts the quick jobs must run
            # although the two threads are still blocked.
            await run_worker_until(service, finished(service, 6), timeout_s=20)
            counts = await service.counts()
            assert (counts[JobState.COMPLETED], counts[JobState.FAILED]) == (4, 2)
            for job_id in quick_ids:
                job = await service.get_job(job_id)
                assert job is not None and job.state is JobState.COMPLETED
            failed = await service.list_jobs("failed")
            assert {job.name for job in failed} == {"stuck"}
            assert all("timeout_s=0.3" in (job.error or "") for job in failed)
        finally:
            release.set()


async def test_too_many_stuck_threads_stop_the_worker(make_settings: SettingsFactory) -> None:
    release = threading.Event()
    async with QueueService(make_settings(concurrency=1)) as service:

        @service.handler("stuck", timeout_s=0.1)
        def stuck(message: QueueMessage) -> None:
            release.wait(30)

        for _ in range(10):
            await service.enqueue("stuck", None)
        try:
            await asyncio.wait_for(service.start_worker(), 30)  # returns by itself
            assert service.stuck is not None and "still running past their timeout_s" in (
                service.stuck
            )
            counts = await service.counts()
            # At most max(4, concurrency) threads are abandoned; the rest wait for a new worker.
            assert counts[JobState.FAILED] == 4
            assert counts[JobState.WAITING] == 6
        finally:
            release.set()


@pytest.mark.parametrize("escape", ["sys.exit(3)", "raise KeyboardInterrupt", "raise SystemExit"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_handler_that_raises_a_base_exception_fails_its_attempt(
    make_settings: SettingsFactory, escape: str, kind: str
) -> None:
    async with QueueService(make_settings(concurrency=4)) as service:
        namespace: dict[str, object] = {"sys": sys}
        body = f"    {escape}\n"
        if kind == "async":
            exec(f"async def bad(message):\n{body}", namespace)
        else:
            exec(f"def bad(message):\n{body}", namespace)
        service.handler("bad")(namespace["bad"])  # type: ignore[arg-type]

        @service.handler("good")
        async def good(message: QueueMessage) -> str:
            await asyncio.sleep(0.05)
            return "ok"

        bad_id = await service.enqueue("bad", None)
        good_ids = [await service.enqueue("good", i) for i in range(3)]
        await run_worker_until(service, finished(service, 4))
        bad = await service.get_job(bad_id)
        assert bad is not None and bad.state is JobState.FAILED
        assert bad.error is not None and bad.error.split(":")[0] in (
            "SystemExit",
            "KeyboardInterrupt",
        )
        assert bad.traceback and "in bad" in bad.traceback  # the handler's own frame is there
        for job_id in good_ids:
            job = await service.get_job(job_id)
            assert job is not None and (job.state, job.result) == (JobState.COMPLETED, "ok")


WORKER_WITH_EXITING_HANDLER = """
import sys, asyncio
from corral import QueueService
service = QueueService()

@service.handler("exit")
def leave(message):
    sys.exit(4)

@service.handler("interrupt")
async def interrupt(message):
    raise KeyboardInterrupt

@service.handler("fine")
async def fine(message):
    await asyncio.sleep(0.05)
    return "fine"
"""


def test_a_worker_process_survives_handlers_that_exit(tmp_path: Path) -> None:
    """The process itself: exit code 0 after the burst, one log line naming each bad job."""
    directory = tmp_path
    (directory / "exiting_tasks.py").write_text(WORKER_WITH_EXITING_HANDLER)
    env = python_env(QUEUE_SQLITE_PATH=str(directory / "q.db"), QUEUE_ATTEMPTS="1")
    enqueue = (
        "from corral import QueueService\n"
        "s = QueueService()\n"
        "print(s.enqueue_sync('exit'), s.enqueue_sync('interrupt'), s.enqueue_sync('fine'))\n"
    )
    ids = subprocess.run(
        [PYTHON, "-c", enqueue], env=env, cwd=directory, capture_output=True, text=True, timeout=60
    )
    assert ids.returncode == 0, ids.stderr
    exit_id, interrupt_id, _ = ids.stdout.split()
    started = time.monotonic()
    worker = subprocess.run(
        [PYTHON, "-m", "corral.worker", "exiting_tasks", "--burst"],
        env=env,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    assert time.monotonic() - started < 50
    assert "was never awaited" not in worker.stderr
    lines = worker.stderr.splitlines()
    assert any(f"job {exit_id} 'exit'" in line and "SystemExit" in line for line in lines)
    assert any(
        f"job {interrupt_id} 'interrupt'" in line and "KeyboardInterrupt" in line for line in lines
    )
