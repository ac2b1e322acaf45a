"""The management calls behind the dashboard, one contract for both backends: retrying one job,
cleaning finished jobs by age and count, searching by name, listing a storage's queues."""

from __future__ import annotations

import asyncio

import pytest

from corral import ConfigError, JobState, QueueMessage, QueueService

from conftest import SettingsFactory, finished, run_worker_until, unique_queue_name


async def _fail_and_complete(service: QueueService, *, failing: int, passing: int) -> None:
    """Run ``failing`` jobs that fail and ``passing`` that complete, one at a time, so that
    they finish in enqueue order at distinct milliseconds."""

    @service.handler("boom")
    async def boom(message: QueueMessage) -> None:
        await asyncio.sleep(0.003)
        raise RuntimeError(f"boom {message.data}")

    @service.handler("ok")
    async def ok(message: QueueMessage) -> int:
        await asyncio.sleep(0.003)
        return int(message.data)

    await service.enqueue_many(
        [{"name": "boom", "data": n} for n in range(failing)]
        + [{"name": "ok", "data": n} for n in range(passing)]
    )
    await run_worker_until(service, finished(service, failing + passing), concurrency=1)


async def test_retry_job_moves_one_failed_job_back_with_fresh_attempts(
    service: QueueService,
) -> None:
    await _fail_and_complete(service, failing=2, passing=1)
    failed = await service.list_jobs("failed")
    target, other = failed[0], failed[1]
    assert target.attempts_made == 1

    assert await service.retry_job(target.id) is True

    job = await service.get_job(target.id)
    assert job is not None
    assert (job.state, job.attempts_made) == (JobState.WAITING, 0)
    still = await service.get_job(other.id)
    assert still is not None and still.state is JobState.FAILED
    counts = await service.counts()
    assert (counts[JobState.WAITING], counts[JobState.FAILED]) == (1, 1)


async def test_retry_job_leaves_jobs_that_are_not_failed(service: QueueService) -> None:
    waiting = await service.enqueue("later", 1)
    assert await service.retry_job(waiting) is False
    assert await service.retry_job("no-such-job") is False
    assert await service.retry_job("999999") is False
    job = await service.get_job(waiting)
    assert job is not None and job.state is JobState.WAITING
    assert (await service.counts())[JobState.WAITING] == 1


async def test_clean_keeps_the_newest_and_respects_age(service: QueueService) -> None:
    await _fail_and_complete(service, failing=3, passing=5)
    newest_first = [job.id for job in await service.list_jobs("completed")]
    assert len(newest_first) == 5

    assert await service.clean("completed", older_than_s=3600) == 0
    assert await service.clean("completed", keep=2) == 3

    assert [job.id for job in await service.list_jobs("completed")] == newest_first[:2]
    counts = await service.counts()
    assert (counts[JobState.COMPLETED], counts[JobState.FAILED]) == (2, 3)
    assert await service.get_job(newest_first[-1]) is None

    assert await service.clean("failed") == 3
    assert await service.clean("failed") == 0
    assert (await service.counts())[JobState.FAILED] == 0


async def test_clean_refuses_unfinished_states_and_bad_limits(service: QueueService) -> None:
    await service.enqueue("later", 1)
    for state in ("waiting", "active", "delayed", "bogus"):
        with pytest.raises(ConfigError):
            await service.clean(state)
    with pytest.raises(ConfigError, match="older_than_s"):
        await service.clean("completed", older_than_s=-1)
    with pytest.raises(ConfigError, match="keep"):
        await service.clean("completed", keep=-1)
    assert (await service.counts())[JobState.WAITING] == 1


async def test_search_jobs_by_name_in_windows(service: QueueService) -> None:
    names = ["send_email", "resize", "SEND_sms", "resize", "resend_email", "noop"] * 5
    ids = await service.enqueue_many([{"name": name, "data": i} for i, name in enumerate(names)])

    found = await service.search_jobs("waiting", "send")
    assert [job.id for job in found.jobs] == [
        job_id for job_id, name in zip(ids, names, strict=True) if "send" in name.lower()
    ]
    assert found.next_offset is None

    # A window of 7 looks at positions 0-6: send_email, SEND_sms, resend_email and send_email.
    step = await service.search_jobs("waiting", "send", window=7)
    assert [job.name for job in step.jobs] == [
        "send_email",
        "SEND_sms",
        "resend_email",
        "send_email",
    ]
    assert step.next_offset == 7
    after = await service.search_jobs("waiting", "send", offset=7, window=7)
    assert [job.data for job in after.jobs] == [8, 10, 12]
    assert after.next_offset == 14

    # The limit stops a step at the last match it returned.
    limited = await service.search_jobs("waiting", "resize", limit=2)
    assert [job.data for job in limited.jobs] == [1, 3]
    assert limited.next_offset == 4

    assert (await service.search_jobs("failed", "send")).jobs == []
    with pytest.raises(ConfigError):
        await service.search_jobs("waiting", "")


async def test_search_reads_finished_jobs_newest_first(service: QueueService) -> None:
    await _fail_and_complete(service, failing=3, passing=2)
    found = await service.search_jobs("failed", "BOOM")
    assert [job.data for job in found.jobs] == [2, 1, 0]
    assert all(job.error and "boom" in job.error for job in found.jobs)


async def test_list_queues_finds_every_queue_of_the_storage(
    make_settings: SettingsFactory,
) -> None:
    base = unique_queue_name("lq")
    names = [f"{base}-{suffix}" for suffix in ("waiting", "delayed", "done", "paused")]
    for name in names:
        make_settings(name=name)  # so that their Redis keys are deleted afterwards
    async with QueueService(make_settings(name=names[0])) as service:
        await service.enqueue("a", 1)
        backend = service.backend
        await backend.for_queue(names[1]).enqueue([service.build_job("b", 2, delay_s=60)])
        done = service.backend.for_queue(names[2])
        await done.enqueue([service.build_job("c", 3)])
        await backend.for_queue(names[3]).pause()

        async with QueueService(make_settings(name=names[2])) as worker:

            @worker.handler("c")
            async def c(message: QueueMessage) -> None:
                return None

            await run_worker_until(worker, finished(worker, 1))

        found = await service.list_queues()
        assert [name for name in found if name.startswith(base)] == sorted(names)
        counts = await done.counts()
        assert counts[JobState.COMPLETED] == 1


async def test_reading_a_queue_writes_nothing(make_settings: SettingsFactory) -> None:
    ghost = unique_queue_name("ghost")
    async with QueueService(make_settings(name=ghost)) as service:
        await service.enqueue_many([])  # nothing to write
        assert await service.counts() == dict.fromkeys(JobState, 0)
        assert await service.list_jobs("failed") == []
        assert await service.get_job("1") is None
        assert await service.is_paused() is False
        assert (await service.search_jobs("waiting", "x")).jobs == []
        assert ghost not in await service.list_queues()
