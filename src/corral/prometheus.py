"""Prometheus metrics (``pip install 'corral[metrics]'``): ``corral worker --metrics-port N``
and the dashboard's ``/metrics``.

- ``corral_jobs_completed_total{queue,name}`` (counter): jobs this worker completed.
- ``corral_jobs_failed_total{queue,name}`` (counter): jobs that failed for good.
- ``corral_jobs_retried_total{queue,name}`` (counter): failed attempts that will be retried.
- ``corral_job_duration_seconds{queue,name}`` (histogram): one attempt's run time.
- ``corral_job_wait_seconds{queue,name}`` (histogram): from enqueue to the first start.
- ``corral_queue_jobs{queue,state}`` (gauge): jobs per state, read from the storage at a scrape.
- ``corral_workers{queue}`` (gauge): live workers (:mod:`corral.workers`), read at a scrape.

A worker counts its jobs in plain Python numbers, on its event loop, without locks or I/O per job
(:class:`JobStats`); a scrape reads them. With ``--processes N`` each child writes its numbers to a
file of a directory the supervisor gave it, every second and when it stops, and the supervisor
serves one endpoint that adds up every child's (those of children that exited included, so the
counters never go back). The gauges are read from the storage at each scrape.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import ConfigError, MissingDependencyError
from corral.message import (
    Completed,
    Dispatch,
    Failed,
    JobState,
    Outcome,
    QueueMessage,
    RetryLater,
)
from corral.settings import QueueSettings

logger = logging.getLogger("corral.metrics")

METRICS_EXTRA_HINT = "pip install 'corral[metrics]'"
METRICS_DIR_ENV = "CORRAL_METRICS_DIR"
"""Where a supervised worker writes its numbers (set by the supervisor)."""
SNAPSHOT_EVERY_S = 1.0

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
WAIT_BUCKETS_S = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


def require() -> Any:
    """The ``prometheus_client`` module, or an error that says what to install."""
    try:
        import prometheus_client
        import prometheus_client.core  # the metric families of custom collectors
    except ImportError as exc:
        raise MissingDependencyError(
            f"Prometheus metrics need the prometheus-client package: {METRICS_EXTRA_HINT}"
        ) from exc
    return prometheus_client


@dataclass(slots=True)
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), then +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, other: Mapping[str, Any]) -> None:
        for i, count in enumerate(other["counts"][: len(self.counts)]):
            self.counts[i] += int(count)
        self.total += float(other["sum"])

    def dump(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}


@dataclass(slots=True)
class _Series:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    duration: _Histogram = field(default_factory=lambda: _Histogram(DURATION_BUCKETS_S))
    wait: _Histogram = field(default_factory=lambda: _Histogram(WAIT_BUCKETS_S))

    def add(self, other: Mapping[str, Any]) -> None:
        self.completed += int(other["completed"])
        self.failed += int(other["failed"])
        self.retried += int(other["retried"])
        self.duration.add(other["duration"])
        self.wait.add(other["wait"])

    def dump(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "failed": self.failed,
            "retried": self.retried,
            "duration": self.duration.dump(),
            "wait": self.wait.dump(),
        }


class JobStats:
    """One worker process's job counters and histograms by queue and job name.

    Only the worker's event loop writes them; a scrape from another thread reads a copy.
    """

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], _Series] = {}

    def wrap(self, dispatch: Dispatch) -> Dispatch:
        """``dispatch`` that records each attempt it runs."""

        async def timed(message: QueueMessage) -> Outcome:
            started = time.time()
            outcome = await dispatch(message)
            self.record(message, outcome, started, time.time())
            return outcome

        return timed

    def record(
        self, message: QueueMessage, outcome: Outcome, started_s: float, finished_s: float
    ) -> None:
        key = (message.queue, message.name)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series()
        kind = type(outcome)
        if kind is Completed:
            series.completed += 1
        elif kind is RetryLater:
            series.retried += 1
        elif kind is Failed:
            series.failed += 1
        # The histograms' observe, inlined: this runs for every job.
        took = finished_s - started_s
        duration = series.duration
        duration.counts[bisect.bisect_left(DURATION_BUCKETS_S, took)] += 1
        duration.total += took
        if message.attempt == 1:
            waited = started_s - message.enqueued_at.timestamp()
            if waited < 0:  # the producer's clock runs ahead of this machine's
                waited = 0.0
            wait = series.wait
            wait.counts[bisect.bisect_left(WAIT_BUCKETS_S, waited)] += 1
            wait.total += waited

    def dump(self) -> list[dict[str, Any]]:
        """The numbers as JSON-able rows (what a supervised worker writes to its file)."""
        return [
            {"queue": queue, "name": name, **series.dump()}
            for (queue, name), series in list(self.series.items())
        ]

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add the numbers of :meth:`dump` rows (another process's) to these."""
        for row in rows:
            key = (str(row["queue"]), str(row["name"]))
            series = self.series.get(key)
            if series is None:
                series = self.series[key] = _Series()
            series.add(row)


