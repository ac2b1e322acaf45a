"""Redis faults under a running BullMQ queue: a restart with AOF in the middle of a run.

A producer in this process and a worker process (``python -m corral.worker``) keep working while
their Redis server is shut down and started again on the same port and data directory. Real
redis-server, real subprocess, no mocks.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral import CorralError, JobState, QueueService, QueueSettings

from conftest import PYTHON, REDIS_HOST, missing, python_env, unique_queue_name

OUTAGE_S = 2.0
RESUME_WITHIN_S = 5.0
MAX_ERROR_LINES = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        return int(sock.getsockname()[1])


def answers(port: int) -> bool:
    try:
        with socket.create_connection((REDIS_HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class AofRedis:
    """A redis-server on a loopback port that keeps its data in an append-only file."""

    def __init__(self, server: str, data_dir: Path) -> None:
        self.server = server
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *(self.server, "--port", str(self.port), "--bind", REDIS_HOST),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
                *("--dir", str(self.data_dir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not answers(self.port):
            if self.process.poll() is not None:
                missing(f"redis-server would not start with AOF in {self.data_dir}")
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.01)

    def shutdown(self) -> None:
        """A clean SHUTDOWN: with AOF on, Redis writes and syncs the file before it exits."""
        assert self.process is not None
        # A raw socket: redis-py's client would retry against the dying server.
        with socket.create_connection((REDIS_HOST, self.port)) as admin:
            admin.sendall(b"SHUTDOWN\r\n")
            admin.recv(16)
        self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM: Redis shuts down as on SHUTDOWN, writing the append-only file first."""
        assert self.process is not None
        self.process.terminate()
        self.process.wait(10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server is needed to start a Redis with AOF")
    data_dir = tmp_path / "redis-data"
    data_dir.mkdir()
    redis = AofRedis(str(server), data_dir)
    try:
        redis.start()
        yield redis
    finally:
        redis.kill()


class Ledger:
    """Lines of the worker's trace file (``start|end <id> <attempt> <pid>``), each with the
    monotonic time this process first saw it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, list[str]]] = []
        self._offset = 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        now = time.monotonic()
        self.lines += [(now, line.split()) for line in complete.decode().splitlines()]

    def done(self) -> dict[str, float]:
        """Job id -> when its first ``end`` line was seen."""
        first: dict[str, float] = {}
        for seen, parts in self.lines:
            if parts[0] == "end":
                first.setdefault(parts[1], seen)
        return first


def start_worker(env: dict[str, str], stderr_path: Path) -> subprocess.Popen[bytes]:
    """``python -m corral.worker`` with the trace-writing handlers of tasks_worker."""
    with stderr_path.open("wb") as stderr:
        return subprocess.Popen(
            [PYTHON, "-m", "corral.worker", "tasks_worker", "--concurrency", "8"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


@pytest.mark.parametrize("how", ["shutdown", "sigterm"])
async def test_worker_and_producer_ride_out_a_redis_restart(
    aof_redis: AofRedis, tmp_path: Path, how: str
) -> None:
    name = unique_queue_name("restart")
    ledger = Ledger(tmp_path / "ledger.txt")
    stderr_path = tmp_path / "worker.stderr"
    env = python_env(
        QUEUE_BACKEND="bullmq",
        QUEUE_REDIS_URL=aof_redis.url,
        QUEUE_NAME=name,
        # A job whose outcome could not be written during the outage runs again once its lease
        # expires: keep that short so the test waits seconds, not the default 30.
        QUEUE_LEASE_S="2",
        QUEUE_KEEP_COMPLETED="none",
        QUEUE_LOG_LEVEL="info",
    )
    settings = QueueSettings(
        backend="bullmq", redis_url=aof_redis.url, name=name, keep_completed=None, attempts=3
    )
    worker = start_worker(env, stderr_path)
    acknowledged: list[str] = []
    refused = 0
    stop_producing = asyncio.Event()

    async def produce(service: QueueService) -> None:
        nonlocal refused
        index = 0
        while not stop_producing.is_set():
            index += 1
            try:
                # Jobs that take a while, so some are running when Redis goes away.
                job_id = await service.enqueue(
                    "sleep", {"out": str(ledger.path), "seconds": 0.1, "value": index}
                )
            except CorralError:
                refused += 1  # not acknowledged: the producer would retry or report it
                await asyncio.sleep(0.05)
            else:
                acknowledged.append(job_id)
                await asyncio.sleep(0.01)

    async def watch() -> None:
        while True:  # timestamps lines as they appear, also while the test sleeps
            ledger.poll()
            await asyncio.sleep(0.01)

    async def until(condition_s: float, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + condition_s
        while True:
            if check():
                return
            assert worker.poll() is None, "the worker process exited"
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        async with QueueService(settings) as producer:
            producing = asyncio.create_task(produce(producer))
            try:
                await until(15, lambda: len(ledger.done()) >= 20)  # the worker is running
                await asyncio.sleep(0.5)
                before = len(acknowledged)
                await asyncio.to_thread(
                    aof_redis.shutdown if how == "shutdown" else aof_redis.terminate
                )
                await asyncio.sleep(OUTAGE_S)
                await asyncio.to_thread(aof_redis.start)
                back = time.monotonic()
                await asyncio.sleep(2.0)
            finally:
                stop_producing.set()
                await producing
            assert len(acknowledged) > before, "the producer did not recover"

            def all_done() -> bool:
                return set(acknowledged) <= set(ledger.done())

            await until(20, all_done)
            resumed_s = min(t for t in ledger.done().values() if t >= back) - back

            async def all_completed() -> bool:
                # Every acknowledged job completed. An enqueue whose reply was lost in the outage
                # may have been written all the same: it runs too, and is not counted here.
                for job_id in acknowledged:
                    job = await producer.get_job(job_id)
                    if job is None or job.state != JobState.COMPLETED:
                        return False
                counts = await producer.counts()
                return counts[JobState.ACTIVE] == counts[JobState.WAITING] == 0

            deadline = time.monotonic() + 10
            while not await all_completed():
                assert time.monotonic() < deadline, (len(acknowledged), await producer.counts())
                await asyncio.sleep(0.05)
            counts = await producer.counts()
    finally:
        watcher.cancel()
        worker.terminate()
        worker.wait(15)
    log = stderr_path.read_text(errors="replace").splitlines()
    errors = [line for line in log if " ERROR " in line or " CRITICAL " in line]
    tracebacks = [line for line in log if line.startswith("Traceback")]
    print(
        f"restart: {len(acknowledged)} acknowledged, {refused} refused during the outage; "
        f"first job done {resumed_s:.2f}s after Redis came back; "
        f"{len(errors)} error line(s), {len(tracebacks)} traceback(s), {len(log)} log lines"
    )
    assert counts[JobState.FAILED] == 0 and counts[JobState.WAITING] == 0, counts
    assert resumed_s <= RESUME_WITHIN_S, resumed_s
    assert len(errors) < MAX_ERROR_LINES, "\n".join(errors)
    assert tracebacks == [], "\n".join(log)
    assert worker.returncode == 0, "\n".join(log[-20:])


async def test_an_idle_worker_resumes_after_a_restart(aof_redis: AofRedis, tmp_path: Path) -> None:
    """The worker sits in its blocking pop when Redis goes away and comes back."""
    name = unique_queue_name("idle")
    trace = tmp_path / "trace.txt"
    stderr_path = tmp_path / "worker.stderr"
    env = python_env(QUEUE_BACKEND="bullmq", QUEUE_REDIS_URL=aof_redis.url, QUEUE_NAME=name)
    settings = QueueSettings(backend="bullmq", redis_url=aof_redis.url, name=name)
    worker = start_worker(env, stderr_path)

    async def ran(job_id: str, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while f"end {job_id} " not in (trace.read_text() if trace.exists() else ""):
            assert worker.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            await asyncio.sleep(0.01)
        return time.monotonic()

    try:
        async with QueueService(settings) as producer:
            first = await producer.enqueue("echo", {"out": str(trace)})
            await ran(first, 15)
            await asyncio.sleep(0.5)  # idle: blocked on the marker key
            await asyncio.to_thread(aof_redis.terminate)
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(aof_redis.start)
            back = time.monotonic()
            second = await producer.enqueue("echo", {"out": str(trace)})
            resumed_s = await ran(second, 15) - back
            job = await producer.get_job(first)
            assert job is not None and job.state == JobState.COMPLETED  # kept by the AOF
    finally:
        worker.terminate()
        worker.wait(15)
    errors = [line for line in stderr_path.read_text().splitlines() if " ERROR " in line]
    print(f"idle restart: the next job ran {resumed_s:.2f}s after Redis came back")
    assert resumed_s <= RESUME_WITHIN_S, resumed_s
    assert 1 <= len(errors) <= 3, errors
