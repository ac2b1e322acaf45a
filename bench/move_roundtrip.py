"""Time a SQLite -> Redis -> SQLite move of many jobs with every option, and check it.

    python bench/move_roundtrip.py [--jobs 100000] [--redis-url URL] [--batch-size 500]

The CI test (tests/test_move.py) does the same with 20,000 jobs; this is the full-size run whose
time docs/performance.md reports. Jobs: every fourth delayed, half with custom ids, priorities
0-3, attempts 1-5, fixed or exponential backoff with jitter; 200 failed ones (error and
traceback) and 200 waiting for a retry (one attempt made). Exits 1 if a job was lost, duplicated
or changed on the way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from corral import JobState, QueueMessage, QueueService, QueueSettings, Retry


def jobs(count: int) -> list[dict[str, Any]]:
    made = []
    for i in range(count):
        job: dict[str, Any] = {
            "name": f"task{i % 3}",
            "data": {"i": i, "tags": ["a", i % 7]},
            "priority": i % 4,
            "attempts": 1 + i % 5,
            "backoff": Retry.exponential(1.5, 0.2) if i % 2 else Retry.fixed(3),
        }
        if i % 2:
            job["job_id"] = f"job-{i}"
        if i % 4 == 1:
            job["delay_s"] = 3600 + i
        made.append(job)
    return made


async def snapshot(service: QueueService) -> dict[str, tuple[Any, ...]]:
    seen: dict[str, tuple[Any, ...]] = {}
    for state in (JobState.WAITING, JobState.DELAYED, JobState.FAILED):
        offset = 0
        while page := await service.list_jobs(state, limit=5000, offset=offset):
            offset += len(page)
            for job in page:
                seen[job.id] = (
                    job.name,
                    job.data,
                    job.state,
                    job.priority,
                    job.max_attempts,
                    job.attempts_made,
                    job.error,
                    job.run_at if job.state is JobState.DELAYED else None,
                )
    return seen


async def run(count: int, redis_url: str, batch_size: int, workdir: Path) -> int:
    name = f"move-bench-{uuid.uuid4().hex[:8]}"
    first = QueueSettings(sqlite_path=str(workdir / "first.db"), name=name, attempts=1)
    on_redis = QueueSettings(backend="bullmq", redis_url=redis_url, name=name)
    back = QueueSettings(sqlite_path=str(workdir / "back.db"), name=name)
    source, middle, final = QueueService(first), QueueService(on_redis), QueueService(back)

    @source.handler("boom")
    def boom(message: QueueMessage) -> None:
        raise ValueError(f"boom {message.data}")

    try:
        await source.enqueue_many([{"name": "boom", "data": i} for i in range(200)])
        await source.enqueue_many(
            [
                {"name": "boom", "data": i, "attempts": 2, "backoff": Retry.fixed(3600)}
                for i in range(200)
            ]
        )
        await source.start_worker(burst=True, concurrency=50)
        made = jobs(count)
        for start in range(0, count, 10_000):
            await source.enqueue_many(made[start : start + 10_000])
        before = await snapshot(source)
        started = time.perf_counter()
        there = await source.move_to(on_redis, batch_size=batch_size)
        to_redis = time.perf_counter() - started
        started = time.perf_counter()
        home = await middle.move_to(back, batch_size=batch_size)
        to_sqlite = time.perf_counter() - started
        after = await snapshot(final)
        total = len(before)
        print(
            f"{total} jobs: SQLite -> Redis {to_redis:.1f} s ({total / to_redis:,.0f} jobs/s), "
            f"Redis -> SQLite {to_sqlite:.1f} s ({total / to_sqlite:,.0f} jobs/s), "
            f"round trip {to_redis + to_sqlite:.1f} s"
        )
        ok = after == before and there.total_moved == home.total_moved == total
        print("every job arrived once and unchanged" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        await middle.purge()
        for service in (source, middle, final):
            await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    logging.getLogger("corral").setLevel(logging.CRITICAL)  # the 400 failures are on purpose
    with tempfile.TemporaryDirectory() as workdir:
        sys.exit(asyncio.run(run(args.jobs, args.redis_url, args.batch_size, Path(workdir))))


if __name__ == "__main__":
    main()
