"""Per-minute throughput (corral.metrics) on both backends: what workers record, what
``throughput()`` reads, and on BullMQ what Node's ``Queue.getMetrics()`` sees."""

from __future__ import annotations

import pytest

from corral import ConfigError, QueueMessage, QueueService
from corral.dashboard.storage import Storage
from corral.metrics import MINUTE_MS

from conftest import SettingsFactory, finished, run_worker_until


async def test_workers_count_finished_jobs_per_minute(make_settings: SettingsFactory) -> None:
    settings = make_settings(attempts=2)
    async with QueueService(settings) as service:

        @service.handler("work")
        async def work(message: QueueMessage) -> int:
            if message.data == "fail" or (message.data == "flaky" and message.attempt == 1):
                raise RuntimeError("no")
            return 1

        for data in ["ok"] * 5 + ["flaky", "fail", "fail"]:
            await service.enqueue("work", data)
        await run_worker_until(service, finished(service, 8))

        throughput = await service.throughput(minutes=3)
        # A retried attempt is not counted; each job once, when it finished for good.
        assert (sum(throughput.completed), sum(throughput.failed)) == (6, 2)
        assert len(throughput.completed) == len(throughput.failed) == 3
        assert throughput.end.timestamp() * 1000 % MINUTE_MS == 0

        # The dashboard's chart reads the same series (its last hour).
        storage = Storage(settings)
        try:
            chart = await storage.throughput(settings.name)
            assert chart is not None and len(chart.completed) == 60
            assert (sum(chart.completed), sum(chart.failed)) == (6, 2)
        finally:
            await storage.close()

        with pytest.raises(ConfigError, match="minutes"):
            await service.throughput(minutes=0)


async def test_metrics_off_records_nothing(make_settings: SettingsFactory) -> None:
    settings = make_settings(metrics_minutes=0)
    async with QueueService(settings) as service:
        service.handler("work")(_ok)
        await service.enqueue_many([{"name": "work", "data": n} for n in range(3)])
        await run_worker_until(service, finished(service, 3))
        throughput = await service.throughput(minutes=2)
        assert throughput.completed == [0, 0] and throughput.failed == [0, 0]
        storage = Storage(settings)
        try:
            assert await storage.throughput(settings.name) is None
        finally:
            await storage.close()


async def _ok(message: QueueMessage) -> None:
    return None


async def test_each_minute_gets_its_jobs(
    make_settings: SettingsFactory, backend_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs settled in different minutes (the workers' clock is set by the handler) land in
    their minutes, with zeros between, and a minute older than ``metrics_minutes`` closed
    minutes is dropped when a new one opens (BullMQ trims its list, SQLite deletes rows)."""
    start = (_real_now() // MINUTE_MS - 10) * MINUTE_MS + 1_000
    clock = [start]
    module = f"corral.backends.{backend_kind}"
    for name in (f"{module}.source.now_ms", f"{module}.backend.now_ms"):
        monkeypatch.setattr(name, lambda: clock[0])
    # A long lease: the fake clock jumps minutes between a claim and its settle.
    settings = make_settings(lease_s=3600, metrics_minutes=3)
    async with QueueService(settings) as service:

        @service.handler("at")
        async def at(message: QueueMessage) -> None:
            clock[0] = start + message.data * MINUTE_MS
            if message.data == 3:
                raise RuntimeError("failed in minute 3")

        await service.enqueue_many([{"name": "at", "data": m} for m in (0, 0, 0, 1, 1, 3, 4)])
        await run_worker_until(service, finished(service, 7), concurrency=1)

        clock[0] = start + 4 * MINUTE_MS + 30_000
        throughput = await service.throughput(minutes=6)  # minutes -1 to 4
        assert throughput.completed == [0, 0, 2, 0, 0, 1]  # minute 0 was dropped
        assert throughput.failed == [0, 0, 0, 0, 1, 0]
        assert throughput.end.timestamp() * 1000 == start - 1_000 + 5 * MINUTE_MS

        clock[0] = start + 6 * MINUTE_MS  # later, with no job since
        throughput = await service.throughput(minutes=3)
        assert (throughput.completed, throughput.failed) == ([1, 0, 0], [0, 0, 0])


def _real_now() -> int:
    import time

    return time.time_ns() // 1_000_000
