"""Transactional enqueue: the job exists if and only if the caller's transaction commits.

Real databases throughout: SQLite files in tmp_path, the machine's PostgreSQL (each test in a
schema of its own), the machine's Redis, and relays in processes of their own for the crash and
concurrency guarantees.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral import (
    ConfigError,
    JobState,
    PayloadError,
    QueueMessage,
    QueueService,
    Retry,
    outbox,
    relay,
)
from corral.relay import Relay

from conftest import PYTHON, SettingsFactory, python_env

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"

psycopg = pytest.importorskip("psycopg")
sqlalchemy = pytest.importorskip("sqlalchemy")


@pytest.fixture
def pg_table() -> Iterator[str]:
    """An outbox table in a schema of this test's own, dropped afterwards."""
    try:
        admin = psycopg.connect(PG_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        from conftest import missing

        missing(f"PostgreSQL does not answer at {PG_URL}: {exc}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    table = f"{schema}.corral_outbox"
    with psycopg.connect(PG_URL) as conn:
        outbox.install(conn, table)
    yield table
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def pg_rows(table: str) -> int:
    with psycopg.connect(PG_URL) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def sqlite_rows(path: Path, table: str = "corral_outbox") -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def total(service: QueueService) -> int:
    return sum((await service.counts()).values())


# -- SQLite, the queue's own file: the job row itself ---------------------------------------------


async def test_sqlite_queue_file_gets_the_job_row_at_commit(tmp_path: Path) -> None:
    from corral import QueueSettings

    db = tmp_path / "queue.db"
    service = QueueService(QueueSettings(sqlite_path=str(db), name="q", attempts=1))
    ran: list[Any] = []

    @service.handler("receipt")
    async def receipt(message: QueueMessage) -> None:
        ran.append(message.data)

    await service.counts()  # creates the file
    worker = asyncio.create_task(service.start_worker())
    conn = sqlite3.connect(db)
    try:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        conn.commit()
        conn.execute("INSERT INTO orders (id) VALUES (42)")
        job_id = service.enqueue_in_transaction(
            conn, "receipt", {"order": 42}, job_id="receipt-42", priority=2
        )
        assert job_id == "receipt-42"
        await asyncio.sleep(0.3)  # many poll intervals: the worker must not see it yet
        assert ran == [] and await service.get_job(job_id) is None
        conn.commit()
        deadline = time.monotonic() + 15
        while not ran:
            assert time.monotonic() < deadline, "the committed job never ran"
            await asyncio.sleep(0.02)
        assert ran == [{"order": 42}]
        # A rolled-back one never exists; a queue-assigned id comes back as a number.
        other = service.enqueue_in_transaction(conn, "receipt", {"order": 43})
        assert other.isdigit()
        conn.rollback()
        assert await service.get_job(other) is None
    finally:
        conn.close()
        service.stop()
        await asyncio.wait_for(worker, 15)
        await service.close()
    assert ran == [{"order": 42}]


async def test_bad_payload_raises_before_anything_is_written(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    app = tmp_path / "app.db"
    service = QueueService(make_settings(outbox_url=f"sqlite:///{app}"))
    conn = sqlite3.connect(app)
    outbox.install(conn)
    try:
        with pytest.raises(PayloadError):
            service.enqueue_in_transaction(conn, "x", {1: "not a string key"})
        with pytest.raises(PayloadError):
            service.enqueue_in_transaction(conn, "x", {}, job_id="12")
        conn.commit()
        assert sqlite_rows(app) == 0
        conn.isolation_level = None  # autocommit, no BEGIN: the job would commit on its own
        with pytest.raises(ConfigError, match="autocommit"):
            service.enqueue_in_transaction(conn, "x", {})
        assert sqlite_rows(app) == 0
    finally:
        conn.close()
        await service.close()


# -- outbox in another SQLite file, relayed to either backend -------------------------------------


async def test_sqlite_outbox_relays_committed_jobs_with_their_options(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    app = tmp_path / "app.db"
    settings = make_settings(outbox_url=f"sqlite:///{app}")
    service = QueueService(settings)
    try:
        with sqlite3.connect(app) as conn:
            outbox.install(conn)
        with sqlite3.connect(app) as conn:  # commits
            kept = service.enqueue_in_transaction(
                conn,
                "mail",
                {"to": "ada"},
                priority=5,
                attempts=4,
                backoff=Retry.fixed(2),
                delay_s=3600,
            )
        conn = sqlite3.connect(app)
        dropped = service.enqueue_in_transaction(conn, "mail", {"to": "bob"}, job_id="bob-1")
        conn.rollback()
        conn.close()
        assert kept.startswith("tx-") and dropped == "bob-1"
        assert sqlite_rows(app) == 1

        runner = Relay(settings, service.backend)
        assert await runner.drain() == 1
        await runner.close()

        assert sqlite_rows(app) == 0
        assert await total(service) == 1
        job = await service.get_job(kept)
        assert job is not None
        assert (job.name, job.data, job.state) == ("mail", {"to": "ada"}, JobState.DELAYED)
        assert (job.priority, job.max_attempts) == (5, 4)
        assert job.run_at is not None
        # The delay counts from the enqueue, not from the relay's push.
        assert 3590 < job.run_at.timestamp() - job.enqueued_at.timestamp() <= 3600
    finally:
        await service.close()


async def test_missing_outbox_table_says_how_to_create_it(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    service = QueueService(make_settings())
    conn = sqlite3.connect(tmp_path / "app.db")
    try:
        with pytest.raises(ConfigError, match=r"corral outbox install"):
            service.enqueue_in_transaction(conn, "x", {})
        with pytest.raises(ConfigError, match="cannot write through"):
            service.enqueue_in_transaction(object(), "x", {})
    finally:
        conn.close()
        await service.close()


# -- PostgreSQL ------------------------------------------------------------------------------------


# The PostgreSQL tests relay to Redis, the production combination.
on_redis = pytest.mark.parametrize("backend_kind", ["bullmq"])


@on_redis
async def test_psycopg_commit_and_rollback(make_settings: SettingsFactory, pg_table: str) -> None:
    service = QueueService(make_settings(outbox_url=PG_URL, outbox_table=pg_table))
    try:
        with psycopg.connect(PG_URL) as conn:
            with conn.transaction():
                service.enqueue_in_transaction(conn, "a", {"n": 1}, job_id="a-1")
            with pytest.raises(RuntimeError), conn.transaction():
                service.enqueue_in_transaction(conn, "a", {"n": 2}, job_id="a-2")
                raise RuntimeError("the application fails: its transaction rolls back")
        with (
            psycopg.connect(PG_URL, autocommit=True) as conn,
            pytest.raises(ConfigError, match="autocommit"),
        ):
            service.enqueue_in_transaction(conn, "a", {"n": 3})
        assert pg_rows(pg_table) == 1
        runner = Relay(service.settings, service.backend)
        assert await runner.drain() == 1
        await runner.close()
        assert pg_rows(pg_table) == 0
        assert await total(service) == 1
        assert await service.get_job("a-1") is not None
    finally:
        await service.close()


@on_redis
async def test_sqlalchemy_connection_and_session(
    make_settings: SettingsFactory, pg_table: str, tmp_path: Path
) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    service = QueueService(make_settings(outbox_url=PG_URL, outbox_table=pg_table))
    engine = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
            service.enqueue_in_transaction(conn, "orm", {"via": "connection"}, job_id="c-1")
        with Session(engine) as session, session.begin():
            service.enqueue_in_transaction(session, "orm", {"via": "session"}, job_id="s-1")
        with Session(engine) as session:
            service.enqueue_in_transaction(session, "orm", {"via": "rolled back"}, job_id="r-1")
            session.rollback()
        assert pg_rows(pg_table) == 2
        # SQLAlchemy on a SQLite application database too.
        app = tmp_path / "app.db"
        lite = create_engine(f"sqlite:///{app}")
        with lite.begin() as conn:
            outbox.install(conn)
        other = QueueService(make_settings(outbox_url=f"sqlite:///{app}"))
        with lite.begin() as conn:
            other.enqueue_in_transaction(conn, "orm", {"via": "sqlite"}, job_id="l-1")
        await other.close()
        assert sqlite_rows(app) == 1
        lite.dispose()
    finally:
        engine.dispose()
        await service.close()


@on_redis
async def test_async_psycopg_connection(make_settings: SettingsFactory, pg_table: str) -> None:
    service = QueueService(make_settings(outbox_url=PG_URL, outbox_table=pg_table))
    try:
        async with await psycopg.AsyncConnection.connect(PG_URL) as conn:
            async with conn.transaction():
                job_id = await service.enqueue_in_transaction_async(conn, "async", {"n": 1})
            with pytest.raises(ConfigError, match="enqueue_in_transaction_async"):
                service.enqueue_in_transaction(conn, "async", {"n": 2})
            await conn.rollback()
        assert job_id.startswith("tx-")
        assert pg_rows(pg_table) == 1
    finally:
        await service.close()


@on_redis
async def test_relay_wakes_on_notify_and_a_rollback_leaves_nothing(
    make_settings: SettingsFactory, pg_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay, "SAFETY_CHECK_S", 60.0)  # only a NOTIFY can wake it in time
    service = QueueService(make_settings(outbox_url=PG_URL, outbox_table=pg_table))
    runner = Relay(service.settings, service.backend)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.sleep(0.5)  # the relay is listening, with nothing to do
        async with await psycopg.AsyncConnection.connect(PG_URL) as conn:
            async with conn.transaction():
                await service.enqueue_in_transaction_async(conn, "later", {}, job_id="rb-1")
                await conn.execute("SELECT pg_sleep(0.2)")  # the relay sees nothing meanwhile
                assert await service.get_job("rb-1") is None
                raise psycopg.Rollback()
            async with conn.transaction():
                await service.enqueue_in_transaction_async(conn, "now", {}, job_id="ok-1")
        deadline = time.monotonic() + 30
        while await service.get_job("ok-1") is None:
            assert time.monotonic() < deadline, "the relay did not wake on NOTIFY"
            await asyncio.sleep(0.01)
        assert await service.get_job("rb-1") is None
        assert await total(service) == 1
        assert pg_rows(pg_table) == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await service.close()
    assert runner.moved == 1


# -- guarantees with real processes --------------------------------------------------------------


def relay_env(settings: Any, **extra: str) -> dict[str, str]:
    return python_env(
        QUEUE_BACKEND=settings.backend,
        QUEUE_NAME=settings.name,
        QUEUE_REDIS_URL=settings.redis_url,
        QUEUE_SQLITE_PATH=settings.sqlite_path,
        QUEUE_OUTBOX_URL=settings.outbox_url,
        QUEUE_OUTBOX_TABLE=settings.outbox_table,
        QUEUE_LEASE_S=str(settings.lease_s),
        **extra,
    )


def fill_outbox(service: QueueService, dialect: str, where: str, count: int) -> list[str]:
    """``count`` committed outbox rows (ids ``r-0``...)."""
    ids = [f"r-{i}" for i in range(count)]
    if dialect == "postgresql":
        with psycopg.connect(PG_URL) as conn, conn.transaction():
            for job_id in ids:
                service.enqueue_in_transaction(conn, "echo", {"id": job_id}, job_id=job_id)
    else:
        with sqlite3.connect(where) as conn:
            for job_id in ids:
                service.enqueue_in_transaction(conn, "echo", {"id": job_id}, job_id=job_id)
    return ids


@pytest.fixture(params=["postgresql", "sqlite"])
def outbox_at(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, str]:
    """(dialect, outbox URL, table): the machine's PostgreSQL or a SQLite file."""
    if request.param == "postgresql":
        table = request.getfixturevalue("pg_table")
        return "postgresql", PG_URL, table
    app = tmp_path / "app.db"
    with sqlite3.connect(app) as conn:
        outbox.install(conn)
    return "sqlite", f"sqlite:///{app}", "corral_outbox"


def outbox_count(dialect: str, url: str, table: str) -> int:
    if dialect == "postgresql":
        return pg_rows(table)
    return sqlite_rows(Path(url.removeprefix("sqlite:///")), table)


@on_redis
async def test_relay_killed_between_push_and_delete_delivers_once(
    make_settings: SettingsFactory, outbox_at: tuple[str, str, str], tmp_path: Path
) -> None:
    dialect, url, table = outbox_at
    settings = make_settings(outbox_url=url, outbox_table=table, lease_s=1.0)
    service = QueueService(settings)
    try:
        ids = fill_outbox(service, dialect, url.removeprefix("sqlite:///"), 20)
        marker = tmp_path / "pushed"
        crash = await asyncio.create_subprocess_exec(
            PYTHON,
            str(Path(__file__).parent / "relay_crash.py"),
            str(marker),
            env=relay_env(settings),
        )
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert crash.returncode is None, "the relay exited before pushing"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        crash.send_signal(signal.SIGKILL)
        await crash.wait()
        # Pushed, not deleted: the jobs are in the queue and the rows still in the outbox.
        assert await total(service) == 20
        assert outbox_count(dialect, url, table) == 20

        await asyncio.sleep(1.1)  # SQLite: the dead relay's lease on the rows expires
        again = await asyncio.to_thread(
            subprocess.run,
            [PYTHON, "-m", "corral", "relay", "--burst"],
            env=relay_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 0, again.stderr
        assert "moved 20 job(s)" in again.stdout  # pushed again ...
        assert outbox_count(dialect, url, table) == 0
        assert await total(service) == 20  # ... and still one job each
        assert sorted(job.id for job in await service.list_jobs("waiting", limit=100)) == sorted(
            ids
        )
    finally:
        await service.close()


@on_redis
async def test_several_relays_move_each_row_once(
    make_settings: SettingsFactory, outbox_at: tuple[str, str, str]
) -> None:
    dialect, url, table = outbox_at
    settings = make_settings(outbox_url=url, outbox_table=table)
    service = QueueService(settings)
    count = 1500
    relays: list[asyncio.subprocess.Process] = []
    try:
        fill_outbox(service, dialect, url.removeprefix("sqlite:///"), count)
        for _ in range(3):
            relays.append(
                await asyncio.create_subprocess_exec(
                    PYTHON,
                    "-m",
                    "corral",
                    "--log-level",
                    "info",
                    "relay",
                    env=relay_env(settings),
                    stderr=subprocess.PIPE,
                )
            )
        for process in relays:  # a SIGTERM before its handler is installed would kill it
            assert process.stderr is not None
            line = b""
            while b"relay started" not in line:
                line = await asyncio.wait_for(process.stderr.readline(), 60)
                assert line, "a relay exited before it started"
        deadline = time.monotonic() + 120
        while outbox_count(dialect, url, table) or await total(service) < count:
            assert time.monotonic() < deadline, "the relays did not empty the outbox"
            await asyncio.sleep(0.1)
        moved = []
        for process in relays:
            process.send_signal(signal.SIGTERM)
            _, raw = await asyncio.wait_for(process.communicate(), 30)
            err = raw.decode()
            assert process.returncode == 0, err
            found = re.search(r"relay stopped: moved (\d+) job", err)
            assert found, err
            moved.append(int(found.group(1)))
        assert sum(moved) == count  # no row was pushed twice
        assert await total(service) == count
    finally:
        for process in relays:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await service.close()


def test_the_outbox_password_is_never_printed(tmp_path: Path, redis_url: str) -> None:
    url = "postgresql://postgres:s3cret-pw@127.0.0.1:5432/test"
    table = f"pw_{uuid.uuid4().hex[:10]}"
    env = python_env(
        QUEUE_BACKEND="bullmq",
        QUEUE_REDIS_URL=redis_url,
        QUEUE_NAME=f"pw-{uuid.uuid4().hex[:8]}",
        QUEUE_OUTBOX_URL=url,
        QUEUE_OUTBOX_TABLE=table,
    )
    try:
        runs = [
            subprocess.run(
                [PYTHON, "-m", "corral", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            for args in (
                ["outbox", "install"],
                ["--log-level", "info", "relay", "--burst"],
                ["outbox", "status"],
            )
        ]
        for run in runs:
            assert run.returncode == 0, run.stderr
            assert "s3cret-pw" not in run.stdout + run.stderr
        assert "postgres:***@127.0.0.1" in runs[0].stdout
        assert "postgres:***@127.0.0.1" in runs[1].stdout
        assert "0 row(s) waiting" in runs[2].stdout
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"DROP FUNCTION IF EXISTS {table}_notify()")


@on_redis
def test_a_worker_with_an_outbox_url_runs_the_relay(
    make_settings: SettingsFactory, pg_table: str, tmp_path: Path
) -> None:
    settings = make_settings(outbox_url=PG_URL, outbox_table=pg_table)
    service = QueueService(settings)
    out = tmp_path / "trace.txt"
    with psycopg.connect(PG_URL) as conn, conn.transaction():
        service.enqueue_in_transaction(conn, "echo", {"out": str(out)}, job_id="from-outbox")
    worker = subprocess.Popen(
        [PYTHON, "-m", "corral", "worker", "tasks_worker"], env=relay_env(settings)
    )
    try:
        deadline = time.monotonic() + 60
        while not out.exists() or "end from-outbox" not in out.read_text():
            assert worker.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "the outbox job never ran"
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert worker.returncode == 0
    assert pg_rows(pg_table) == 0