# -- supervised workers: a file each, added up by the supervisor --------------------------------


async def write_snapshots(stats: JobStats, directory: Path, stop: asyncio.Event) -> None:
    """Write ``stats`` to ``<directory>/<pid>.json`` every second until ``stop``, and once
    more then (a write is a rename: a scrape never reads half a file)."""
    path = directory / f"{os.getpid()}.json"
    while True:
        stopped = stop.is_set()
        try:
            text = json.dumps(stats.dump())
            temporary = path.with_suffix(".tmp")
            temporary.write_text(text, encoding="utf-8")
            temporary.replace(path)
        except OSError as exc:
            logger.warning("could not write the worker's metrics to %s: %s", path, exc)
        if stopped:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SNAPSHOT_EVERY_S)


def read_snapshots(directory: Path) -> JobStats:
    """Every supervised worker's numbers in ``directory``, added up."""
    total = JobStats()
    for path in sorted(directory.glob("*.json")):
        try:
            total.add(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("skipping unreadable worker metrics %s: %s", path, exc)
    return total


# -- what a scrape reads from the storage ------------------------------------------------------


@dataclass(slots=True)
class QueueGauges:
    """Jobs per state and live workers of some queues, as one scrape read them."""

    jobs: dict[str, dict[JobState, int]] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)


async def read_gauges(
    queues: Sequence[str],
    counts: Callable[[str], Awaitable[dict[JobState, int]]],
    workers: Callable[[], Awaitable[Sequence[Any]]],
) -> QueueGauges:
    """The gauges of ``queues``: their counts, and the workers (each with ``queues``) per queue."""
    gauges = QueueGauges()
    for queue in queues:
        gauges.jobs[queue] = await counts(queue)
    live = await workers()
    for queue in queues:
        gauges.workers[queue] = sum(1 for worker in live if queue in worker.queues)
    return gauges


async def read_storage_gauges(settings: QueueSettings, queues: Sequence[str]) -> QueueGauges:
    """:func:`read_gauges` over a connection of its own, closed afterwards (a scrape thread)."""
    from corral.service import QueueService

    async with QueueService(settings) as service:
        backend = service.backend
        return await read_gauges(
            queues,
            lambda queue: backend.for_queue(queue).counts(),
            lambda: backend.workers(every_queue=True),
        )


# -- the text format ---------------------------------------------------------------------------


