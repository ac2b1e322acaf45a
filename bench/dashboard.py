"""How fast the dashboard's pages are on a big queue.

    python bench/dashboard.py [--backend sqlite|bullmq] [--jobs 1000000] [--repeat 5]
                              [--db PATH] [--markdown PATH]

SQLite: fills a file with ``--jobs`` jobs in one queue (60% completed, 20% failed, 15% waiting,
5% delayed), written straight into the table with ``executemany``, which takes a minute where
enqueueing and running a million jobs would take far longer; a file that already holds them
(``--db``) is reused. BullMQ: starts a redis-server of its own on a free port and has corral
enqueue the jobs in bulk and a worker run 40% of them. Both add a few small queues, then request
each page of the dashboard in-process (Starlette's test client: the app's own time, no network)
and report the median and the slowest of ``--repeat`` requests after a warm-up one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from corral.backends.sqlite.database import Database
from corral.dashboard import create_app
from corral.message import JobState, QueueMessage
from corral.service import QueueService
from corral.settings import QueueSettings

QUEUE = "big"
TRACEBACK = 'Traceback (most recent call last):\n  File "tasks.py", line 12, in send\nOSError: down'
SHARES = (("completed", 0.60), ("failed", 0.20), ("waiting", 0.15), ("delayed", 0.05))
NAMES = ("send_email", "resize_image", "charge_card", "build_report")

INSERT = (
    "INSERT INTO jobs (queue, name, data, state, priority, run_at, enqueued_at, "
    "attempts_made, max_attempts, started_at, finished_at, result, error, traceback, "
    "tracebacks, logs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def row(
    queue: str,
    name: str,
    data: str,
    state: str,
    *,
    run_at: int,
    enqueued_at: int,
    attempts_made: int = 0,
    finished_at: int | None = None,
    result: str | None = None,
    error: str | None = None,
) -> tuple[object, ...]:
    """One job as the backend leaves it in ``state`` (the columns of :data:`INSERT`)."""
    traces = [TRACEBACK] * attempts_made if error else []
    return (
        queue,
        name,
        data,
        state,
        0,
        run_at,
        enqueued_at,
        attempts_made,
        3,
        finished_at - 5 if finished_at else None,
        finished_at,
        result,
        error,
        traces[-1] if traces else None,
        json.dumps(traces) if traces else None,
        None,
    )


def rows(total: int, start_ms: int) -> Iterator[tuple[object, ...]]:
    """The big queue's jobs: :data:`SHARES` of ``total`` in each state."""
    position = 0
    for state, share in SHARES:
        for _ in range(round(total * share)):
            position += 1
            at = start_ms + position
            name = NAMES[position % len(NAMES)]
            data = json.dumps({"n": position, "to": f"user{position}@example.com"})
            if state == "completed":
                yield row(
                    QUEUE,
                    name,
                    data,
                    state,
                    run_at=at,
                    enqueued_at=at,
                    attempts_made=1,
                    finished_at=at + 5,
                    result='"ok"',
                )
            elif state == "failed":
                yield row(
                    QUEUE,
                    name,
                    data,
                    state,
                    run_at=at,
                    enqueued_at=at,
                    attempts_made=3,
                    finished_at=at + 5,
                    error="OSError: down",
                )
            elif state == "waiting":
                yield row(QUEUE, name, data, state, run_at=at, enqueued_at=at)
            else:
                yield row(QUEUE, name, data, state, run_at=at + 3_600_000, enqueued_at=at)


def fill(path: str, total: int) -> float:
    """Write the jobs unless the file has them; return the seconds it took."""
    Database(path, poll_interval_s=1.0).conn.close()  # the schema, as corral creates it
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        have = conn.execute("SELECT count(*) FROM jobs WHERE queue = ?", (QUEUE,)).fetchone()[0]
        if have >= total:
            return 0.0
        started = time.perf_counter()
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        conn.execute("DELETE FROM jobs")
        conn.executemany(INSERT, rows(total, int(time.time() * 1000) - total - 60_000))
        for queue in ("emails", "images", "reports"):
            small = [row(queue, "x", "{}", "waiting", run_at=0, enqueued_at=0)] * 10
            conn.executemany(INSERT, small)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        return time.perf_counter() - started
    finally:
        conn.close()


