"""Live workers on both backends, with real worker processes: ``service.workers()``,
``corral workers`` and the dashboard's count."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from corral import JobState, QueueService, QueueSettings
from corral.dashboard import create_app
from corral.dashboard.storage import Storage
from corral.workers import WorkerInfo, worker_of_client, workers_from_clients

from conftest import PYTHON, SettingsFactory, python_env

LEASE_S = 0.6  # heartbeats every 0.2 s; a worker missing 3 of them (0.6 s) is stale


def worker_env(settings: QueueSettings) -> dict[str, str]:
    return python_env(
        QUEUE_BACKEND=settings.backend,
        QUEUE_NAME=settings.name,
        QUEUE_SQLITE_PATH=settings.sqlite_path,
        QUEUE_REDIS_URL=settings.redis_url,
        QUEUE_LEASE_S=str(LEASE_S),
        QUEUE_SHUTDOWN_GRACE_S="1",
    )


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(settings: QueueSettings, *args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [PYTHON, "-m", "corral.cli", "worker", "tasks_worker", *args],
            env=worker_env(settings),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def wait_for(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.05)


async def test_workers_are_listed_while_they_run(
    make_settings: SettingsFactory,
    backend_kind: str,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    settings = make_settings()
    other = settings.with_name(settings.name + "-other")
    async with QueueService(settings) as service:
        first = start_worker(settings)
        second = start_worker(other)

        ours = {settings.name, other.name}  # Redis is shared: other queues have workers too

        async def both() -> list[WorkerInfo]:
            found = [w for w in await service.workers(every_queue=True) if ours & set(w.queues)]
            return found if len(found) == 2 else []

        listed = await wait_for(both, "both workers listed")
        mine = await service.workers()
        assert [w.pid for w in mine] == [first.pid]
        (worker,) = mine
        assert (worker.queues, worker.host) == ([settings.name], socket.gethostname())
        assert {w.pid for w in listed} == {first.pid, second.pid}
        assert worker.started_at is not None and worker.last_seen is not None
        assert worker.last_seen >= worker.started_at

        out = tmp_path / "trace.txt"
        await service.enqueue_many(
            [{"name": "echo", "data": {"out": str(out), "value": n}} for n in range(3)]
            + [{"name": "sleep", "data": {"out": str(out), "seconds": 30}}]
        )
        if backend_kind == "sqlite":  # the heartbeat row counts the worker's jobs

            async def busy() -> WorkerInfo | None:
                (now,) = await service.workers()
                return now if (now.done, now.running) == (3, 1) else None

            await wait_for(busy, "3 jobs done and 1 running in the heartbeat row")
        else:
            assert (worker.running, worker.done) == (None, None)  # Redis does not record them

        # The dashboard counts them per queue, and the CLI lists them.
        storage = Storage(settings)
        try:
            assert await storage.workers(settings.name) == 1
            everyone = await storage.all_workers()
            assert {w.pid for w in everyone if ours & set(w.queues)} == {first.pid, second.pid}
        finally:
            await storage.close()
        page = await asyncio.to_thread(_workers_page, settings)
        assert f'<td class="num">{first.pid}</td>' in page and str(second.pid) in page
        cli = await asyncio.to_thread(
            subprocess.run,
            [PYTHON, "-m", "corral.cli", "workers", "--all", "--json"],
            env=worker_env(settings),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 0, cli.stderr
        listed_by_cli = [w for w in json.loads(cli.stdout) if ours & set(w["queues"])]
        assert {w["pid"] for w in listed_by_cli} == {first.pid, second.pid}

        # A worker that stops is gone at once; one that is killed once it misses its beats.
        first.send_signal(signal.SIGTERM)
        first.wait(15)
        second.kill()
        second.wait(10)

        async def none_left() -> bool:
            return not [w for w in await service.workers(every_queue=True) if ours & set(w.queues)]

        await wait_for(none_left, "no worker listed after they stopped", timeout_s=10)
        assert (await service.counts())[JobState.COMPLETED] == 3


def test_worker_connections_as_node_names_them() -> None:
    prefix = "bull"
    clients = [
        {"id": "1", "name": "bull:cQ==:w:corral-box-12", "addr": "10.0.0.5:5000", "age": "60"},
        {"id": "2", "name": "bull:cjI=:w:corral-box-12", "addr": "10.0.0.5:5001", "age": "50"},
        {"id": "3", "name": "bull:cQ==:w:node-worker", "addr": "10.0.0.6:6000", "age": "5"},
        {"id": "4", "name": "bull:cQ==", "addr": "10.0.0.7:7000", "idle": "1"},
        {"id": "5", "name": "bull:cQ==:qe", "addr": "10.0.0.8:7000"},
        {"id": "6", "name": "other:cQ==:w:x", "addr": "10.0.0.9:7000"},
        {"id": "7", "name": "bull:!!!:w:x", "addr": "10.0.0.9:7000"},
    ]
    assert worker_of_client(prefix, clients[0]) == ("q", "corral-box-12")
    assert [worker_of_client(prefix, c) for c in clients[4:]] == [None, None, None]
    found = {w.id: w for w in workers_from_clients(prefix, clients)}
    assert set(found) == {"corral-box-12", "bull:cQ==:w:node-worker", "bull:cQ=="}
    corral = found["corral-box-12"]
    assert (corral.queues, corral.host, corral.pid) == (["q", "r2"], "box", 12)
    node = found["bull:cQ==:w:node-worker"]
    assert (node.queues, node.host, node.pid) == (["q"], "10.0.0.6", None)


def _workers_page(settings: QueueSettings) -> str:
    with TestClient(create_app(settings)) as client:
        reply = client.get("/workers")
        assert reply.status_code == 200
        return reply.text
