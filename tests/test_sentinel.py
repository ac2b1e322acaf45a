"""Redis Sentinel failover under a producer and a worker: one primary, one replica and three
sentinels on loopback, started here. The primary is killed; the worker follows the new primary
unattended, no job stays active, and every enqueue the new primary acknowledged is processed."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from corral import ConfigError, CorralError, JobState, QueueMessage, QueueService, QueueSettings
from corral.settings import parse_sentinel_url

from conftest import REDIS_HOST, missing, unique_queue_name

pytestmark = pytest.mark.timeout(60)

SERVICE = "corral-primary"
DOWN_AFTER_MS = 400
FAILOVER_TIMEOUT_MS = 2000
FOLLOW_WITHIN_S = 5.0  # after the sentinels name the new primary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(0.05)


class SentinelSetup:
    """A primary, its replica and three sentinels: redis-server processes on loopback ports."""

    def __init__(self, server: str, tmp: Path) -> None:
        self.server = server
        self.tmp = tmp
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.primary, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        hosts = ",".join(f"{REDIS_HOST}:{port}" for port in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{SERVICE}/0"

    def _start(self, port: int, *args: str) -> None:
        self.processes[port] = subprocess.Popen(
            [*args, "--port", str(port), "--bind", REDIS_HOST, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        self._start(self.primary, self.server)
        self._start(self.replica, self.server, "--replicaof", REDIS_HOST, str(self.primary))
        # Sentinels find the replica in the primary's INFO, which they read every 10 s: start
        # them once it is attached, so their first look finds it.
        wait_until(self._synced, 10, "replica synced")
        config = (
            f"sentinel monitor {SERVICE} {REDIS_HOST} {self.primary} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
        )
        for port in self.sentinels:
            path = self.tmp / f"sentinel-{port}.conf"  # a sentinel rewrites its own file
            path.write_text(config)
            self._start(port, self.server, str(path), "--sentinel")
        wait_until(self._ready, 20, "sentinels and replica ready")

    def _ready(self) -> bool:
        """Every sentinel knows the replica and the two other sentinels."""
        for port in self.sentinels:
            with redis.Redis(host=REDIS_HOST, port=port, decode_responses=True) as client:
                state = client.sentinel_master(SERVICE)
                if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                    return False
        return True

    def _synced(self) -> bool:
        with redis.Redis(host=REDIS_HOST, port=self.primary, decode_responses=True) as client:
            return int(client.info("replication")["connected_slaves"]) == 1

    def named_primary(self) -> int:
        """The primary's port as the sentinels name it now."""
        with redis.Redis(host=REDIS_HOST, port=self.sentinels[0], decode_responses=True) as client:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
            return int(port)

    def kill(self, port: int) -> None:
        process = self.processes.pop(port)
        process.kill()
        process.wait(5)

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server is not installed")
        raise AssertionError("unreachable")
    setup = SentinelSetup(server, tmp_path)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


async def test_worker_follows_the_new_primary_after_a_failover(
    sentinel_setup: SentinelSetup,
) -> None:
    settings = QueueSettings(
        backend="bullmq",
        redis_url=sentinel_setup.url,
        name=unique_queue_name("failover"),
        keep_completed=None,
        attempts=3,
        lease_s=1.5,  # jobs active on the dead primary come back after this
        shutdown_grace_s=2.0,
    )
    producer, worker = QueueService(settings), QueueService(settings)
    processed: dict[str, float] = {}

    @worker.handler("work")
    async def work(message: QueueMessage) -> None:
        await asyncio.sleep(0.02)
        processed.setdefault(message.id, time.monotonic())

    before: list[str] = []  # acknowledged by the old primary
    after: list[str] = []  # acknowledged once the old primary was dead: by the new one
    killed = asyncio.Event()
    stop = asyncio.Event()
    refused = 0

    async def produce() -> None:
        nonlocal refused
        while not stop.is_set():
            dead_already = killed.is_set()
            try:
                job_id = await producer.enqueue("work", {"at": time.time()})
            except CorralError:
                refused += 1
                await asyncio.sleep(0.05)
                continue
            (after if dead_already else before).append(job_id)
            await asyncio.sleep(0.01)

    running = asyncio.create_task(worker.start_worker(concurrency=5))
    producing = asyncio.create_task(produce())
    try:
        while len(processed) < 30:
            assert not running.done()
            await asyncio.sleep(0.02)
        await asyncio.to_thread(sentinel_setup.kill, sentinel_setup.primary)
        killed_at = time.monotonic()
        killed.set()
        old = sentinel_setup.primary
        while await asyncio.to_thread(sentinel_setup.named_primary) == old:
            assert time.monotonic() - killed_at < 15, "the sentinels did not fail over"
            await asyncio.sleep(0.05)
        promoted_at = time.monotonic()
        while not any(job_id in processed for job_id in after):
            assert not running.done()
            assert time.monotonic() - promoted_at < FOLLOW_WITHIN_S, (len(after), refused)
            await asyncio.sleep(0.02)
        followed_s = min(processed[job_id] for job_id in after if job_id in processed) - promoted_at
        await asyncio.sleep(0.5)
        stop.set()
        await producing
        deadline = time.monotonic() + 10
        while True:  # every job the new primary acknowledged runs; none stays active
            counts = await producer.counts()
            if set(after) <= set(processed) and counts[JobState.ACTIVE] == 0:
                break
            assert time.monotonic() < deadline, (counts, len(set(after) - set(processed)))
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        worker.stop()
        await asyncio.wait_for(running, 15)
        await producing
        await producer.close()
        await worker.close()
    lost = len(set(before) - set(processed))
    print(
        f"failover: primary named {promoted_at - killed_at:.2f}s after the kill; worker ran a new "
        f"job {followed_s:.2f}s later; {len(before)} enqueues acknowledged before the kill "
        f"({lost} lost with the old primary), {len(after)} after, {refused} refused"
    )
    assert counts[JobState.FAILED] == 0, counts
    assert len(after) > 10


def test_sentinel_urls_are_checked_and_redacted() -> None:
    url = "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/2"
    target = parse_sentinel_url(url)
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (target.service, target.db, target.password) == ("mymaster", 2, "s3cret")
    assert "s3cret" not in repr(target)
    settings = QueueSettings(backend="bullmq", redis_url=url)
    assert settings.redis_url_redacted.startswith("redis+sentinel://:***@10.0.0.1:26379,")
    assert "s3cret" not in repr(settings)
    for bad, why in [
        ("redis+sentinel://10.0.0.1:x/mymaster", "not host:port"),
        ("redis+sentinel://10.0.0.1/", "service name"),
        ("redis+sentinel://10.0.0.1/mymaster/zero", "not a number"),
        ("rediss+sentinel://:s3cret@10.0.0.1/mymaster", "must start with one of"),
    ]:
        with pytest.raises(ConfigError, match=why) as caught:
            QueueSettings(backend="bullmq", redis_url=bad)
        assert "s3cret" not in str(caught.value)