def pages(counts: dict[JobState, int], job_id: str) -> list[tuple[str, str]]:
    deep = max(1, counts[JobState.COMPLETED] // 50 // 2)  # the middle page of completed jobs
    last_delayed = max(1, -(-counts[JobState.DELAYED] // 50))
    return [
        ("overview (every queue, its counts)", "/"),
        ("queue, waiting, page 1", f"/queues/{QUEUE}?state=waiting"),
        ("queue, completed, page 1", f"/queues/{QUEUE}?state=completed"),
        ("queue, failed, page 1", f"/queues/{QUEUE}?state=failed"),
        (
            f"queue, completed, page {deep:,} (offset {deep * 50 - 50:,})",
            f"/queues/{QUEUE}?state=completed&page={deep}",
        ),
        (
            f"queue, delayed, last page ({last_delayed:,})",
            f"/queues/{QUEUE}?state=delayed&page={last_delayed}",
        ),
        (
            "search by name, completed (one 10,000-job window)",
            f"/queues/{QUEUE}?state=completed&q=charge",
        ),
        ("search by name, no match (one window)", f"/queues/{QUEUE}?state=failed&q=nothing"),
        ("search by id (redirects to the job)", f"/queues/{QUEUE}?state=waiting&q={job_id}"),
        ("job page (a failed job, its tracebacks)", f"/queues/{QUEUE}/jobs/{job_id}"),
    ]


async def fill_redis(settings: QueueSettings, total: int) -> None:
    """``total`` jobs through corral itself: 95% enqueued in bulk (5% of them delayed), then a
    worker runs until 40% of all have finished, one in four failing."""
    async with QueueService(settings) as service:

        @service.handler("charge_card")
        async def fails(message: QueueMessage) -> None:
            raise OSError("down")

        async def works(message: QueueMessage) -> str:
            return "ok"

        for name in NAMES:
            if name != "charge_card":
                service.handler(name)(works)
        batch: list[dict[str, Any]] = []
        for n in range(total):
            job: dict[str, Any] = {
                "name": NAMES[n % len(NAMES)],
                "data": {"n": n, "to": f"user{n}@example.com"},
                "attempts": 1,
            }
            if n % 20 == 19:
                job["delay_s"] = 3600
            batch.append(job)
            if len(batch) == 10_000:
                await service.enqueue_many(batch)
                batch = []
        if batch:
            await service.enqueue_many(batch)
        worker = asyncio.create_task(service.start_worker(concurrency=50))
        while True:
            counts = await service.counts()
            if counts[JobState.COMPLETED] + counts[JobState.FAILED] >= total * 0.4:
                break
            await asyncio.sleep(0.5)
        service.stop()
        await worker
        for queue in ("emails", "images", "reports"):
            await service.backend.for_queue(queue).enqueue(
                [service.build_job("x", {}) for _ in range(10)]
            )


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of its own on a free port of 127.0.0.1, stopped afterwards."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


async def facts(settings: QueueSettings) -> tuple[dict[JobState, int], str, float]:
    """The big queue's counts, a failed job's id, and how long listing the queues takes."""
    async with QueueService(settings) as service:
        failed = await service.list_jobs("failed", limit=1)
        started = time.perf_counter()
        await service.list_queues()
        listing_ms = (time.perf_counter() - started) * 1000
        return await service.counts(), failed[0].id, listing_ms


async def count(settings: QueueSettings) -> None:
    async with QueueService(settings) as service:
        await service.counts()


def measure(settings: QueueSettings, repeat: int, total: int) -> list[str]:
    counts, job_id, listing_ms = asyncio.run(facts(settings))
    lines = ["| page | median ms | slowest ms |", "| --- | ---: | ---: |"]
    with TestClient(create_app(settings)) as client:
        for title, url in pages(counts, job_id):
            times = []
            for _ in range(repeat + 1):  # the first request warms caches
                started = time.perf_counter()
                response = client.get(url, follow_redirects=False)
                times.append((time.perf_counter() - started) * 1000)
                if response.status_code not in (200, 303):
                    raise SystemExit(f"{url} answered {response.status_code}")
            measured = times[1:]
            lines.append(f"| {title} | {statistics.median(measured):.1f} | {max(measured):.1f} |")
            print(lines[-1], flush=True)
    counting = []
    for _ in range(repeat):
        started = time.perf_counter()
        asyncio.run(count(settings))
        counting.append((time.perf_counter() - started) * 1000)
    lines.append(
        f"| exact counts of the {total:,}-job queue (`corral stats`; the dashboard counts each "
        f"queue at most every 2 s, off its event loop) | {statistics.median(counting):.1f} "
        f"| {max(counting):.1f} |"
    )
    lines.append(
        "| list every queue of the storage (the dashboard keeps the list 30 s, then reads it "
        "again in the background) "
        f"| {listing_ms:.1f} | |"
    )
    print(*lines[-2:], sep="\n", flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "bullmq"), default="sqlite")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", help="SQLite file to fill (kept); default a temporary one")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    logging.getLogger("corral").setLevel(logging.CRITICAL)  # not a line per failing job
    with tempfile.TemporaryDirectory() as scratch:
        if args.backend == "sqlite":
            path = args.db or os.path.join(scratch, "dashboard-bench.db")
            filled_s = fill(path, args.jobs)
            size_mb = Path(path).stat().st_size / 1e6
            print(f"{args.jobs:,} jobs in {path} ({size_mb:,.0f} MB), written in {filled_s:.1f} s")
            lines = measure(QueueSettings(sqlite_path=path, name=QUEUE), args.repeat, args.jobs)
        else:
            with private_redis() as url:
                settings = QueueSettings(
                    backend="bullmq",
                    redis_url=url,
                    name=QUEUE,
                    keep_completed=None,
                    backoff_delay_s=0,
                )
                started = time.perf_counter()
                asyncio.run(fill_redis(settings, args.jobs))
                print(
                    f"{args.jobs:,} jobs in Redis, written and run in "
                    f"{time.perf_counter() - started:.1f} s",
                    flush=True,
                )
                lines = measure(settings, args.repeat, args.jobs)
        if args.markdown:
            Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
