"""SQLite-specific guarantees: processes sharing one file, crashes, fencing, bad files."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from corral import (
    BackendConnectionError,
    BackendError,
    JobState,
    LeaseLostError,
    QueueMessage,
    QueueService,
    QueueSettings,
)
from corral.backends.sqlite import SCHEMA_VERSION, SQLiteBackend
from corral.message import Completed, Failed

from conftest import PYTHON, python_env, unique_queue_name

HERE = Path(__file__).resolve().parent


def sqlite_settings(path: Path, **overrides: object) -> QueueSettings:
    values: dict[str, object] = {
        "backend": "sqlite",
        "sqlite_path": str(path),
        "name": "q",
        "attempts": 1,
        "shutdown_grace_s": 2.0,
    }
    values.update(overrides)
    return QueueSettings(**values)  # type: ignore[arg-type]


def start_worker(
    db: Path, ledger: Path, *, burst: bool = False, **env: str
) -> subprocess.Popen[bytes]:
    extra = {
        "QUEUE_BACKEND": "sqlite",
        "QUEUE_SQLITE_PATH": str(db),
        "QUEUE_NAME": "q",
        "LEDGER_BURST": "1" if burst else "0",
        **env,
    }
    return subprocess.Popen(
        [PYTHON, str(HERE / "ledger_worker.py"), str(ledger)],
        env=python_env(**extra),
        stderr=subprocess.PIPE,
    )


def read_ledger(ledger: Path) -> list[tuple[str, str, str, str]]:
    if not ledger.exists():
        return []
    return [tuple(line.split()) for line in ledger.read_text().splitlines()]  # type: ignore[misc]


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def test_killed_worker_job_runs_again_after_lease(tmp_path: Path) -> None:
    db, ledger = tmp_path / "q.db", tmp_path / "ledger"
    settings = sqlite_settings(db, lease_s=1.0, max_stalls=3)
    async with QueueService(settings) as service:
        job_id = await service.enqueue("record", {"sleep_s": 0.5})
        victim = start_worker(db, ledger, QUEUE_LEASE_S="1.0", QUEUE_MAX_STALLS="3")
        wait_for(lambda: any(r[0] == "start" for r in read_ledger(ledger)), 20, "job start")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        job = await service.get_job(job_id)
        assert job is not None and job.state == JobState.ACTIVE  # its lease has not expired yet

        killed_at = time.monotonic()
        survivor = start_worker(db, ledger, QUEUE_LEASE_S="1.0", QUEUE_MAX_STALLS="3")
        try:
            wait_for(lambda: any(r[0] == "done" for r in read_ledger(ledger)), 20, "rerun")
            rerun_after = time.monotonic() - killed_at
        finally:
            survivor.send_signal(signal.SIGTERM)
            assert survivor.wait(15) == 0
        job = await service.get_job(job_id)
        assert job is not None and job.state == JobState.COMPLETED
        rows = read_ledger(ledger)
        starts = [r for r in rows if r[0] == "start"]
        dones = [r for r in rows if r[0] == "done"]
        assert len(starts) == 2 and len(dones) == 1
        assert starts[0][3] == str(victim.pid) and dones[0][3] == str(survivor.pid)
        assert rerun_after >= 0.5  # not before the lease ran out


async def test_job_that_keeps_killing_its_worker_is_failed(tmp_path: Path) -> None:
    db, ledger = tmp_path / "q.db", tmp_path / "ledger"
    async with QueueService(sqlite_settings(db)) as service:
        poison = await service.enqueue("record", {"die": True}, attempts=5)
        fine = await service.enqueue("record", {})
        env = {"QUEUE_LEASE_S": "0.4", "QUEUE_MAX_STALLS": "2", "QUEUE_CONCURRENCY": "1"}
        deliveries = 0
        deadline = time.monotonic() + 40
        while True:
            job = await service.get_job(poison)
            assert job is not None
            if job.state == JobState.FAILED:
                break
            assert time.monotonic() < deadline, "poison job never failed"
            proc = start_worker(db, ledger, burst=True, **env)
            proc.wait(20)
            deliveries = sum(1 for r in read_ledger(ledger) if r[0] == "start" and r[1] == poison)
        assert deliveries == 3  # first delivery plus max_stalls redeliveries
        assert "stalled more than allowable limit (2)" in (job.error or "")
        # The worker that outlives the poison job still does the rest of the queue.
        proc = start_worker(db, ledger, burst=True, **env)
        assert proc.wait(20) == 0
        done = await service.get_job(fine)
        assert done is not None and done.state == JobState.COMPLETED


@pytest.mark.slow
async def test_four_processes_complete_every_job_exactly_once(tmp_path: Path) -> None:
    db, ledger = tmp_path / "q.db", tmp_path / "ledger"
    total = 5000
    async with QueueService(sqlite_settings(db)) as service:
        await service.counts()  # creates the schema before the workers race
        # All four are up and polling before the first job exists (on a busy machine a worker
        # that starts late would otherwise find the queue drained and prove nothing).
        procs = [
            start_worker(db, ledger, QUEUE_CONCURRENCY="20", QUEUE_KEEP_COMPLETED="none")
            for _ in range(4)
        ]
        try:
            wait_for(
                lambda: sum(r[0] == "ready" for r in read_ledger(ledger)) == 4, 60, "4 workers"
            )
            for start in range(0, total, 1000):
                await service.enqueue_many(
                    [{"name": "record", "data": {"n": i}} for i in range(start, start + 1000)]
                )
            deadline = time.monotonic() + 120
            while (await service.counts())[JobState.COMPLETED] < total:
                assert time.monotonic() < deadline, "the four workers did not finish the jobs"
                await asyncio.sleep(0.1)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(30) for proc in procs]
        counts = await service.counts()
    assert codes == [0, 0, 0, 0], [p.stderr.read() if p.stderr else "" for p in procs]
    assert counts[JobState.COMPLETED] == total
    assert counts[JobState.WAITING] == counts[JobState.ACTIVE] == counts[JobState.FAILED] == 0
    rows = read_ledger(ledger)
    done = collections.Counter(r[1] for r in rows if r[0] == "done")
    assert len(done) == total and set(done.values()) == {1}
    workers_used = {r[3] for r in rows if r[0] == "done"}
    assert len(workers_used) == 4


async def test_stale_lease_cannot_settle(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path / "q.db", lease_s=0.2, max_stalls=5)
    backend = SQLiteBackend(settings)
    try:
        (job_id,) = await backend.enqueue([QueueService(settings).build_job("x", {"v": 1})])
        source = backend.open_source(stop=asyncio.Event(), burst=False)
        (stale,) = await source.claim(1)
        await asyncio.sleep(0.3)
        with pytest.raises(LeaseLostError):  # expired, even though nobody took it yet
            await source.settle(stale, Completed("1"))
        source._last_maintain = 0
        await source.maintain()  # takes the expired lease back
        (fresh,) = await source.claim(1)
        assert fresh.token != stale.token and fresh.message and fresh.message.attempt == 1
        with pytest.raises(LeaseLostError):
            await source.settle(stale, Failed("late", ""))
        assert await source.extend([stale]) == [stale]
        assert await source.extend([fresh]) == []
        job = await backend.get_job(job_id)
        assert job is not None and job.state == JobState.ACTIVE and job.error is None
        await source.settle(fresh, Completed('"ok"'))
        job = await backend.get_job(job_id)
        assert job is not None and (job.state, job.result) == (JobState.COMPLETED, "ok")
    finally:
        await backend.close()


async def test_unreadable_rows_fail_and_the_worker_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with QueueService(sqlite_settings(db)) as service:
        ran: list[object] = []

        @service.handler("ok")
        async def ok(message: QueueMessage) -> None:
            ran.append(message.data)

        first = await service.enqueue("ok", 1)
        conn = sqlite3.connect(db)
        now = int(time.time() * 1000)
        for data in ("{not json", "\x80\x04\x95pickle"):
            conn.execute(
                "INSERT INTO jobs (queue, name, data, state, run_at, enqueued_at) "
                "VALUES ('q', 'ok', ?, 'waiting', ?, ?)",
                (data, now, now),
            )
        # Text where a number belongs, claimed in one batch with readable jobs.
        conn.execute(
            "INSERT INTO jobs (queue, name, data, state, priority, run_at, enqueued_at) "
            "VALUES ('q', 'ok', '3', 'waiting', 'high', ?, ?)",
            (now, now),
        )
        conn.commit()
        conn.close()
        last = await service.enqueue("ok", 2)
        await service.start_worker(burst=True)
        assert ran == [1, 2]
        counts = await service.counts()
        assert counts[JobState.FAILED] == 3 and counts[JobState.COMPLETED] == 2
        for job in await service.list_jobs("failed"):
            assert (job.error or "").startswith("unreadable job:")
        assert {first, last} <= {j.id for j in await service.list_jobs("completed")}


async def test_corrupt_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    async with QueueService(sqlite_settings(path)) as service:
        with pytest.raises(BackendError, match="corrupt or not a SQLite file"):
            await service.enqueue("x", 1)


async def test_unwritable_path_gives_a_clear_error(tmp_path: Path) -> None:
    async with QueueService(sqlite_settings(tmp_path / "missing-dir" / "q.db")) as service:
        with pytest.raises(BackendConnectionError, match="cannot open the SQLite database"):
            await service.enqueue("x", 1)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    async with QueueService(sqlite_settings(path)) as service:
        with pytest.raises(BackendError, match="newer than this corral understands"):
            await service.counts()


async def test_retention_keeps_the_newest_completed(tmp_path: Path) -> None:
    async with QueueService(
        sqlite_settings(tmp_path / "q.db", keep_completed=3, lease_s=0.3)
    ) as svc:

        @svc.handler("n")
        async def n(message: QueueMessage) -> None:
            return None

        ids = await svc.enqueue_many([{"name": "n", "data": i} for i in range(10)])
        worker = asyncio.create_task(svc.start_worker(concurrency=1))
        deadline = time.monotonic() + 10
        while (await svc.counts())[JobState.COMPLETED] != 3:
            assert time.monotonic() < deadline, await svc.counts()
            await asyncio.sleep(0.05)
        svc.stop()
        await worker
        kept = [j.id for j in await svc.list_jobs("completed")]
        assert kept == ids[-1:-4:-1]


async def test_memory_database_works_in_one_process() -> None:
    settings = QueueSettings(backend="sqlite", sqlite_path=":memory:", name=unique_queue_name())
    async with QueueService(settings) as service:
        got: list[object] = []

        @service.handler("m")
        async def m(message: QueueMessage) -> None:
            got.append(message.data)

        await service.enqueue("m", 1)
        service.enqueue_sync("m", 2)
        await service.start_worker(burst=True)
        assert sorted(got) == [1, 2]  # type: ignore[type-var]


def test_idle_pickup_across_processes(tmp_path: Path) -> None:
    """A job enqueued by another process reaches an idle worker within a few poll intervals."""
    db, ledger = tmp_path / "q.db", tmp_path / "ledger"
    settings = sqlite_settings(db)
    asyncio.run(QueueService(settings).counts())  # create the schema
    worker = start_worker(db, ledger)
    try:
        wait_for(lambda: any(r[0] == "ready" for r in read_ledger(ledger)), 20, "worker ready")
        time.sleep(0.5)
        latencies = []
        service = QueueService(settings)
        for i in range(20):
            before = len([r for r in read_ledger(ledger) if r[0] == "start"])
            t0 = time.monotonic()
            service.enqueue_sync("record", {"i": i})
            wait_for(
                lambda b=before: len([r for r in read_ledger(ledger) if r[0] == "start"]) > b,
                10,
                "pickup",
            )
            latencies.append(time.monotonic() - t0)
            time.sleep(0.1)
        latencies.sort()
        # The ledger poll adds up to 20 ms; the 50 ms design target is measured by the benchmark.
        assert latencies[len(latencies) // 2] < 0.15, latencies
        assert latencies[-1] < 0.5, latencies
        asyncio.run(service.close())
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(15)


def test_schema_is_created_once_by_racing_processes(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    code = (
        "import asyncio, sys; from corral import QueueService, QueueSettings;"
        f"s = QueueService(QueueSettings(sqlite_path={str(db)!r}, name='q'));"
        "print(asyncio.run(s.enqueue('x', 1)))"
    )
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", code], env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(6)
    ]
    outputs = [p.communicate(30) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outputs]
    ids = sorted(int(o[0]) for o in outputs)
    assert ids == list(range(1, 7))
    version = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION
    assert json.dumps(ids)


def test_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    from corral.backends.sqlite.schema import MIGRATIONS as _MIGRATIONS

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in _MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO jobs (queue, name, data, state, run_at, enqueued_at, finished_at) "
        "VALUES ('q', 'old', '{\"kept\": true}', 'completed', 1, 1, 1)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    async def check() -> None:
        async with QueueService(sqlite_settings(path)) as service:
            job = await service.get_job("1")
            assert job is not None and (job.name, job.data) == ("old", {"kept": True})
            assert (await service.counts())[JobState.COMPLETED] == 1
            assert [j.id for j in await service.list_jobs("completed")] == ["1"]

    asyncio.run(check())
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"jobs_completed", "jobs_failed"} <= indexes and "jobs_state" not in indexes
    columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    assert "tracebacks" in columns
    conn.close()


async def test_waiting_for_the_write_lock_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """Another process holds the write lock for half a second: the enqueue waits for it, and
    the loop keeps running other tasks meanwhile (no C-level busy wait on the loop)."""
    db = tmp_path / "q.db"
    async with QueueService(sqlite_settings(db)) as service:
        await service.enqueue("warm", 0)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        gaps: list[float] = []

        async def tick() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, holder.execute, "COMMIT")
        job_id = await service.enqueue("x", 1)
        ticker.cancel()
        holder.close()
        assert (await service.get_job(job_id)) is not None
        blocked = [gap for gap in gaps if gap > 0.010]
        assert len(gaps) > 50 and len(blocked) <= 3, (len(gaps), blocked)


async def test_the_wal_is_checkpointed_off_the_loop_and_stays_bounded(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with QueueService(sqlite_settings(db, max_payload_bytes=16_384)) as service:
        for i in range(2000):  # 16 MB of payloads, one commit each
            await service.enqueue("x", {"i": i, "pad": "p" * 8000})
            if i % 200 == 0:
                await asyncio.sleep(0.05)  # room for the checkpoint thread to run
        assert (await service.counts())[JobState.WAITING] == 2000
    # Automatic checkpoints are off on corral's connections; without the checkpoint thread the
    # WAL would hold every one of those pages.
    assert (
        (db.parent / "q.db-wal").stat().st_size < 12 << 20
        if (db.parent / "q.db-wal").exists()
        else True
    )
    assert db.stat().st_size > 8 << 20  # the pages reached the database file


async def test_synchronous_full_commits_off_the_loop(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    settings = sqlite_settings(db, sqlite_synchronous="full")
    async with QueueService(settings) as service:
        ran: list[int] = []

        @service.handler("x")
        async def x(message: QueueMessage) -> None:
            ran.append(message.data)

        ids = [await service.enqueue("x", i) for i in range(20)]
        ids += await service.enqueue_many([{"name": "x", "data": 20 + i} for i in range(5)])
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.3, holder.execute, "COMMIT")
        ids.append(await service.enqueue("x", 25))  # waits for the lock in the writer thread
        holder.close()
        await service.start_worker(burst=True)
        assert sorted(ran) == list(range(26))
        assert {(await service.get_job(i)).state for i in ids} == {JobState.COMPLETED}  # type: ignore[union-attr]
