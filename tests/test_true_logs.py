"""Logs and retention that stay true under load: no false "lease lost" for a job that settles
while its lease is being renewed, a lease really lost still reported, and keep_completed held
while jobs flow. Both backends."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from corral import JobState, QueueService
from corral.backends.bullmq.source import BullMQSource
from corral.backends.sqlite.source import SQLiteSource, trim_slack

from conftest import SettingsFactory, finished, run_worker_until

pytestmark = pytest.mark.timeout(60)

LOST = "lease lost"


def lost_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if LOST in r.getMessage()]


async def test_jobs_settled_during_a_renewal_are_not_reported_lost(
    make_settings: SettingsFactory,
    backend_kind: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reply to each settle arrives 0.1 s after its write, as under load: leases renew
    # every 0.1 s, so every renewal sees jobs that are settled in storage and still held here.
    source = SQLiteSource if backend_kind == "sqlite" else BullMQSource
    real_settle = source.settle

    async def late_reply(self: Any, *args: Any, **kwargs: Any) -> Any:
        fetched = await real_settle(self, *args, **kwargs)
        await asyncio.sleep(0.1)
        return fetched

    monkeypatch.setattr(source, "settle", late_reply)
    total = 200
    service = QueueService(make_settings(lease_s=0.3, keep_completed=None))

    @service.handler("quick")
    async def quick(message: object) -> None:
        pass

    await service.enqueue_many({"name": "quick"} for _ in range(total))
    caplog.set_level(logging.WARNING, logger="corral")
    await run_worker_until(service, finished(service, total), concurrency=50, timeout_s=20)
    counts = await service.counts()
    await service.close()
    assert counts[JobState.COMPLETED] == total
    assert lost_lines(caplog) == []


async def test_a_lease_really_lost_is_reported(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    service = QueueService(make_settings(lease_s=0.2, keep_completed=None))

    @service.handler("hog")
    async def hog(message: object) -> None:
        time.sleep(0.6)  # blocks the loop: no renewal can run, the lease expires
        await asyncio.sleep(0.4)  # still running when renewals resume

    job_id = await service.enqueue("hog")
    caplog.set_level(logging.WARNING, logger="corral")
    await run_worker_until(service, finished(service, 1), timeout_s=20)
    await service.close()
    lines = lost_lines(caplog)
    assert lines and all(f"job {job_id}" in line for line in lines), lines


async def test_keep_completed_holds_while_jobs_flow(
    make_settings: SettingsFactory, backend_kind: str
) -> None:
    keep, total = 100, 5000
    # BullMQ trims in moveToFinished at every finish; SQLite every trim_slack completions.
    bound = keep if backend_kind == "bullmq" else keep + trim_slack(keep)
    service = QueueService(make_settings(keep_completed=keep))
    processed = 0

    @service.handler("quick")
    async def quick(message: object) -> None:
        nonlocal processed
        processed += 1

    await service.enqueue_many({"name": "quick"} for _ in range(total))
    seen: list[int] = []

    async def done() -> bool:
        counts = await service.counts()
        seen.append(counts[JobState.COMPLETED])
        return counts[JobState.WAITING] + counts[JobState.ACTIVE] == 0

    await run_worker_until(service, done, concurrency=50, timeout_s=30)
    final = (await service.counts())[JobState.COMPLETED]
    await service.close()
    assert processed == total
    assert len(seen) > 5  # sampled while the jobs flowed
    assert max(seen) <= bound, (max(seen), bound)
    assert keep <= final <= bound
