"""Shared fixtures: real SQLite files, the machine's Redis, one settings factory for both."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral import JobState, QueueService, QueueSettings

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent


def missing(reason: str) -> None:
    """Skip locally, fail in CI: a missing service must never turn CI green by skipping."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def _redis_answers(port: int = REDIS_PORT) -> bool:
    try:
        with socket.create_connection((REDIS_HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis on 127.0.0.1:6379, started here if it is not answering."""
    if not _redis_answers():
        server = shutil.which("redis-server")
        if server is None:
            missing("Redis is not answering on 127.0.0.1:6379 and redis-server is not installed")
        subprocess.run(
            [
                server,
                "--daemonize",
                "yes",
                "--port",
                str(REDIS_PORT),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 10
        while not _redis_answers():
            if time.monotonic() > deadline:
                missing("redis-server was started but does not answer on 127.0.0.1:6379")
            time.sleep(0.05)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def unique_queue_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["sqlite", "bullmq"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


SettingsFactory = Callable[..., QueueSettings]


@pytest.fixture
def make_settings(
    backend_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[SettingsFactory]:
    """Build QueueSettings for the backend under test: a fresh SQLite file or a fresh queue name
    on the machine's Redis. Redis keys of the queues made here are deleted afterwards."""
    names: list[str] = []
    url = request.getfixturevalue("redis_url") if backend_kind == "bullmq" else None
    queue = unique_queue_name()

    def build(**overrides: Any) -> QueueSettings:
        values: dict[str, Any] = {
            "backend": backend_kind,
            "name": queue,
            "sqlite_path": str(tmp_path / "queue.db"),
            "shutdown_grace_s": 2.0,
            "attempts": 1,
            "backoff_delay_s": 0.0,
        }
        if url is not None:
            values["redis_url"] = url
        values.update(overrides)
        settings = QueueSettings(**values)
        names.append(settings.name)
        if settings.dead_letter:
            names.append(settings.dead_letter)
        return settings

    yield build
    if url is not None:
        import redis

        client = redis.Redis.from_url(url)
        for name in set(names):
            keys = list(client.scan_iter(match=f"bull:{name}:*", count=1000))
            if keys:
                client.delete(*keys)
        client.close()


@pytest.fixture
async def service(make_settings: SettingsFactory) -> AsyncIterator[QueueService]:
    svc = QueueService(make_settings())
    yield svc
    await svc.close()


def python_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess running this checkout's corral."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    env.update(extra)
    return env


PYTHON = sys.executable


async def run_worker_until(
    service: QueueService,
    done: Callable[[], Awaitable[bool]],
    *,
    timeout_s: float = 15.0,
    concurrency: int | None = None,
) -> None:
    """Run a worker until ``done()`` holds, then stop it gracefully."""
    worker = asyncio.create_task(service.start_worker(concurrency=concurrency))
    try:
        deadline = time.monotonic() + timeout_s
        while not await done():
            if worker.done():
                worker.result()
                raise AssertionError("worker stopped before the condition held")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met within {timeout_s}s: {await service.counts()}"
                )
            await asyncio.sleep(0.02)
    finally:
        service.stop()
        await asyncio.wait_for(worker, 15)


def finished(service: QueueService, total: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        counts = await service.counts()
        return counts[JobState.COMPLETED] + counts[JobState.FAILED] >= total

    return check
