"""The contract every backend keeps, written once and run against SQLite and BullMQ alike."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import pytest

from corral import (
    JobState,
    PayloadError,
    QueueMessage,
    QueueService,
    Retry,
    UnrecoverableError,
)

from conftest import SettingsFactory, finished, run_worker_until

# -- producing ---------------------------------------------------------------------------------


async def test_enqueue_stores_payload_exactly(service: QueueService) -> None:
    data = {"text": "héllo ✓", "n": 2**53 - 1, "f": -0.5, "nested": [1, {"a": None}], "t": True}
    job_id = await service.enqueue("echo", data, priority=3, attempts=4)
    job = await service.get_job(job_id)
    assert job is not None
    assert job.id == job_id
    assert (job.name, job.data, job.state) == ("echo", data, JobState.WAITING)
    assert (job.priority, job.max_attempts, job.attempts_made) == (3, 4, 0)
    counts = await service.counts()
    assert counts[JobState.WAITING] == 1
    assert sum(counts.values()) == 1


async def test_delayed_job_is_delayed_until_due(service: QueueService) -> None:
    job_id = await service.enqueue("echo", 1, delay_s=60)
    job = await service.get_job(job_id)
    assert job is not None and job.state == JobState.DELAYED
    assert (await service.counts())[JobState.DELAYED] == 1


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (float("nan"), "not JSON-serialisable"),
        ({"s": {1, 2}}, "not JSON-serialisable"),
        (b"bytes", "not JSON-serialisable"),
        ((1, 2), "tuple"),
        ({1: "a"}, "key 1"),
        ("x" * 5000, "over the limit"),
    ],
)
async def test_bad_payload_is_refused_before_writing(
    make_settings: SettingsFactory, data: Any, fragment: str
) -> None:
    async with QueueService(make_settings(max_payload_bytes=4096)) as service:
        with pytest.raises(PayloadError, match=fragment):
            await service.enqueue("echo", data)
        assert sum((await service.counts()).values()) == 0


async def test_bad_options_are_refused(service: QueueService) -> None:
    for kwargs in (
        {"delay_s": -1},
        {"priority": -1},
        {"priority": 2**21},
        {"attempts": 0},
        {"job_id": "12"},
        {"job_id": "a:b"},
        {"job_id": ""},
    ):
        with pytest.raises(PayloadError):
            await service.enqueue("echo", {}, **kwargs)
    assert sum((await service.counts()).values()) == 0


async def test_enqueue_many_is_all_or_nothing(service: QueueService) -> None:
    with pytest.raises(PayloadError, match="job #1"):
        await service.enqueue_many([{"name": "a", "data": 1}, {"name": "b", "data": float("inf")}])
    assert sum((await service.counts()).values()) == 0
    ids = await service.enqueue_many([{"name": "a", "data": i} for i in range(50)])
    assert len(set(ids)) == 50
    jobs = [await service.get_job(i) for i in ids]
    assert [j.data for j in jobs if j] == list(range(50))


async def test_duplicate_job_id_returns_existing_job(service: QueueService) -> None:
    first = await service.enqueue("echo", {"v": 1}, job_id="order-42")
    second = await service.enqueue("echo", {"v": 2}, job_id="order-42")
    assert first == second == "order-42"
    job = await service.get_job("order-42")
    assert job is not None and job.data == {"v": 1}
    assert (await service.counts())[JobState.WAITING] == 1
    ids = await service.enqueue_many(
        [{"name": "echo", "data": 3, "job_id": "order-42"}, {"name": "echo", "data": 4}]
    )
    assert ids[0] == "order-42" and ids[1] != "order-42"
    assert (await service.counts())[JobState.WAITING] == 2


async def test_enqueue_sync_inside_and_outside_a_loop(service: QueueService) -> None:
    inside = service.enqueue_sync("echo", {"where": "loop thread"})
    box: dict[str, str] = {}
    thread = threading.Thread(target=lambda: box.update(id=service.enqueue_sync("echo", 2)))
    thread.start()
    thread.join(10)
    for job_id, data in ((inside, {"where": "loop thread"}), (box["id"], 2)):
        job = await service.get_job(job_id)
        assert job is not None and job.data == data


# -- consuming ---------------------------------------------------------------------------------


async def test_worker_runs_async_and_sync_handlers(service: QueueService) -> None:
    threads: dict[str, str] = {}

    @service.handler("add")
    async def add(message: QueueMessage) -> int:
        await message.progress(40)
        await message.log("adding")
        threads["async"] = threading.current_thread().name
        return int(message.data["a"] + message.data["b"])

    @service.handler("upper")
    def upper(message: QueueMessage) -> str:
        threads["sync"] = threading.current_thread().name
        return str(message.data).upper()

    a = await service.enqueue("add", {"a": 2, "b": 3})
    u = await service.enqueue("upper", "abc")
    await service.start_worker(burst=True)
    job_a, job_u = await service.get_job(a), await service.get_job(u)
    assert job_a is not None and job_u is not None
    assert (job_a.state, job_a.result, job_a.progress, job_a.attempts_made) == (
        JobState.COMPLETED,
        5,
        40,
        1,
    )
    assert "adding" in job_a.logs[0]
    assert (job_u.state, job_u.result) == (JobState.COMPLETED, "ABC")
    assert threads["async"] == threading.main_thread().name
    assert threads["sync"] != threading.main_thread().name


async def test_message_fields(service: QueueService) -> None:
    seen: list[QueueMessage] = []

    @service.handler("look")
    async def look(message: QueueMessage) -> None:
        seen.append(message)

    job_id = await service.enqueue("look", ["x"], priority=2, attempts=3)
    await service.start_worker(burst=True)
    (message,) = seen
    assert (message.id, message.name, message.data) == (job_id, "look", ["x"])
    assert (message.queue, message.attempt, message.max_attempts, message.priority) == (
        service.settings.name,
        1,
        3,
        2,
    )
    assert abs(message.enqueued_at.timestamp() - time.time()) < 60


async def test_priority_then_fifo_order(service: QueueService) -> None:
    order: list[int] = []

    @service.handler("rec")
    async def rec(message: QueueMessage) -> None:
        order.append(message.data)

    await service.enqueue_many(
        [
            {"name": "rec", "data": 30, "priority": 3},
            {"name": "rec", "data": 10, "priority": 1},
            {"name": "rec", "data": 0},
            {"name": "rec", "data": 31, "priority": 3},
            {"name": "rec", "data": 11, "priority": 1},
            {"name": "rec", "data": 1},
        ]
    )
    await service.start_worker(concurrency=1, burst=True)
    assert order == [0, 1, 10, 11, 30, 31]


async def test_delay_has_millisecond_precision(service: QueueService) -> None:
    started: dict[str, float] = {}

    @service.handler("t")
    async def t(message: QueueMessage) -> None:
        started[message.data] = time.monotonic()

    await service.enqueue("t", "warm-up")  # the worker is connected and idle before the test
    worker = asyncio.create_task(service.start_worker())
    try:
        while "warm-up" not in started:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await service.enqueue("t", "late", delay_s=0.4)
        await service.enqueue("t", "soon", delay_s=0.15)
        await service.enqueue("t", "now")
        while len(started) < 4:
            assert not worker.done(), worker
            await asyncio.sleep(0.01)
    finally:
        service.stop()
        await asyncio.wait_for(worker, 15)
    # Order and "not before it was due"; how soon after is the benchmark's business.
    assert started["now"] < started["soon"] < started["late"]
    assert started["soon"] - t0 >= 0.15
    assert started["late"] - t0 >= 0.4


async def test_retries_follow_the_backoff(service: QueueService) -> None:
    attempts: list[tuple[int, float]] = []

    @service.handler("flaky")
    async def flaky(message: QueueMessage) -> str:
        attempts.append((message.attempt, time.monotonic()))
        if message.attempt < 3:
            raise RuntimeError(f"try {message.attempt}")
        return "ok"

    job_id = await service.enqueue("flaky", None, attempts=3, backoff=Retry.fixed(0.2))
    await run_worker_until(service, finished(service, 1))
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.2 for gap in gaps), gaps  # never before the backoff
    job = await service.get_job(job_id)
    assert job is not None and (job.state, job.result, job.attempts_made) == (
        JobState.COMPLETED,
        "ok",
        3,
    )
    # Every failed attempt's traceback is kept, oldest first (BullMQ's stacktrace list).
    assert len(job.tracebacks) == 2
    assert "try 1" in job.tracebacks[0] and "try 2" in job.tracebacks[1]


async def test_exponential_backoff_grows(service: QueueService) -> None:
    times: list[float] = []

    @service.handler("fail")
    async def fail(message: QueueMessage) -> None:
        times.append(time.monotonic())
        raise RuntimeError("always")

    job_id = await service.enqueue("fail", None, attempts=3, backoff=Retry.exponential(0.1))
    await run_worker_until(service, finished(service, 1))
    first, second = times[1] - times[0], times[2] - times[1]
    assert first >= 0.1 and second >= 0.2, (first, second)  # 0.1 * 2 ** (attempt - 1)
    job = await service.get_job(job_id)
    assert job is not None and job.state == JobState.FAILED
    assert job.error is not None and "always" in job.error
    assert job.traceback is not None and "RuntimeError" in job.traceback
    assert len(job.tracebacks) == 3 and job.tracebacks[-1] == job.traceback


async def test_unrecoverable_error_fails_at_once(service: QueueService) -> None:
    calls: list[int] = []

    @service.handler("bad")
    async def bad(message: QueueMessage) -> None:
        calls.append(message.attempt)
        raise UnrecoverableError("card declined")

    job_id = await service.enqueue("bad", None, attempts=5)
    await service.start_worker(burst=True)
    job = await service.get_job(job_id)
    assert calls == [1]
    assert job is not None and job.state == JobState.FAILED and "card declined" in (job.error or "")


async def test_unknown_name_fails_with_clear_reason(service: QueueService) -> None:
    job_id = await service.enqueue("nobody-handles-this", {}, attempts=3)
    await service.start_worker(burst=True)
    job = await service.get_job(job_id)
    assert job is not None and job.state == JobState.FAILED
    assert job.error == "no handler registered for 'nobody-handles-this'"


async def test_timeout_fails_the_attempt(service: QueueService) -> None:
    @service.handler("slow", timeout_s=0.2)
    async def slow(message: QueueMessage) -> None:
        await asyncio.sleep(5)

    job_id = await service.enqueue("slow", None, attempts=1)
    t0 = time.monotonic()
    await service.start_worker(burst=True)
    assert time.monotonic() - t0 < 3
    job = await service.get_job(job_id)
    assert job is not None and job.state == JobState.FAILED
    assert "timeout_s=0.2" in (job.error or "")


async def test_non_json_result_fails_the_job(service: QueueService) -> None:
    @service.handler("weird")
    async def weird(message: QueueMessage) -> object:
        return {1, 2}

    job_id = await service.enqueue("weird", None, attempts=3)
    await service.start_worker(burst=True)
    job = await service.get_job(job_id)
    assert job is not None and job.state == JobState.FAILED and job.attempts_made == 1
    assert "handler result is not JSON" in (job.error or "")


async def test_dead_letter_copies_failed_jobs(make_settings: SettingsFactory) -> None:
    settings = make_settings(dead_letter=make_settings().name + "-dead")
    async with QueueService(settings) as service:

        @service.handler("charge")
        async def charge(message: QueueMessage) -> None:
            raise ValueError("insufficient funds")

        job_id = await service.enqueue("charge", {"amount": 5}, attempts=2)
        await run_worker_until(service, finished(service, 1))
        job = await service.get_job(job_id)
        assert job is not None and job.state == JobState.FAILED
        assert "insufficient funds" in (job.error or "")

        dead_settings = settings.model_copy(
            update={"name": settings.dead_letter, "dead_letter": None}
        )
        async with QueueService(dead_settings) as dead:
            (copy,) = await dead.list_jobs(JobState.WAITING)
            assert (copy.name, copy.data) == ("charge", {"amount": 5})
            assert any("insufficient funds" in line for line in copy.logs)


async def test_retry_failed_replays_jobs(service: QueueService) -> None:
    fail = {"on": True}

    @service.handler("sometimes")
    async def sometimes(message: QueueMessage) -> str:
        if fail["on"]:
            raise RuntimeError("down")
        return "up"

    ids = [await service.enqueue("sometimes", i, attempts=1) for i in range(3)]
    await service.start_worker(burst=True)
    assert (await service.counts())[JobState.FAILED] == 3
    fail["on"] = False
    assert await service.retry_failed() == 3
    await service.start_worker(burst=True)
    for job_id in ids:
        job = await service.get_job(job_id)
        assert job is not None and (job.state, job.result) == (JobState.COMPLETED, "up")


async def test_remove_and_purge(service: QueueService) -> None:
    keep = await service.enqueue("echo", 1)
    gone = await service.enqueue("echo", 2, delay_s=30)
    assert await service.remove(gone) is True
    assert await service.remove(gone) is False
    assert await service.get_job(gone) is None
    assert await service.get_job(keep) is not None
    await service.enqueue("echo", 3)
    assert await service.purge() == 2
    assert sum((await service.counts()).values()) == 0


async def test_pause_stops_deliveries_until_resume(service: QueueService) -> None:
    ran: list[int] = []

    @service.handler("p")
    async def p(message: QueueMessage) -> None:
        ran.append(message.data)

    await service.pause()
    assert await service.is_paused()
    await service.enqueue("p", 1)
    worker = asyncio.create_task(service.start_worker())
    await asyncio.sleep(0.6)
    assert ran == []
    await service.resume()
    deadline = time.monotonic() + 10
    while not ran and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    service.stop()
    await asyncio.wait_for(worker, 10)
    assert ran == [1] and not await service.is_paused()


async def test_list_jobs_by_state(service: QueueService) -> None:
    a = await service.enqueue("echo", "a", priority=2)
    b = await service.enqueue("echo", "b")
    c = await service.enqueue("echo", "c", delay_s=30)
    waiting = await service.list_jobs("waiting")
    assert [j.id for j in waiting] == [b, a]
    assert [j.id for j in await service.list_jobs(JobState.DELAYED)] == [c]
    assert await service.list_jobs("completed") == []


async def test_graceful_stop_finishes_or_releases(make_settings: SettingsFactory) -> None:
    async with QueueService(make_settings(shutdown_grace_s=0.5)) as service:
        started = asyncio.Event()
        finished_ids: list[str] = []

        @service.handler("work")
        async def work(message: QueueMessage) -> None:
            started.set()
            await asyncio.sleep(message.data)
            finished_ids.append(message.id)

        quick = await service.enqueue("work", 0.2)
        slow = await service.enqueue("work", 30)
        worker = asyncio.create_task(service.start_worker(concurrency=2))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        service.stop()
        await asyncio.wait_for(worker, 10)
        assert time.monotonic() - t0 < 0.5 + 1.5
        assert finished_ids == [quick]
        released = await service.get_job(slow)
        assert released is not None
        assert (released.state, released.attempts_made) == (JobState.WAITING, 0)


# -- checks that live above the backends ---------------------------------------------------------


async def test_progress_and_logs_are_checked_alike_on_every_backend(
    make_settings: SettingsFactory,
) -> None:
    refused: list[str] = []
    async with QueueService(make_settings(max_payload_bytes=1024)) as service:

        @service.handler("report")
        async def report(message: QueueMessage) -> str:
            for value in ("x" * 100_000, float("nan"), (1, 2), {1: "a"}):
                try:
                    await message.progress(value)
                except PayloadError as exc:
                    refused.append(str(exc).split(" ")[0])
            try:
                await message.log("y" * 5000)
            except PayloadError as exc:
                refused.append(str(exc).split(" ")[0])
            await message.progress({"done": 3})
            return "ok"

        fresh = await service.enqueue("report", None)
        ran = await service.enqueue("report", None)
        job = await service.get_job(fresh)
        assert job is not None and job.progress == 0  # BullMQ's default before any report
        await run_worker_until(service, finished(service, 2))
        job = await service.get_job(ran)
        assert job is not None and job.state is JobState.COMPLETED
        assert job.progress == {"done": 3}
    assert refused == ["progress", "progress", "progress", "progress", "log"] * 2


async def test_integers_node_cannot_read_are_refused_on_redis_only(
    make_settings: SettingsFactory, backend_kind: str
) -> None:
    big = {"id": 2**53 + 1, "ok": [2**53 - 1, -(2**53) + 1]}
    async with QueueService(make_settings()) as service:
        if backend_kind == "bullmq":
            with pytest.raises(PayloadError, match=r"payload\['id'\].*as a string"):
                await service.enqueue("x", big)
            assert sum((await service.counts()).values()) == 0
        else:
            job_id = await service.enqueue("x", big)
            job = await service.get_job(job_id)
            assert job is not None and job.data == big
        await service.enqueue("x", {"id": str(2**53 + 1), "ok": big["ok"]})

    async with QueueService(make_settings(allow_unsafe_integers=True)) as service:
        job_id = await service.enqueue("x", big)
        job = await service.get_job(job_id)
        assert job is not None and job.data == big


async def test_a_result_node_cannot_read_fails_the_job_on_redis(
    make_settings: SettingsFactory, backend_kind: str
) -> None:
    async with QueueService(make_settings()) as service:

        @service.handler("big")
        async def big(message: QueueMessage) -> int:
            return 2**60

        job_id = await service.enqueue("big", None)
        await run_worker_until(service, finished(service, 1))
        job = await service.get_job(job_id)
        assert job is not None
        if backend_kind == "bullmq":
            assert job.state is JobState.FAILED and "handler result" in (job.error or "")
        else:
            assert (job.state, job.result) == (JobState.COMPLETED, 2**60)


async def test_a_stop_before_the_worker_starts_is_not_lost(service: QueueService) -> None:
    await service.enqueue("x", 1)
    service.stop()
    await asyncio.wait_for(service.start_worker(), 10)  # returns at once, runs nothing
    assert (await service.counts())[JobState.WAITING] == 1
    await service.start_worker(burst=True)  # the next run is a normal one
    assert (await service.counts())[JobState.FAILED] == 1  # no handler for 'x'
