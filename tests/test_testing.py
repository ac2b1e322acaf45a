"""corral.testing: a service's jobs run to the end in-process on a private in-memory queue."""

from __future__ import annotations

import asyncio
import time

import pytest

from corral import JobState, QueueMessage, QueueService, QueueSettings, Retry
from corral.testing import isolated


def make_service(**settings: object) -> QueueService:
    service = QueueService(QueueSettings(sqlite_path="never-created.db", **settings))  # type: ignore[arg-type]

    @service.handler("signup")
    async def signup(message: QueueMessage) -> str:
        # A handler chaining another job, with a delay: it must run without the wait.
        return await message.enqueue("welcome", {"to": message.data["to"]}, delay_s=3600)

    @service.handler("welcome", attempts=3, backoff=Retry.exponential(600))
    def welcome(message: QueueMessage) -> dict[str, object]:
        if message.attempt < 3:
            raise ConnectionError("mail server down")
        return {"sent": message.data["to"], "attempt": message.attempt}

    @service.handler("broken", attempts=2)
    async def broken(message: QueueMessage) -> None:
        raise ValueError("always")

    return service


async def test_jobs_run_to_the_end_with_delays_and_retries_fast_forwarded() -> None:
    service = make_service()
    async with isolated(service) as jobs:
        signup_id = await service.enqueue("signup", {"to": "ada"})
        broken_id = service.enqueue_sync("broken", None)  # synchronous code under test too
        started = time.monotonic()
        done = await jobs.run()
        assert time.monotonic() - started < 30  # an hour's delay and 20 minutes of backoff
        welcome_id = done[signup_id].result
        assert done[welcome_id].state is JobState.COMPLETED
        assert done[welcome_id].result == {"sent": "ada", "attempt": 3}
        assert len(done[welcome_id].tracebacks) == 2
        assert done[broken_id].state is JobState.FAILED
        assert done[broken_id].attempts_made == 2 and "always" in (done[broken_id].error or "")
        assert set(done) == {signup_id, welcome_id, broken_id}
        assert await jobs.run() == {}  # nothing new


async def test_each_isolated_run_is_private_and_leaves_the_service_as_it_was() -> None:
    first, second = make_service(), make_service()
    async with isolated(first) as jobs_a, isolated(second) as jobs_b:
        await first.enqueue("welcome", {"to": "a"})
        assert (await second.counts())[JobState.WAITING] == 0  # not the same database
        assert len(await jobs_a.run()) == 1 and await jobs_b.run() == {}
    assert first.settings.sqlite_path == "never-created.db"
    assert first._backend is None


async def test_a_handler_that_enqueues_for_ever_is_stopped() -> None:
    service = QueueService(QueueSettings(sqlite_path="never-created.db"))

    @service.handler("again")
    async def again(message: QueueMessage) -> None:
        await message.enqueue("again", None, delay_s=1)

    async with isolated(service) as jobs:
        await service.enqueue("again", None)
        with pytest.raises(RuntimeError, match="for ever"):
            await jobs.run(max_rounds=5)


def test_the_private_queue_is_gone_afterwards() -> None:
    service = make_service()

    async def use() -> int:
        async with isolated(service) as jobs:
            await service.enqueue("welcome", {"to": "x"})
            return len(await jobs.jobs("waiting"))

    assert asyncio.run(use()) == 1
    assert asyncio.run(use()) == 1  # a fresh queue each time


async def test_a_schedule_s_future_slots_are_not_fast_forwarded() -> None:
    service = QueueService(QueueSettings(sqlite_path="never-created.db"))
    ran: list[int] = []

    @service.handler("tick")
    async def tick(message: QueueMessage) -> None:
        ran.append(1)

    async with isolated(service) as jobs:
        await service.schedule("ticker", "tick", every_s=3600)
        job_id = await service.enqueue("other", None, delay_s=7200)
        done = await jobs.run()  # ends: the hourly slots are left for their time
        assert job_id in done  # an ordinary delayed job still runs at once
        assert len(ran) <= 1
        schedules = await service.schedules()
        assert [s.id for s in schedules] == ["ticker"]
