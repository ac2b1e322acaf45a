"""How fast the dashboard's pages are on a big queue.

    python bench/dashboard.py [--jobs 1000000] [--repeat 5] [--db PATH] [--markdown PATH]

Fills a SQLite file with ``--jobs`` jobs in one queue (60% completed, 20% failed, 15% waiting,
5% delayed; written straight into the table with ``executemany``, which takes seconds where
enqueueing a million jobs would take far longer), plus a few small queues, then requests each
page of the dashboard in-process (Starlette's test client: the app's own time, no network) and
reports the median and the slowest of ``--repeat`` requests. A file that already holds the jobs
(``--db``) is reused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from starlette.testclient import TestClient

from corral.backends.sqlite.database import Database
from corral.dashboard import create_app
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
                yield row(QUEUE, name, data, state, run_at=at, enqueued_at=at, attempts_made=1,
                          finished_at=at + 5, result='"ok"')  # fmt: skip
            elif state == "failed":
                yield row(QUEUE, name, data, state, run_at=at, enqueued_at=at, attempts_made=3,
                          finished_at=at + 5, error="OSError: down")  # fmt: skip
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


def pages(total: int) -> list[tuple[str, str]]:
    deep = round(total * 0.60) // 50 // 2  # the middle page of the completed jobs
    return [
        ("overview (every queue, its counts)", "/"),
        ("queue, waiting, page 1", f"/queues/{QUEUE}?state=waiting"),
        ("queue, completed, page 1", f"/queues/{QUEUE}?state=completed"),
        ("queue, failed, page 1", f"/queues/{QUEUE}?state=failed"),
        (
            f"queue, completed, page {deep:,} (offset {deep * 50 - 50:,})",
            f"/queues/{QUEUE}?state=completed&page={deep}",
        ),
        ("queue, delayed, last page", f"/queues/{QUEUE}?state=delayed&page=1000"),
        (
            "search by name, completed (one 10,000-job window)",
            f"/queues/{QUEUE}?state=completed&q=charge",
        ),
        ("search by name, no match (one window)", f"/queues/{QUEUE}?state=failed&q=nothing"),
        ("search by id (redirects to the job)", f"/queues/{QUEUE}?state=waiting&q=123456"),
        ("job page (3 tracebacks)", f"/queues/{QUEUE}/jobs/{round(total * 0.7)}"),
    ]


async def count(path: str) -> None:
    async with QueueService(QueueSettings(sqlite_path=path, name=QUEUE)) as service:
        await service.counts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", help="SQLite file to fill (kept); default a temporary one")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.db or os.path.join(scratch, "dashboard-bench.db")
        filled_s = fill(path, args.jobs)
        size_mb = Path(path).stat().st_size / 1e6
        print(f"{args.jobs:,} jobs in {path} ({size_mb:,.0f} MB), written in {filled_s:.1f} s")
        app = create_app(QueueSettings(sqlite_path=path, name=QUEUE))
        lines = ["| page | median ms | slowest ms |", "| --- | ---: | ---: |"]
        with TestClient(app) as client:
            for title, url in pages(args.jobs):
                times = []
                for _ in range(args.repeat + 1):  # the first request warms the page cache
                    started = time.perf_counter()
                    response = client.get(url, follow_redirects=False)
                    times.append((time.perf_counter() - started) * 1000)
                    if response.status_code not in (200, 303):
                        raise SystemExit(f"{url} answered {response.status_code}")
                measured = times[1:]
                lines.append(
                    f"| {title} | {statistics.median(measured):.1f} | {max(measured):.1f} |"
                )
                print(lines[-1], flush=True)
        counting = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            asyncio.run(count(path))
            counting.append((time.perf_counter() - started) * 1000)
        lines.append(
            f"| exact counts of the {args.jobs:,}-job queue (`corral stats`; the dashboard "
            f"counts each queue at most every 2 s, off its event loop) "
            f"| {statistics.median(counting):.1f} | {max(counting):.1f} |"
        )
        print(lines[-1], flush=True)
        if args.markdown:
            Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
