"""Prometheus metrics, scraped over HTTP and parsed as Prometheus parses them: a worker's
``--metrics-port`` (one process, and one endpoint for ``--processes 2``) and the dashboard's
``/metrics``."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from corral import JobState, QueueService, QueueSettings
from corral.dashboard import create_app

from conftest import PYTHON, SettingsFactory, python_env

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse(text: str) -> Samples:
    """Every sample of the text format, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def scrape(port: int) -> Samples | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return parse(reply.read().decode())
    except OSError:
        return None


async def scrape_until(port: int, metric: str, labels: dict[str, str], want: float) -> Samples:
    deadline = time.monotonic() + 20
    samples = None
    while time.monotonic() < deadline:
        samples = await asyncio.to_thread(scrape, port)
        if samples is not None and value(samples, metric, **labels) == want:
            return samples
        await asyncio.sleep(0.1)
    raise AssertionError(f"{metric}{labels} never reached {want}; last scrape: {samples}")


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def start(
    settings: QueueSettings, tmp_path: Path, port: int, *args: str
) -> subprocess.Popen[bytes]:
    env = python_env(
        QUEUE_BACKEND=settings.backend,
        QUEUE_NAME=settings.name,
        QUEUE_SQLITE_PATH=settings.sqlite_path,
        QUEUE_REDIS_URL=settings.redis_url,
        QUEUE_SHUTDOWN_GRACE_S="1",
    )
    return subprocess.Popen(
        [PYTHON, "-m", "corral.cli", "worker", "tasks_worker", "--metrics-port", str(port), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_a_worker_serves_its_metrics(
    make_settings: SettingsFactory,
    tmp_path: Path,
    worker_process: list[subprocess.Popen[bytes]],
) -> None:
    settings = make_settings()
    q = settings.name
    out = str(tmp_path / "trace.txt")
    async with QueueService(settings) as service:
        await service.enqueue_many(
            [{"name": "echo", "data": {"out": out, "value": n}} for n in range(3)]
            + [{"name": "flaky", "data": {"out": out}, "attempts": 3}]
            + [{"name": "boom", "data": {"value": 1}}]
        )
        port = free_port()
        worker_process.append(start(settings, tmp_path, port))
        samples = await scrape_until(
            port, "corral_jobs_completed_total", {"queue": q, "name": "echo"}, 3
        )
        samples = await scrape_until(
            port, "corral_jobs_failed_total", {"queue": q, "name": "boom"}, 1
        )
        samples = await scrape_until(
            port, "corral_jobs_completed_total", {"queue": q, "name": "flaky"}, 1
        )
        assert value(samples, "corral_jobs_retried_total", queue=q, name="flaky") == 1
        assert value(samples, "corral_jobs_failed_total", queue=q, name="echo") == 0
        # One duration per attempt, one wait per job (its first start).
        assert value(samples, "corral_job_duration_seconds_count", queue=q, name="flaky") == 2
        assert value(samples, "corral_job_wait_seconds_count", queue=q, name="flaky") == 1
        wait_all = value(samples, "corral_job_wait_seconds_bucket", queue=q, name="echo", le="+Inf")
        assert wait_all == 3
        duration_sum = value(samples, "corral_job_duration_seconds_sum", queue=q, name="echo")
        assert duration_sum is not None and 0 <= duration_sum < 3
        # Gauges read from the storage at the scrape.
        assert value(samples, "corral_queue_jobs", queue=q, state="completed") == 4
        assert value(samples, "corral_queue_jobs", queue=q, state="failed") == 1
        assert value(samples, "corral_queue_jobs", queue=q, state="waiting") == 0
        assert value(samples, "corral_workers", queue=q) == 1


@pytest.mark.parametrize("backend_kind", ["sqlite"])  # the supervisor's part is the same on both
async def test_one_endpoint_for_every_worker_process(
    make_settings: SettingsFactory,
    tmp_path: Path,
    worker_process: list[subprocess.Popen[bytes]],
) -> None:
    settings = make_settings()
    out = str(tmp_path / "trace.txt")
    async with QueueService(settings) as service:
        port = free_port()
        worker_process.append(start(settings, tmp_path, port, "--processes", "2", "-c", "1"))
        await scrape_until(port, "corral_workers", {"queue": settings.name}, 2)
        await service.enqueue_many(
            [{"name": "sleep", "data": {"out": out, "seconds": 0.2}} for _ in range(6)]
        )
        labels = {"queue": settings.name, "name": "sleep"}
        samples = await scrape_until(port, "corral_jobs_completed_total", labels, 6)
        lines = await asyncio.to_thread(Path(out).read_text)
        pids = {line.split()[3] for line in lines.splitlines()}
        assert len(pids) == 2, "both processes ran jobs (their numbers were added up)"
        assert value(samples, "corral_job_duration_seconds_count", **labels) == 6
        assert (await service.counts())[JobState.COMPLETED] == 6


def test_the_dashboard_serves_queue_metrics(make_settings: SettingsFactory) -> None:
    settings = make_settings()

    async def fill() -> None:
        async with QueueService(settings) as service:
            await service.enqueue_many([{"name": "x", "data": n} for n in range(3)])
            await service.enqueue("x", 9, delay_s=60)

    asyncio.run(fill())
    with TestClient(create_app(settings)) as client:
        reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    samples = parse(reply.text)
    assert value(samples, "corral_queue_jobs", queue=settings.name, state="waiting") == 3
    assert value(samples, "corral_queue_jobs", queue=settings.name, state="delayed") == 1
    assert value(samples, "corral_workers", queue=settings.name) == 0
