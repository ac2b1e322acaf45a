"""The BullMQ backend beyond the contract: Redis layout, the bullmq package's defects corral must
not inherit, crashes, outages and connection settings. Real Redis, real subprocesses, no mocks."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from corral import (
    BackendConnectionError,
    JobState,
    LeaseLostError,
    QueueMessage,
    QueueService,
    QueueSettings,
    Retry,
)
from corral.backends.base import dead_letter_id
from corral.backends.bullmq import LIB_VERSION, BullMQBackend
from corral.message import Completed, Failed, NewJob

from conftest import PYTHON, REDIS_HOST, SettingsFactory, missing, python_env, unique_queue_name


@pytest.fixture
def backend_kind() -> str:
    """Every test here is about the BullMQ backend."""
    return "bullmq"


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client to look at the keys corral wrote."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        return int(sock.getsockname()[1])


ScratchRedis = Callable[..., int]


@pytest.fixture
def scratch_redis() -> Iterator[ScratchRedis]:
    """Start throwaway redis-server processes on loopback (for auth, outages, settings)."""
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server is needed to start throwaway Redis servers")
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, port: int | None = None) -> int:
        port = port or free_port()
        command = [str(server), "--port", str(port), "--bind", REDIS_HOST, "--save", ""]
        process = subprocess.Popen(
            [*command, "--appendonly", "no", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((REDIS_HOST, port), timeout=0.2):
                    return port
            except OSError:
                if process.poll() is not None:  # e.g. a redis-server built without TLS
                    missing(f"redis-server would not start with {' '.join(args)}")
                assert time.monotonic() < deadline, "scratch redis-server did not start"
                time.sleep(0.02)

    yield start
    for process in processes:
        process.kill()
        process.wait(5)


async def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def all_finished(service: QueueService, total: int) -> Callable[[], Any]:
    async def check() -> bool:
        counts = await service.counts()
        return counts[JobState.COMPLETED] + counts[JobState.FAILED] >= total

    return check


# -- the Redis layout ----------------------------------------------------------------------------


async def test_jobs_are_stored_in_bullmqs_layout(
    make_settings: SettingsFactory, raw: redis.Redis
) -> None:
    settings = make_settings(keep_completed=10, keep_failed=None)
    q = f"bull:{settings.name}"
    async with QueueService(settings) as service:
        before_ms = time.time() * 1000
        plain = await service.enqueue("plain", {"a": [1, "é"]}, attempts=2)
        prio = await service.enqueue("prio", None, priority=5, job_id="order-7")
        later = await service.enqueue("later", 3, delay_s=0.25, backoff=Retry.fixed(0.2, 0.5))

    job = raw.hgetall(f"{q}:{plain}")
    assert (job["name"], job["data"], job["delay"], job["priority"]) == (
        "plain",
        '{"a":[1,"é"]}',
        "0",
        "0",
    )
    assert json.loads(job["opts"]) == {
        "attempts": 2,
        "backoff": {"type": "exponential", "delay": 0},
        "removeOnComplete": 10,
    }
    assert before_ms - 1 <= int(job["timestamp"]) <= time.time() * 1000 + 1
    assert raw.lrange(f"{q}:wait", 0, -1) == [plain]

    assert json.loads(raw.hget(f"{q}:order-7", "opts") or "")["jobId"] == "order-7"
    # prioritized score: priority * 2^32 + a counter, as Node's addPrioritizedJob.
    assert raw.zscore(f"{q}:prioritized", prio) == 5 * 2**32 + 1

    delayed = raw.hgetall(f"{q}:{later}")
    opts = json.loads(delayed["opts"])
    assert opts["delay"] == 250 and opts["backoff"] == {
        "type": "fixed",
        "delay": 200,
        "jitter": 0.5,
    }
    score = raw.zscore(f"{q}:delayed", later)
    assert score is not None
    assert int(score) // 0x1000 == int(delayed["timestamp"]) + 250  # due time to the millisecond
    assert raw.hget(f"{q}:meta", "version") == LIB_VERSION == "bullmq:3.4.4"
    assert raw.zrange(f"{q}:marker", 0, -1) == ["0", "1"]  # "job ready" and "next delayed" marks


async def test_duplicate_job_id_leaves_the_existing_job_untouched(
    make_settings: SettingsFactory, raw: redis.Redis
) -> None:
    settings = make_settings()
    async with QueueService(settings) as service:
        await service.enqueue("a", {"v": 1}, job_id="dup-1", priority=2)
        before = raw.hgetall(f"bull:{settings.name}:dup-1")
        again = await service.enqueue("b", {"v": 2}, job_id="dup-1", delay_s=5)
        assert again == "dup-1"
        assert raw.hgetall(f"bull:{settings.name}:dup-1") == before
        assert raw.zcard(f"bull:{settings.name}:delayed") == 0
        counts = await service.counts()
        assert counts[JobState.WAITING] == 1 and sum(counts.values()) == 1


async def test_a_batch_becomes_visible_all_at_once(
    make_settings: SettingsFactory, redis_url: str
) -> None:
    settings = make_settings()
    total = 2000
    seen: set[int] = set()
    observer = aioredis.Redis.from_url(redis_url)
    stop = asyncio.Event()

    async def observe() -> None:
        while not stop.is_set():
            seen.add(int(await observer.llen(f"bull:{settings.name}:wait")))

    async with QueueService(settings) as service:
        watcher = asyncio.create_task(observe())
        await asyncio.sleep(0.01)
        ids = await service.enqueue_many([{"name": "n", "data": i} for i in range(total)])
        await asyncio.sleep(0.01)
        stop.set()
        await watcher
    await observer.aclose()
    assert len(set(ids)) == total
    assert seen <= {0, total} and total in seen, sorted(seen)[:10]


async def test_waiting_list_pages_across_plain_and_prioritized_jobs(service: QueueService) -> None:
    plain = [await service.enqueue("p", i) for i in range(3)]
    prio = [await service.enqueue("q", i, priority=1 + i) for i in range(3)]
    page = await service.list_jobs(JobState.WAITING, limit=3, offset=2)
    assert [job.id for job in page] == [plain[2], prio[0], prio[1]]
    assert [job.id for job in await service.list_jobs(JobState.WAITING, offset=5)] == [prio[2]]


# -- defects of the bullmq package's Worker that corral must not have --------------------------


async def test_idle_worker_picks_up_a_new_job_within_milliseconds(
    make_settings: SettingsFactory,
) -> None:
    """The package's Worker can take from ~0.5 s to 2 s to notice a job after an idle spell."""
    settings = make_settings()
    started: asyncio.Queue[float] = asyncio.Queue()
    async with QueueService(settings) as worker, QueueService(settings) as producer:

        @worker.handler("ping")
        async def ping(message: QueueMessage) -> None:
            started.put_nowait(time.perf_counter())

        task = asyncio.create_task(worker.start_worker(concurrency=4))
        latencies: list[float] = []
        try:
            # Idle gaps up to 1.5 s, and one longer than the package Worker's 5 s drainDelay
            # (after which it takes 1-2 s). The producer is another connection, so only
            # Redis's marker (not an in-process wake-up) can tell the worker about the job.
            gaps = [5.5, *itertools.islice(itertools.cycle([0.02, 0.1, 0.4, 1.5]), 29)]
            for gap in gaps:
                await asyncio.sleep(gap)
                sent = time.perf_counter()
                await producer.enqueue("ping", None)
                latencies.append(await asyncio.wait_for(started.get(), 5) - sent)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000
    print(f"idle pickup over {len(latencies)} jobs: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert p99 <= 50, latencies


async def test_rate_limit_holds_across_workers(make_settings: SettingsFactory) -> None:
    """5 jobs per second for the queue, whichever of two workers (two connections) runs them."""
    settings = make_settings(rate_limit_max=5, rate_limit_duration_s=1.0)
    starts: list[float] = []
    async with QueueService(settings) as one, QueueService(settings) as two:
        for service in (one, two):

            @service.handler("tick")
            async def tick(message: QueueMessage) -> None:
                starts.append(time.monotonic())

        await one.enqueue_many([{"name": "tick", "data": i} for i in range(20)])
        t0 = time.monotonic()
        workers = [asyncio.create_task(s.start_worker(concurrency=10)) for s in (one, two)]
        try:
            await wait_for(all_finished(one, 20), timeout_s=15)
        finally:
            one.stop()
            two.stop()
            await asyncio.wait_for(asyncio.gather(*workers), 10)
    elapsed = max(starts) - t0
    assert len(starts) == 20
    assert 2.8 <= elapsed <= 4.5, elapsed  # windows of 5 at ~0, 1, 2 and 3 s
    starts.sort()
    assert all(later - first >= 0.85 for first, later in zip(starts, starts[5:], strict=False))


async def test_backoff_and_delay_are_not_rounded_to_seconds(service: QueueService) -> None:
    runs: list[float] = []

    @service.handler("retry")
    async def retry(message: QueueMessage) -> None:
        runs.append(time.monotonic())
        if message.attempt == 1:
            raise RuntimeError("first try fails")

    sent = time.monotonic()
    await service.enqueue("retry", None, attempts=2, backoff=Retry.exponential(0.2), delay_s=0.15)
    worker = asyncio.create_task(service.start_worker())
    try:
        await wait_for(all_finished(service, 1))
    finally:
        service.stop()
        await asyncio.wait_for(worker, 10)
    assert 0.15 <= runs[0] - sent < 0.15 + 0.15, runs[0] - sent
    assert 0.2 <= runs[1] - runs[0] < 0.2 + 0.15, runs[1] - runs[0]


async def test_jittered_backoff_is_stored_and_honoured(
    service: QueueService, raw: redis.Redis
) -> None:
    runs: list[float] = []

    @service.handler("jit")
    async def jit(message: QueueMessage) -> None:
        runs.append(time.monotonic())
        raise RuntimeError("again")

    job_id = await service.enqueue("jit", None, attempts=4, backoff=Retry.fixed(0.3, jitter=0.5))
    opts = json.loads(raw.hget(f"bull:{service.settings.name}:{job_id}", "opts") or "")
    assert opts["backoff"] == {"type": "fixed", "delay": 300, "jitter": 0.5}
    worker = asyncio.create_task(service.start_worker())
    try:
        await wait_for(all_finished(service, 1))
    finally:
        service.stop()
        await asyncio.wait_for(worker, 10)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert len(gaps) == 3 and all(0.15 <= gap < 0.3 + 0.15 for gap in gaps), gaps


async def test_worker_is_listed_as_node_names_its_workers(
    make_settings: SettingsFactory, raw: redis.Redis
) -> None:
    settings = make_settings()
    prefix = f"bull:{base64.b64encode(settings.name.encode()).decode()}:w:"

    def workers() -> list[str]:
        return [c["name"] for c in raw.client_list() if c["name"].startswith(prefix)]

    async with QueueService(settings) as service:
        task = asyncio.create_task(service.start_worker())
        try:
            await wait_for(lambda: asyncio.sleep(0, len(workers()) == 1))
            assert raw.hget(f"bull:{settings.name}:meta", "version") == LIB_VERSION
        finally:
            service.stop()
            await asyncio.wait_for(task, 10)
        # Redis drops the client once it reads the closed socket: give it a moment.
        await wait_for(lambda: asyncio.sleep(0, workers() == []), timeout_s=3)


# -- leases, crashes, unreadable jobs ------------------------------------------------------------


async def test_a_stale_holder_cannot_settle_or_dead_letter(
    make_settings: SettingsFactory, raw: redis.Redis
) -> None:
    settings = make_settings(dead_letter=unique_queue_name("dead"), lease_s=5)
    backend = BullMQBackend(settings)
    source = backend.open_source(stop=asyncio.Event(), burst=False)
    try:
        (job_id,) = await backend.enqueue([NewJob("x", "1")])
        (claim,) = await source.claim(5)
        job_key = f"bull:{settings.name}:{job_id}"
        raw.set(f"{job_key}:lock", "someone-else", px=5000)  # the lease passed to another worker
        before = raw.hgetall(job_key)
        for outcome in (Completed("2"), Failed("boom", "")):
            with pytest.raises(LeaseLostError):
                await source.settle(claim, outcome)
        assert raw.hgetall(job_key) == before
        assert raw.lrange(f"bull:{settings.name}:active", 0, -1) == [job_id]
        assert raw.get(f"{job_key}:lock") == "someone-else"
        assert raw.keys(f"bull:{settings.dead_letter}:*") in (
            [],
            [f"bull:{settings.dead_letter}:meta"],
        )
        assert await source.extend([claim]) == [claim]
    finally:
        await source.aclose()
        await backend.close()


def crash_worker(settings: QueueSettings, timeout_s: float = 20) -> int:
    """Run a worker process whose handler kills the process mid-job; return its exit code."""
    code = (
        "import asyncio, os\n"
        "from corral import QueueService\n"
        "service = QueueService()\n"
        "@service.handler('poison')\n"
        "async def poison(message):\n"
        "    os._exit(3)\n"
        "asyncio.run(service.start_worker(concurrency=1))\n"
    )
    env = python_env(
        QUEUE_BACKEND="bullmq",
        QUEUE_REDIS_URL=settings.redis_url,
        QUEUE_NAME=settings.name,
        QUEUE_LEASE_S=str(settings.lease_s),
        QUEUE_MAX_STALLS=str(settings.max_stalls),
    )
    return subprocess.run([PYTHON, "-c", code], env=env, timeout=timeout_s, check=False).returncode


async def test_crashed_jobs_come_back_then_fail_as_stalled(
    make_settings: SettingsFactory, raw: redis.Redis
) -> None:
    settings = make_settings(lease_s=0.5, max_stalls=1, dead_letter=unique_queue_name("dead"))
    async with QueueService(settings) as service:
        ran: list[int] = []

        @service.handler("poison")
        async def poison(message: QueueMessage) -> None:
            ran.append(message.attempt)

        job_id = await service.enqueue("poison", {"p": 1}, attempts=3)
        # The first process dies holding the job; the second finds it stalled, runs it and
        # dies too (stall 1: delivered again); after the second stall the job is failed.
        for _ in range(2):
            assert await asyncio.to_thread(crash_worker, settings) == 3
        assert raw.hget(f"bull:{settings.name}:{job_id}", "stc") == "1"
        worker = asyncio.create_task(service.start_worker())
        try:
            await wait_for(all_finished(service, 1))
        finally:
            service.stop()
            await asyncio.wait_for(worker, 10)
        job = await service.get_job(job_id)
        assert job is not None
        assert (job.state, job.error) == (JobState.FAILED, "job stalled more than allowable limit")
        assert ran == [], "a job that stalled too often must not run again"
        copy = raw.hgetall(f"bull:{settings.dead_letter}:{dead_letter_id(settings.name, job_id)}")
        assert (copy["name"], copy["data"]) == ("poison", '{"p":1}')


async def test_unreadable_job_fails_without_reaching_a_handler(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    backend = BullMQBackend(settings)
    (job_id,) = await backend.enqueue([NewJob("foreign", "{not json")])
    await backend.close()
    async with QueueService(settings) as service:
        called: list[str] = []

        @service.handler("foreign")
        async def foreign(message: QueueMessage) -> None:
            called.append(message.id)

        await service.start_worker(burst=True)
        job = await service.get_job(job_id)
        assert job is not None and job.state == JobState.FAILED
        assert "its data is not JSON" in (job.error or "") and called == []
        assert job.data == "{not json"


async def test_keep_completed_keeps_the_newest(make_settings: SettingsFactory) -> None:
    async with QueueService(make_settings(keep_completed=2)) as service:

        @service.handler("n")
        async def n(message: QueueMessage) -> int:
            return int(message.data)

        ids = [await service.enqueue("n", i) for i in range(5)]
        await service.start_worker(concurrency=1, burst=True)
        kept = await service.list_jobs(JobState.COMPLETED)
        assert [job.id for job in kept] == [ids[4], ids[3]]
        assert await service.get_job(ids[0]) is None


# -- connections -----------------------------------------------------------------------------------


async def test_redis_down_at_start_logs_clearly_then_recovers(
    scratch_redis: ScratchRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    secret = "pw-never-logged-71"
    settings = QueueSettings(
        backend="bullmq",
        name=unique_queue_name(),
        redis_url=f"redis://:{secret}@{REDIS_HOST}:{port}/0",
        shutdown_grace_s=1,
    )
    ran = asyncio.Event()
    async with QueueService(settings) as service:

        @service.handler("hello")
        async def hello(message: QueueMessage) -> None:
            ran.set()

        assert secret not in repr(service) and secret not in repr(service.backend)
        worker = asyncio.create_task(service.start_worker())
        await asyncio.sleep(1.5)
        assert not worker.done()
        scratch_redis("--requirepass", secret, port=port)
        async with QueueService(settings) as producer:
            await producer.enqueue("hello", None)
        await asyncio.wait_for(ran.wait(), 15)
        service.stop()
        await asyncio.wait_for(worker, 10)

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= 3, [r.getMessage() for r in errors]
    assert f"cannot reach Redis at redis://:***@{REDIS_HOST}:{port}/0" in errors[0].getMessage()
    assert all(r.exc_info is None for r in errors), "an outage must not log tracebacks"
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert not any(secret in r.getMessage() for r in caplog.records)


async def test_close_and_stop_return_while_redis_is_down(scratch_redis: ScratchRedis) -> None:
    port = scratch_redis()
    settings = QueueSettings(
        backend="bullmq", name=unique_queue_name(), redis_url=f"redis://{REDIS_HOST}:{port}/0"
    )
    service = QueueService(settings)
    await service.enqueue("x", 1)
    worker = asyncio.create_task(service.start_worker())
    await asyncio.sleep(0.3)
    # Kill the server under the running worker.
    # A raw SHUTDOWN: redis-py's own client would retry against the dying server for seconds.
    with socket.create_connection((REDIS_HOST, port)) as admin:
        admin.sendall(b"SHUTDOWN NOSAVE\r\n")
        admin.recv(16)
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    service.stop()
    await asyncio.wait_for(worker, 10)
    await asyncio.wait_for(service.close(), 5)
    assert time.monotonic() - t0 < 5


async def test_worker_survives_redis_forgetting_its_scripts(scratch_redis: ScratchRedis) -> None:
    """After SCRIPT FLUSH (or a Redis restart) the pipelined EVALSHA calls reload the scripts."""
    port = scratch_redis()
    settings = QueueSettings(
        backend="bullmq", name=unique_queue_name(), redis_url=f"redis://{REDIS_HOST}:{port}/0"
    )
    async with QueueService(settings) as service:
        done: list[int] = []

        @service.handler("n")
        async def n(message: QueueMessage) -> None:
            done.append(message.data)

        worker = asyncio.create_task(service.start_worker(concurrency=8))
        try:
            await service.enqueue_many([{"name": "n", "data": i} for i in range(50)])
            await wait_for(all_finished(service, 50))
            with redis.Redis(host=REDIS_HOST, port=port) as admin:
                await asyncio.to_thread(admin.script_flush)
            await service.enqueue_many([{"name": "n", "data": i} for i in range(50, 100)])
            await wait_for(all_finished(service, 100))
        finally:
            service.stop()
            await asyncio.wait_for(worker, 10)
        assert sorted(done) == list(range(100))
        assert (await service.counts())[JobState.FAILED] == 0


async def test_user_password_and_database_come_from_the_url(
    scratch_redis: ScratchRedis,
) -> None:
    port = scratch_redis(
        "--user", "default", "off", "--user", "app", "on", ">s3cr3t-pw", "~*", "&*", "+@all"
    )
    name = unique_queue_name()
    url = f"redis://app:s3cr3t-pw@{REDIS_HOST}:{port}/3"
    async with QueueService(QueueSettings(backend="bullmq", name=name, redis_url=url)) as service:
        job_id = await service.enqueue("x", {"db": 3})
        job = await service.get_job(job_id)
        assert job is not None and job.data == {"db": 3}
    check = redis.Redis(host=REDIS_HOST, port=port, db=3, username="app", password="s3cr3t-pw")
    try:
        assert check.exists(f"bull:{name}:{job_id}") == 1
    finally:
        check.close()

    wrong = QueueSettings(
        backend="bullmq", name=name, redis_url=f"redis://app:nope-pw@{REDIS_HOST}:{port}/3"
    )
    async with QueueService(wrong) as service:
        with pytest.raises(BackendConnectionError) as info:
            await service.counts()
    assert "refused the credentials" in str(info.value)
    assert "nope-pw" not in str(info.value) and "nope-pw" not in repr(info.value)


@pytest.fixture
def tls_cert(tmp_path: Any) -> tuple[str, str]:
    """A self-signed certificate and key for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl is needed to make a certificate for the TLS test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run([str(openssl), *request, *files, *subject], check=True, capture_output=True)
    return str(cert), str(key)


async def test_rediss_url_connects_over_tls(
    scratch_redis: ScratchRedis, tls_cert: tuple[str, str]
) -> None:
    cert, key = tls_cert
    tls_port = free_port()
    scratch_redis(
        *("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"),
    )
    url = f"rediss://{REDIS_HOST}:{tls_port}/0?ssl_ca_certs={cert}"
    settings = QueueSettings(backend="bullmq", name=unique_queue_name(), redis_url=url)
    async with QueueService(settings) as service:

        @service.handler("secure")
        async def secure(message: QueueMessage) -> str:
            return "over tls"

        job_id = await service.enqueue("secure", None)
        await service.start_worker(burst=True)
        job = await service.get_job(job_id)
        assert job is not None and (job.state, job.result) == (JobState.COMPLETED, "over tls")


async def test_eviction_policy_warning_is_logged_once_by_a_worker(
    scratch_redis: ScratchRedis, caplog: pytest.LogCaptureFixture
) -> None:
    port = scratch_redis("--maxmemory-policy", "allkeys-lru")
    settings = QueueSettings(
        backend="bullmq", name=unique_queue_name(), redis_url=f"redis://{REDIS_HOST}:{port}/0"
    )
    async with QueueService(settings) as service:  # a producer or a CLI command: no warning
        await service.enqueue("x", 1)
        await service.counts()
    assert not [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    for _ in range(2):
        async with QueueService(settings) as service:
            await service.start_worker(burst=True)
    warnings = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warnings) == 1 and "allkeys-lru" in warnings[0].getMessage()


def test_the_tested_bullmq_package_is_installed() -> None:
    import bullmq

    assert bullmq.__version__ == "3.4.4", "corral is tested against bullmq==3.4.4"


def test_a_worker_whose_password_is_refused_exits_with_one_clear_line(
    scratch_redis: ScratchRedis, tmp_path: Path
) -> None:
    """Wrong credentials stay wrong: no retrying for ever, exit 1 with what to fix."""
    port = scratch_redis("--requirepass", "right-password")
    (tmp_path / "auth_tasks.py").write_text(
        "from corral import QueueService\nsvc = QueueService()\n"
    )
    env = python_env(
        QUEUE_BACKEND="bullmq",
        QUEUE_REDIS_URL=f"redis://:wrong-password@{REDIS_HOST}:{port}/0",
        QUEUE_NAME=unique_queue_name(),
    )
    done = subprocess.run(
        [PYTHON, "-m", "corral.worker", "auth_tasks"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "refused the credentials" in line]
    assert len(errors) >= 1 and "QUEUE_REDIS_URL" in errors[-1]
    assert "wrong-password" not in done.stderr
    assert "Traceback" not in done.stderr