def families(stats: JobStats | None, gauges: QueueGauges | None) -> Iterator[Any]:
    """The metric families of ``stats`` and ``gauges`` (prometheus_client's)."""
    core = require().core
    if stats is not None:
        series = sorted(list(stats.series.items()))
        for what, help_text in (
            ("completed", "Jobs completed"),
            ("failed", "Jobs failed for good (no attempt left)"),
            ("retried", "Failed attempts of jobs that will be retried"),
        ):
            counter = core.CounterMetricFamily(
                f"corral_jobs_{what}", help_text, labels=["queue", "name"]
            )
            for (queue, name), one in series:
                counter.add_metric([queue, name], getattr(one, what))
            yield counter
        for what, help_text in (
            ("duration", "Run time of one attempt of a job"),
            ("wait", "Time from a job's enqueue to its first start"),
        ):
            histogram = core.HistogramMetricFamily(
                f"corral_job_{what}_seconds", help_text, labels=["queue", "name"]
            )
            for (queue, name), one in series:
                observed: _Histogram = getattr(one, what)
                histogram.add_metric([queue, name], _cumulative(observed), sum_value=observed.total)
            yield histogram
    if gauges is not None:
        jobs = core.GaugeMetricFamily(
            "corral_queue_jobs", "Jobs of a queue in each state", labels=["queue", "state"]
        )
        for queue, counts in sorted(gauges.jobs.items()):
            for state, count in counts.items():
                jobs.add_metric([queue, state.value], count)
        yield jobs
        workers = core.GaugeMetricFamily(
            "corral_workers", "Live workers of a queue", labels=["queue"]
        )
        for queue, count in sorted(gauges.workers.items()):
            workers.add_metric([queue], count)
        yield workers


def _cumulative(histogram: _Histogram) -> list[tuple[str, int]]:
    buckets: list[tuple[str, int]] = []
    running = 0
    for bound, count in zip((*histogram.bounds, math.inf), histogram.counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == math.inf else _float_text(bound), running))
    return buckets


def _float_text(value: float) -> str:
    return repr(float(value))


class _Families:
    """A prometheus_client collector of families made by a function at each scrape."""

    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self.make = make

    def collect(self) -> Iterable[Any]:
        return list(self.make())


def exposition(make: Callable[[], Iterable[Any]]) -> tuple[bytes, str]:
    """The text format of the families ``make`` gives, and its content type."""
    client = require()
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(_Families(make))
    return client.generate_latest(registry), client.CONTENT_TYPE_LATEST


def serve_http(
    port: int,
    host: str,
    stats: Callable[[], JobStats],
    settings: QueueSettings,
    queues: Sequence[str],
) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a thread (prometheus_client's server): the
    worker's ``stats`` and, read at each scrape, the gauges of ``queues``."""
    client = require()
    registry = client.CollectorRegistry(auto_describe=False)

    def make() -> Iterator[Any]:
        try:
            gauges = asyncio.run(read_storage_gauges(settings, queues))
        except Exception as exc:  # the job numbers are still worth serving
            logger.warning("metrics: could not read the queues' counts: %s", exc)
            gauges = None
        return families(stats(), gauges)

    registry.register(_Families(make))
    try:
        server, _thread = client.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    logger.info("Prometheus metrics on http://%s:%d/metrics", host, port)
    return server


# -- a worker's export -------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerMetrics:
    """How a worker process exports its numbers: an endpoint of its own (``port``), or, under
    a supervisor that serves the endpoint, a file in ``directory``."""

    port: int | None = None
    host: str = "127.0.0.1"
    directory: Path | None = None
    stats: JobStats = field(default_factory=JobStats)
    _server: Any = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _writer: asyncio.Task[None] | None = None

    def start(self, service: Any, queues: Sequence[str]) -> None:
        """Record ``service``'s job runs, and serve them (or write them for the supervisor)."""
        require()
        service.instruments.append(self.stats.wrap)
        if self.directory is not None:
            self._writer = asyncio.create_task(
                write_snapshots(self.stats, self.directory, self._stop), name="corral-metrics"
            )
        elif self.port is not None:
            self._server = serve_http(
                self.port, self.host, lambda: self.stats, service.settings, queues
            )

    async def stop(self) -> None:
        """Write the last numbers, or stop serving."""
        self._stop.set()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer, 5.0)
        if self._server is not None:
            await asyncio.to_thread(_shutdown, self._server)


def _shutdown(server: Any) -> None:
    server.shutdown()
    server.server_close()
