"""Enqueue-to-waiting latency through the transactional outbox and its relay.

    python bench/outbox_latency.py [--jobs 1000] [--rate 200] [--outbox postgresql|sqlite|both]
                                   [--pg-url URL] [--redis-url URL | --shared-redis]

A producer commits one job per transaction (``enqueue_in_transaction``) at a steady rate into an
outbox (the machine's PostgreSQL, in a schema of its own, or a SQLite file); a ``corral relay``
process moves the rows to a BullMQ queue on Redis. For each job, latency = the time the relay
pushed it (the job's BullMQ ``timestamp``, taken just before the add script runs, so the Redis
round trip of the add, ~0.2 ms on loopback, is not counted) minus the time the producer's COMMIT
returned. Both clocks are this machine's. Prints p50/p95/p99/max per outbox; the figures in
docs/performance.md come from this script.

By default the queue is on a private ``redis-server`` started on a free loopback port (and
stopped at the end), so that other users of the machine's Redis (a benchmark deleting 100,000
keys blocks it for a while) do not show up as relay latency; ``--redis-url`` or
``--shared-redis`` (127.0.0.1:6379) use an existing one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis

from corral import QueueService, QueueSettings, outbox

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    queue = f"outbox-bench-{uuid.uuid4().hex[:8]}"
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    if kind == "postgresql":
        url, table = args.pg_url, f"{schema}.corral_outbox"
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        with psycopg.connect(url) as conn:
            outbox.install(conn, table)
    else:
        path = workdir / f"{schema}.db"
        url, table = f"sqlite:///{path}", "corral_outbox"
        with sqlite3.connect(path) as lite:
            lite.execute("PRAGMA journal_mode = WAL")
            outbox.install(lite, table)
    settings = QueueSettings(
        backend="bullmq", redis_url=args.redis_url, name=queue, outbox_url=url, outbox_table=table
    )
    service = QueueService(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_")}
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        QUEUE_BACKEND="bullmq",
        QUEUE_REDIS_URL=args.redis_url,
        QUEUE_NAME=queue,
        QUEUE_OUTBOX_URL=url,
        QUEUE_OUTBOX_TABLE=table,
    )
    relay = subprocess.Popen(
        [sys.executable, "-m", "corral", "--log-level", "info", "relay"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    committed: dict[str, float] = {}
    try:
        # Measure from the relay's first wait on: its start-up (imports, connections) is not
        # relay latency.
        assert relay.stderr is not None
        for line in relay.stderr:
            if "relay started" in line:
                break
        threading.Thread(target=relay.stderr.read, daemon=True).start()  # keep the pipe drained
        time.sleep(0.5)
        gap = 1.0 / args.rate
        start = time.perf_counter()
        if kind == "postgresql":
            with psycopg.connect(url) as conn:
                for i in range(args.jobs):
                    job_id = f"lat-{i}"
                    with conn.transaction():
                        service.enqueue_in_transaction(conn, "noop", {"i": i}, job_id=job_id)
                    committed[job_id] = time.time() * 1000
                    _pace(start, (i + 1) * gap)
        else:
            with sqlite3.connect(workdir / f"{schema}.db") as lite:
                # The application's settings are corral's own: WAL, and no sync per commit
                # (with FULL, 200 commits/s hold the write lock most of the time on this disk).
                lite.execute("PRAGMA synchronous = NORMAL")
                for i in range(args.jobs):
                    job_id = f"lat-{i}"
                    service.enqueue_in_transaction(lite, "noop", {"i": i}, job_id=job_id)
                    lite.commit()
                    committed[job_id] = time.time() * 1000
                    _pace(start, (i + 1) * gap)
        client = redis.Redis.from_url(args.redis_url, decode_responses=True)
        deadline = time.monotonic() + 60
        pushed: dict[str, float] = {}
        while len(pushed) < args.jobs and time.monotonic() < deadline:
            pipe = client.pipeline(transaction=False)
            missing = [job_id for job_id in committed if job_id not in pushed]
            for job_id in missing:
                pipe.hget(f"bull:{queue}:{job_id}", "timestamp")
            for job_id, stamp in zip(missing, pipe.execute(), strict=True):
                if stamp is not None:
                    pushed[job_id] = float(stamp)
            time.sleep(0.05)
        latencies = [pushed[job_id] - committed[job_id] for job_id in pushed]
        keys = list(client.scan_iter(match=f"bull:{queue}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)
        asyncio.run(service.close())
        if kind == "postgresql":
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")
    return {
        "outbox": kind,
        "jobs": len(latencies),
        "lost": args.jobs - len(latencies),
        "p50": percentile(latencies, 0.50),
        "p95": percentile(latencies, 0.95),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
    }


def _pace(start: float, due: float) -> None:
    wait = start + due - time.perf_counter()
    if wait > 0:
        time.sleep(wait)


def private_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server without persistence on a free loopback port, and its URL."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed; pass --redis-url or --shared-redis")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="commits per second")
    parser.add_argument("--outbox", choices=("postgresql", "sqlite", "both"), default="both")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", help="an existing Redis [default: a private one]")
    parser.add_argument("--shared-redis", action="store_true", help="use 127.0.0.1:6379")
    args = parser.parse_args()
    server = None
    if args.shared_redis:
        args.redis_url = "redis://127.0.0.1:6379/0"
    elif args.redis_url is None:
        server, args.redis_url = private_redis()
    kinds = ("postgresql", "sqlite") if args.outbox == "both" else (args.outbox,)
    print(f"{args.jobs} jobs, one per transaction, at {args.rate:g}/s; relay -> BullMQ on Redis")
    print("| outbox | jobs | lost | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for kind in kinds:
                row = measure(kind, args, Path(workdir))
                print(
                    f"| {row['outbox']} | {row['jobs']} | {row['lost']} | {row['p50']:.1f} | "
                    f"{row['p95']:.1f} | {row['p99']:.1f} | {row['max']:.1f} |"
                )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
