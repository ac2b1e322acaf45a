"""Moving queues between backends: the export/import/remove primitives (a contract on both
backends), cross-backend round trips with every option, an interrupted move, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from corral import JobState, QueueMessage, QueueService, QueueSettings, Retry
from corral.message import ImportOutcome

from conftest import PYTHON, SettingsFactory, python_env, unique_queue_name

FIELDS = (
    "id",
    "name",
    "data",
    "state",
    "attempts_made",
    "max_attempts",
    "priority",
    "error",
    "tracebacks",
    "logs",
    "progress",
)


def view(job: Any) -> dict[str, Any]:
    """What a move must keep of a job."""
    seen = {name: getattr(job, name) for name in FIELDS}
    seen["enqueued_ms"] = round(job.enqueued_at.timestamp() * 1000)
    if job.state is JobState.DELAYED:
        seen["run_at_ms"] = round(job.run_at.timestamp() * 1000)
    if job.state is JobState.FAILED:
        seen["finished_ms"] = round(job.finished_at.timestamp() * 1000)
    return seen


async def fill(service: QueueService) -> list[str]:
    """Jobs in every movable state with every option: failed (error, traceback, progress, log
    line), a retry waiting for its backoff (delayed, one attempt made, its error), waiting ones
    with priorities, backoff and custom or queue-assigned ids, and a delayed one."""

    @service.handler("boom")
    async def boom(message: QueueMessage) -> None:
        await message.progress({"step": 2})
        await message.log("about to fail")
        raise ValueError(f"boom {message.data['n']}")

    ids = [
        await service.enqueue("boom", {"n": 1}, job_id="fails-1", attempts=1),
        await service.enqueue("boom", {"n": 2}, attempts=3, backoff=Retry.fixed(3600)),
    ]
    await service.start_worker(burst=True)
    ids += await service.enqueue_many(
        [
            {"name": "w", "data": {"i": 1, "s": "é ✓"}, "priority": 0},
            {"name": "w", "data": [1, 2.5, None], "priority": 7, "attempts": 4},
            {
                "name": "w",
                "data": {"b": True},
                "job_id": "custom-w",
                "backoff": Retry.exponential(2.0, 0.25),
                "attempts": 6,
            },
            {"name": "d", "data": "later", "delay_s": 3600, "priority": 3, "job_id": "late"},
            {"name": "d", "data": None, "delay_s": 7200},
        ]
    )
    return ids


# -- the contract ----------------------------------------------------------------------------------


async def test_move_to_another_queue_keeps_every_field(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    source = QueueService(make_settings())
    # Another file on SQLite: one file numbers the jobs of all its queues together.
    target_settings = make_settings(
        name=unique_queue_name("moved"), sqlite_path=str(tmp_path / "target.db")
    )
    target = QueueService(target_settings)
    try:
        ids = await fill(source)
        before = {job_id: view(await source.get_job(job_id)) for job_id in ids}
        states = {row["state"] for row in before.values()}
        assert states == {JobState.WAITING, JobState.DELAYED, JobState.FAILED}
        assert before["fails-1"]["error"] == "ValueError: boom 1"
        assert before[ids[1]]["state"] is JobState.DELAYED
        assert before[ids[1]]["attempts_made"] == 1

        report = await source.move_to(target_settings)

        assert report.total_moved == len(ids)
        assert report.moved[JobState.FAILED] == 1
        assert report.moved[JobState.DELAYED] == 3
        assert sum((await source.counts()).values()) == 0
        after = {job_id: view(await target.get_job(job_id)) for job_id in ids}
        assert after == before
        # The moved jobs are ordinary jobs there: waiting ones run in priority order, the
        # failed one can be retried.
        order = [job.id for job in await target.list_jobs("waiting")]
        assert order == [ids[2], "custom-w", ids[3]]
        assert await target.retry_failed() == 1
    finally:
        await source.close()
        await target.close()


async def test_import_is_idempotent_by_id_and_reports_conflicts(
    make_settings: SettingsFactory,
) -> None:
    source = QueueService(make_settings())
    target = QueueService(make_settings(name=unique_queue_name("target")))
    try:
        await source.enqueue("same", {"a": 1}, job_id="same-1")
        await source.enqueue("same", {"a": 2}, job_id="clash-1")
        await target.enqueue("other", {"a": 2}, job_id="clash-1")
        records = await source.backend.export_jobs(JobState.WAITING, limit=10)
        assert [r.id for r in records] == ["same-1", "clash-1"]

        dry = await target.backend.import_jobs(records, dry_run=True)
        assert dry == [ImportOutcome.CREATED, ImportOutcome.CONFLICT]
        assert (await target.counts())[JobState.WAITING] == 1  # a dry run writes nothing

        first = await target.backend.import_jobs(records)
        again = await target.backend.import_jobs(records)
        assert first == [ImportOutcome.CREATED, ImportOutcome.CONFLICT]
        assert again == [ImportOutcome.PRESENT, ImportOutcome.CONFLICT]
        clash = await target.get_job("clash-1")
        assert clash is not None and (clash.name, clash.data) == ("other", {"a": 2})
        assert (await target.counts())[JobState.WAITING] == 2
    finally:
        await source.close()
        await target.close()


async def test_remove_exported_is_fenced_on_the_state_read(service: QueueService) -> None:
    await service.enqueue("x", 1, job_id="stays")
    await service.enqueue("x", 2, job_id="goes")
    records = await service.backend.export_jobs(JobState.WAITING, limit=10)
    # "stays" leaves the waiting state after it was read (a worker claims it).
    started = asyncio.Event()
    release = asyncio.Event()

    @service.handler("x")
    async def hold(message: QueueMessage) -> None:
        if message.id == "stays":
            started.set()
            await release.wait()

    worker = asyncio.create_task(service.start_worker(concurrency=1))
    try:
        await asyncio.wait_for(started.wait(), 10)
        removed = await service.backend.remove_exported(records)
        assert dict(zip([r.id for r in records], removed, strict=True)) == {
            "stays": False,
            "goes": True,
        }
        job = await service.get_job("stays")
        assert job is not None and job.state is JobState.ACTIVE
        with pytest.raises(ValueError, match="only waiting, delayed and failed"):
            await service.backend.export_jobs(JobState.ACTIVE, limit=1)
    finally:
        release.set()
        service.stop()
        await asyncio.wait_for(worker, 15)


async def test_active_jobs_are_skipped_and_counted(make_settings: SettingsFactory) -> None:
    source = QueueService(make_settings())
    target_settings = make_settings(name=unique_queue_name("moved"))
    started = asyncio.Event()
    release = asyncio.Event()

    @source.handler("slow")
    async def slow(message: QueueMessage) -> None:
        started.set()
        await release.wait()

    await source.enqueue("slow", 1, job_id="running")
    worker = asyncio.create_task(source.start_worker(concurrency=1))
    try:
        await asyncio.wait_for(started.wait(), 10)
        await source.enqueue("other", 2, job_id="waits")
        report = await source.move_to(target_settings, dry_run=True)
        assert (report.active_skipped, report.total_moved) == (1, 1)
        assert (await source.counts())[JobState.WAITING] == 1  # a dry run moves nothing
        report = await source.move_to(target_settings)
        assert (report.active_skipped, report.total_moved) == (1, 1)
        running = await source.get_job("running")
        assert running is not None and running.state is JobState.ACTIVE
    finally:
        release.set()
        source.stop()
        await asyncio.wait_for(worker, 15)
        await source.close()


async def test_states_to_move_are_checked(service: QueueService) -> None:
    from corral import ConfigError

    with pytest.raises(ConfigError, match="waiting, delayed and failed"):
        await service.move_to(service.settings.with_name("x"), states="completed")
    with pytest.raises(ConfigError, match="the source itself"):
        await service.move_to(service.settings)


# -- across backends -------------------------------------------------------------------------------

ROUND_TRIP_JOBS = int(os.environ.get("CORRAL_MOVE_TEST_JOBS", "20000"))


def many_jobs(count: int) -> list[dict[str, Any]]:
    """Jobs with every option, a quarter of them delayed, half with custom ids."""
    jobs = []
    for i in range(count):
        job: dict[str, Any] = {
            "name": f"task{i % 3}",
            "data": {"i": i, "tags": ["a", i % 7], "ok": i % 2 == 0},
            "priority": i % 4,
            "attempts": 1 + i % 5,
            "backoff": Retry.exponential(1.5, 0.2) if i % 2 else Retry.fixed(3),
        }
        if i % 2:
            job["job_id"] = f"job-{i}"
        if i % 4 == 1:
            job["delay_s"] = 3600 + i
        jobs.append(job)
    return jobs


async def snapshot(service: QueueService) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}
    for state in (JobState.WAITING, JobState.DELAYED, JobState.FAILED):
        offset = 0
        while True:
            page = await service.list_jobs(state, limit=5000, offset=offset)
            if not page:
                break
            offset += len(page)
            for job in page:
                jobs[job.id] = view(job)
    return jobs


@pytest.mark.slow
async def test_sqlite_to_redis_to_sqlite_round_trip(tmp_path: Path, redis_url: str) -> None:
    name = unique_queue_name("trip")
    first = QueueSettings(sqlite_path=str(tmp_path / "first.db"), name=name, attempts=1)
    on_redis = QueueSettings(backend="bullmq", redis_url=redis_url, name=name)
    back = QueueSettings(sqlite_path=str(tmp_path / "back.db"), name=name)
    source = QueueService(first)
    redis_side = QueueService(on_redis)
    final = QueueService(back)
    try:
        ids = await fill(source)
        jobs = many_jobs(ROUND_TRIP_JOBS)
        for start in range(0, len(jobs), 5000):
            ids += await source.enqueue_many(jobs[start : start + 5000])
        before = await snapshot(source)
        assert len(before) == len(ids)

        started = time.perf_counter()
        there = await source.move_to(on_redis)
        on_redis_snapshot = await snapshot(redis_side)
        home = await redis_side.move_to(back)
        elapsed = time.perf_counter() - started

        assert there.total_moved == home.total_moved == len(ids)
        assert not there.conflicts and not home.conflicts
        assert on_redis_snapshot == before
        assert await snapshot(final) == before
        for service in (source, redis_side):
            assert sum((await service.counts()).values()) == 0
        print(f"round trip of {len(ids)} jobs: {elapsed:.1f}s")
        # New jobs on the target never take a moved job's queue-assigned number.
        fresh = await final.enqueue("new", {})
        assert fresh not in before
    finally:
        await source.close()
        await redis_side.close()
        await final.close()


@pytest.mark.slow
async def test_an_interrupted_move_loses_and_duplicates_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    name = unique_queue_name("kill")
    db = str(tmp_path / "source.db")
    source = QueueService(QueueSettings(sqlite_path=db, name=name))
    target = QueueService(QueueSettings(backend="bullmq", redis_url=redis_url, name=name))
    total = 6000
    try:
        ids = await fill(source)
        for start in range(0, total, 3000):
            ids += await source.enqueue_many(many_jobs(total)[start : start + 3000])
        before = await snapshot(source)
        command = [
            PYTHON,
            "-m",
            "corral",
            "--sqlite-path",
            db,
            "--queue",
            name,
            "move",
            "--to-backend",
            "bullmq",
            "--to-redis-url",
            redis_url,
            "--batch-size",
            "50",
        ]
        process = await asyncio.create_subprocess_exec(
            *command, env=python_env(), stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while (await target.counts())[JobState.WAITING] < 500:
            assert process.returncode is None, "the move ended before it could be interrupted"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        await process.wait()

        moved = await snapshot(target)
        left = await snapshot(source)
        assert 500 <= len(moved) < len(before)
        assert set(moved) | set(left) == set(before)  # nothing lost

        again = await asyncio.to_thread(
            subprocess.run,
            [*command, "--json"],
            env=python_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0, again.stderr
        report = json.loads(again.stdout)
        both = set(moved) & set(left)  # copied, not yet removed when the move was killed
        assert report["already_there"] == len(both)
        assert sum(report["moved"].values()) == len(left) - len(both)
        assert await snapshot(target) == before  # every job once, as it was
        assert sum((await source.counts()).values()) == 0
    finally:
        await source.close()
        await target.close()


def test_cli_dry_run_shows_what_would_move_and_changes_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    name = unique_queue_name("dry")
    db = str(tmp_path / "q.db")

    async def setup() -> None:
        async with QueueService(QueueSettings(sqlite_path=db, name=name)) as service:
            await service.enqueue_many([{"name": "a"}, {"name": "b", "delay_s": 60}])

    asyncio.run(setup())
    base = [PYTHON, "-m", "corral", "--sqlite-path", db, "--queue", name, "move"]
    dry = subprocess.run(
        [*base, "--to-backend", "bullmq", "--to-redis-url", redis_url, "--dry-run"],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert "would move 1 waiting, 1 delayed, 0 failed job(s)" in dry.stdout
    assert f"to   queue '{name}' (bullmq at {redis_url})" in dry.stdout

    async def count() -> int:
        async with QueueService(QueueSettings(sqlite_path=db, name=name)) as service:
            return sum((await service.counts()).values())

    assert asyncio.run(count()) == 2
    bad = subprocess.run(
        [*base, "--to-queue", "other", "--states", "active"],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "cannot move 'active' jobs" in bad.stderr
