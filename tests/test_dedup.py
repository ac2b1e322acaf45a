"""Deduplication (``enqueue(..., deduplication=Deduplication(...))``) on both backends: simple,
throttle, extend and debounce, each checked by the jobs that exist and the jobs that ran."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import pytest

from corral import Deduplication, JobState, PayloadError, QueueMessage, QueueService

from conftest import SettingsFactory, finished, run_worker_until

pytestmark = pytest.mark.timeout(60)


async def total(service: QueueService) -> int:
    return sum((await service.counts()).values())


async def test_rapid_enqueues_within_the_ttl_make_one_job(service: QueueService) -> None:
    once = Deduplication("report-7", ttl_s=30)
    first = await service.enqueue("report", {"n": 0}, deduplication=once)
    ids = await asyncio.gather(
        *(service.enqueue("report", {"n": n}, deduplication=once) for n in range(1, 15))
    )
    ids += await service.enqueue_many(
        [{"name": "report", "data": {"n": n}, "deduplication": once} for n in range(15, 20)]
    )
    assert set(ids) == {first}
    assert await total(service) == 1
    info = await service.get_job(first)
    assert info is not None and info.data == {"n": 0}  # the first one stands, unchanged
    # Another id is another job.
    other = await service.enqueue("report", {"n": 1}, deduplication=Deduplication("report-8"))
    assert other != first and await total(service) == 2


async def test_simple_mode_holds_the_id_until_the_job_finishes_or_goes(
    service: QueueService,
) -> None:
    ran: list[Any] = []

    @service.handler("sync")
    async def sync(message: QueueMessage) -> None:
        ran.append(message.data)

    key = Deduplication("sync-user-1")
    first = await service.enqueue("sync", 1, deduplication=key)
    assert await service.enqueue("sync", 2, deduplication=key) == first
    await service.start_worker(burst=True)
    assert ran == [1]
    second = await service.enqueue("sync", 3, deduplication=key)  # finished: the id is free
    assert second != first
    assert await service.enqueue("sync", 4, deduplication=key) == second
    assert await service.remove(second)
    third = await service.enqueue("sync", 5, deduplication=key)  # removed: free again
    assert third not in (first, second)
    await service.start_worker(burst=True)
    assert ran == [1, 5]


async def test_throttle_window_ends_and_extend_restarts_it(service: QueueService) -> None:
    throttle = Deduplication("t", ttl_s=0.3)
    first = await service.enqueue("job", 1, deduplication=throttle)
    assert await service.enqueue("job", 2, deduplication=throttle) == first
    await asyncio.sleep(0.35)
    assert await service.enqueue("job", 3, deduplication=throttle) != first

    extend = Deduplication("e", ttl_s=1.0, extend=True)
    standing = await service.enqueue("job", 1, deduplication=extend)
    await asyncio.sleep(0.6)
    assert await service.enqueue("job", 2, deduplication=extend) == standing  # restarts 1 s
    await asyncio.sleep(0.6)  # past the first window, inside the restarted one
    assert await service.enqueue("job", 3, deduplication=extend) == standing
    assert await total(service) == 3


async def test_debounce_runs_the_last_payload_once_after_the_delay(
    service: QueueService,
) -> None:
    runs: list[tuple[Any, float]] = []

    @service.handler("save")
    async def save(message: QueueMessage) -> None:
        runs.append((message.data, time.monotonic()))

    debounce = Deduplication("draft-9", ttl_s=5, extend=True, replace=True)
    ids = []
    for n in range(5):
        ids.append(await service.enqueue("save", {"v": n}, delay_s=0.3, deduplication=debounce))
        await asyncio.sleep(0.03)
    last_call = time.monotonic()
    assert len(set(ids)) == 5  # each call replaced the delayed job: its id is the last one
    counts = await service.counts()
    assert (counts[JobState.DELAYED], await total(service)) == (1, 1)
    await run_worker_until(service, finished(service, 1), timeout_s=10)
    assert [data for data, _ in runs] == [{"v": 4}]
    assert runs[0][1] - last_call >= 0.25  # it waited for its delay from the last call
    info = await service.get_job(ids[-1])
    assert info is not None and info.state is JobState.COMPLETED


async def test_bad_deduplication_options_are_refused(service: QueueService) -> None:
    for options, message in (
        ({"id": ""}, "a deduplication id must be a non-empty string"),
        ({"id": "x", "ttl_s": 0}, "ttl_s must be a number >= 0.001"),
        ({"id": "x", "ttl_s": float("inf")}, "ttl_s must be a number >= 0.001"),
        ({"id": "x", "extend": True}, "give ttl_s too"),
        ({"id": "x", "ttl_s": 1, "replace": "yes"}, "replace must be True or False"),
    ):
        with pytest.raises(PayloadError, match=message):
            Deduplication(**options)
    with pytest.raises(PayloadError, match=r"must be a corral.Deduplication"):
        await service.enqueue("job", deduplication="x")  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="deduplication is not an option of schedule"):
        await service.schedule("s", "job", every_s=60, deduplication=Deduplication("x"))
    conn = sqlite3.connect(":memory:")
    conn.execute("BEGIN")
    with pytest.raises(PayloadError, match="not an option of enqueue_in_transaction"):
        service.enqueue_in_transaction(conn, "job", deduplication=Deduplication("x"))
    conn.close()
    assert await total(service) == 0


@pytest.mark.parametrize("backend_kind", ["sqlite"])
async def test_sqlite_dedup_is_written_with_the_job_and_survives_reopening(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    key = Deduplication("k", ttl_s=60)
    async with QueueService(settings) as service:
        first = await service.enqueue("job", 1, deduplication=key)
    async with QueueService(settings) as again:  # another connection, as another process
        assert again.enqueue_sync("job", 2, deduplication=key) == first
        assert await total(again) == 1
