"""``corral bench``: a load test of corral itself, on SQLite and on BullMQ (Redis), as
redis-benchmark and pgbench ship with their servers.

It measures enqueue rates (one by one and in bulk), jobs processed per second at concurrency
1, 10 and 50, the idle pickup latency and the worker's memory, and checks the figures against
corral's targets. The same machinery measures other queues side by side with corral: a
:class:`System` says whether a queue can run and how to start its runners, a :class:`Suite`
lists the systems and checks of one command (``bench/compare.py`` in a corral checkout adds the
``bullmq`` package's Worker, Node.js BullMQ and Huey).

Method, the same for every system:

- Every measurement runs in separate processes ("runners"): a long-lived *producer* process per
  system and a fresh *worker* process per worker run. This process only orchestrates, so what
  is timed never shares an interpreter (and its GIL) with the progress bar and the bookkeeping.
  corral's runners are ``python -m corral.tools.bench SYSTEM ROLE``; every runner, in any
  language, takes the same roles and answers with the same JSON lines.
- Every phase gets a fresh queue (a fresh SQLite file, or a fresh queue name on Redis whose keys
  are deleted afterwards).
- Enqueue: the producer adds N jobs one by one (awaiting each), then N more in bulk (batches);
  the rate is N over the producer's wall time.
- Processed: the queue is filled first (untimed), then a worker process at concurrency C runs
  no-op jobs; the time is from the first handler call to the N-th, taken in the worker, so
  process start-up and shutdown are not in it.
- Idle pickup: a worker (concurrency 1) waits on an empty queue; the producer reads the clock and
  enqueues one job carrying that time; the handler subtracts it from its own clock
  (CLOCK_MONOTONIC, shared by every process of the machine). Across processes: producer and
  worker are two processes. In process: one process runs both. Random pauses between samples let
  the worker go back to idle; the first sample is a warm-up and is dropped.
- Worker RSS: the worker process reads its own ``VmRSS`` at start, after a warm-up count of jobs
  and after the last job of the concurrency-50 run (100,000 jobs in the full run).
- Flows (systems that have them): the producer adds F flows of one parent and N no-op children
  each (timed: jobs added per second); a worker process at concurrency C runs them. Children
  per second: from the first child's handler call to the last one's. Parent release: the time
  from a flow's last child's handler call to its parent's handler call (its result recorded,
  the parent released, claimed and started), one sample per flow; the parent checks it got
  all N results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import queue
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

import corral
from corral import __version__
from corral._cliutil import cli_state, corral_errors
from corral.errors import BenchError, ConfigError, Unsupported
from corral.flows import FlowJob
from corral.message import QueueMessage
from corral.service import QueueService
from corral.settings import QueueSettings, is_loopback_url, redact_url
from corral.tools.limits import LIMIT_LABELS, measure_limits

SCHEMA = "corral-bench/1"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
JOB_NAME = "noop"
FLOW_CHILD = "flow_child"
FLOW_PARENT = "flow_parent"
BUSY_LOAD = 0.5
RUNNER_MODULE = "corral.tools.bench"
BACKEND_LABELS = {"sqlite": "SQLite", "bullmq": "BullMQ"}


# -- plans --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """How much each phase does; bounded in count and, per phase, in time."""

    mode: str
    enqueue_one: int
    enqueue_bulk: int
    bulk_batch: int
    processed: dict[int, int]
    """Jobs per worker run, by concurrency."""
    rss_concurrency: int
    warm_jobs: int
    idle_samples: int
    idle_in_process_samples: int
    idle_gap_ms: tuple[int, int]
    max_phase_s: float
    under_load_jobs: int = 2_000
    """Jobs enqueued one by one by ``under_load_tasks`` tasks while a worker drains them."""
    under_load_tasks: int = 8
    flows: int = 2
    flow_children: int = 500
    """Children per flow (one parent each)."""
    flow_concurrency: int = 10
    limit_s: float = 1.0
    """How long each of the machine's limits is measured (corral.tools.limits)."""


FULL = Plan(
    mode="full",
    enqueue_one=10_000,
    enqueue_bulk=50_000,
    bulk_batch=1_000,
    processed={1: 5_000, 10: 20_000, 50: 100_000},
    rss_concurrency=50,
    warm_jobs=2_000,
    idle_samples=100,
    idle_in_process_samples=50,
    idle_gap_ms=(20, 100),
    max_phase_s=120.0,
    under_load_jobs=10_000,
    flows=5,
    flow_children=5_000,
    flow_concurrency=10,
)

QUICK = Plan(
    mode="quick",
    enqueue_one=300,
    enqueue_bulk=2_000,
    bulk_batch=500,
    processed={1: 300, 10: 1_000, 50: 1_000},
    rss_concurrency=50,
    warm_jobs=100,
    idle_samples=8,
    idle_in_process_samples=8,
    idle_gap_ms=(10, 40),
    max_phase_s=20.0,
    under_load_jobs=500,
    flows=2,
    flow_children=500,
    flow_concurrency=10,
    limit_s=0.25,
)


# -- results ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Pickup:
    """Idle pickup latencies of one way of measuring, in milliseconds."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass(slots=True)
class Memory:
    """Worker process RSS (kB) at start, after the warm-up jobs and after the last job."""

    jobs: int
    start_kb: int
    warm_kb: int
    end_kb: int
    peak_kb: int


@dataclass(slots=True)
class SystemResult:
    """Everything measured for one system; ``None`` where a phase did not run or failed."""

    system: str
    label: str
    available: bool
    reason: str | None = None
    version: str | None = None
    enqueue_one_per_s: float | None = None
    enqueue_bulk_per_s: float | None = None
    processed_per_s: dict[str, float] = field(default_factory=dict)
    """By concurrency, as a string key ("1", "10", "50") so the JSON reads the same."""
    pickup: dict[str, Pickup] = field(default_factory=dict)
    """``cross_process`` and ``in_process``."""
    rss: Memory | None = None
    enqueue_under_load_per_s: float | None = None
    """Enqueues one by one from several tasks of one event loop while a worker drains them."""
    loop_lag: Pickup | None = None
    """How late the producer's event loop ran a 1 ms timer meanwhile (ms): what a web app
    enqueueing from its request handlers loses."""
    flow_enqueue_per_s: float | None = None
    """Jobs of flows added per second (each flow one atomic write)."""
    flow_children_per_s: float | None = None
    flow_release: Pickup | None = None
    """From a flow's last child's handler call to its parent's, in milliseconds."""
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    phase_s: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase, set-up and clean-up included (to plan a run's length)."""


@dataclass(slots=True)
class Check:
    """A target or a reference ratio computed from one run's figures."""

    check: str
    measured: str
    target: str
    met: bool | None
    values: dict[str, float] = field(default_factory=dict)


# -- the runner: one system's producer or worker in this process ------------------------------

Data = dict[str, Any]
OnJob = Callable[[Data], None]


def now_us() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock every process (and Node's hrtime) shares."""
    return time.monotonic_ns() // 1000


def memory_kb() -> tuple[int, int]:
    """This process's (VmRSS, VmHWM) in kB; (0, 0) where /proc is not there."""
    rss = hwm = 0
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


class Client(ABC):
    """One system's producer and worker, driven by the runner roles."""

    def __init__(self, queue_name: str, path: str | None, redis_url: str) -> None:
        self.queue_name = queue_name
        self.path = path
        self.redis_url = redis_url

    @abstractmethod
    async def open(self) -> None:
        """Connect (so that connecting is not timed with the first job)."""

    @abstractmethod
    async def enqueue_one(self, data: Data) -> None:
        """Add one no-op job."""

    async def enqueue_bulk(self, items: list[Data]) -> None:
        """Add several no-op jobs with the system's bulk API."""
        raise Unsupported("no bulk enqueue API")

    async def prefill(self, items: list[Data]) -> None:
        """Fill the queue before a worker run (untimed); the bulk API where there is one."""
        await self.enqueue_bulk(items)

    @abstractmethod
    async def work(self, concurrency: int, on_job: OnJob, stop: asyncio.Event) -> None:
        """Run a worker that calls ``on_job(data)`` for each job until ``stop`` is set."""

    async def enqueue_flow(self, flow: int, children: int) -> None:
        """Add one flow: a parent and ``children`` no-op children, their data ``{"f": flow}``."""
        raise Unsupported("no flows")

    async def work_flows(
        self,
        concurrency: int,
        on_child: OnJob,
        on_parent: Callable[[Data, int], None],
        stop: asyncio.Event,
    ) -> None:
        """Run a worker of flows until ``stop``: ``on_child(data)`` for each child,
        ``on_parent(data, number of children's results)`` for each parent."""
        raise Unsupported("no flows")

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


class CorralClient(Client):
    """corral's QueueService, on the SQLite or the BullMQ backend."""

    def __init__(self, queue_name: str, path: str | None, redis_url: str, backend: str) -> None:
        super().__init__(queue_name, path, redis_url)
        settings = QueueSettings(
            backend=backend,
            name=queue_name,
            sqlite_path=path or "corral-bench.db",
            redis_url=redis_url,
            max_flow_jobs=1_000_000,
        )
        self.service = QueueService(settings)

    async def open(self) -> None:
        await self.service.counts()

    async def enqueue_one(self, data: Data) -> None:
        await self.service.enqueue(JOB_NAME, data)

    async def enqueue_bulk(self, items: list[Data]) -> None:
        await self.service.enqueue_many({"name": JOB_NAME, "data": data} for data in items)

    async def work(self, concurrency: int, on_job: OnJob, stop: asyncio.Event) -> None:
        service = self.service

        @service.handler(JOB_NAME)
        async def noop(message: QueueMessage) -> None:
            on_job(message.data)

        await self._run_until(stop, concurrency)

    async def enqueue_flow(self, flow: int, children: int) -> None:
        data = {"f": flow}
        await self.service.enqueue_flow(
            FlowJob(FLOW_PARENT, data, children=[FlowJob(FLOW_CHILD, data)] * children)
        )

    async def work_flows(
        self,
        concurrency: int,
        on_child: OnJob,
        on_parent: Callable[[Data, int], None],
        stop: asyncio.Event,
    ) -> None:
        service = self.service

        @service.handler(FLOW_CHILD)
        async def child(message: QueueMessage) -> None:
            on_child(message.data)

        @service.handler(FLOW_PARENT)
        async def parent(message: QueueMessage) -> None:
            started = now_us()
            on_parent({**message.data, "started_us": started}, len(await message.children()))

        await self._run_until(stop, concurrency)

    async def _run_until(self, stop: asyncio.Event, concurrency: int) -> None:
        service = self.service

        async def stopper() -> None:
            await stop.wait()
            service.stop()

        watch = asyncio.create_task(stopper())
        try:
            await service.start_worker(concurrency=concurrency)
        finally:
            watch.cancel()

    async def close(self) -> None:
        await self.service.close()


ClientFactory = Callable[[str, str | None, str], Client]
"""Makes a system's client from (queue name, SQLite file or None, Redis URL)."""


def _corral_client(backend: str) -> ClientFactory:
    def make(queue_name: str, path: str | None, redis_url: str) -> Client:
        return CorralClient(queue_name, path, redis_url, backend)

    return make


CORRAL_CLIENTS: dict[str, ClientFactory] = {
    "corral-sqlite": _corral_client("sqlite"),
    "corral-bullmq": _corral_client("bullmq"),
}
"""The clients of ``python -m corral.tools.bench SYSTEM ROLE``."""


class Meter:
    """Counts handler calls (from any thread) and takes the clock and the RSS at set points."""

    def __init__(self, count: int, warm: int) -> None:
        self.count = count
        self.warm = max(1, min(warm, count))
        self.jobs = 0
        self.first_us = 0
        self.last_us = 0
        self.warm_kb = 0
        self.end_kb = 0
        self.peak_kb = 0
        self._lock = threading.Lock()

    def tick(self) -> bool:
        """Record one handler call; ``True`` on the ``count``-th."""
        t = now_us()
        with self._lock:
            self.jobs += 1
            n = self.jobs
        if n == 1:
            self.first_us = t
        if n == self.warm:
            self.warm_kb = memory_kb()[0]
        if n == self.count:
            self.last_us = t
            self.end_kb, self.peak_kb = memory_kb()
            return True
        return False


def _emit(value: Any) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def _read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _items(start: int, count: int) -> list[Data]:
    return [{"i": i} for i in range(start, start + count)]


async def role_producer(make_client: ClientFactory, redis_url: str) -> None:
    """Answer JSON commands on stdin: ``enqueue`` (timed), ``probe`` (an idle-pickup job)."""
    clients: dict[str, Client] = {}

    async def client_for(command: Data) -> Client:
        key = str(command["queue"])
        if key not in clients:
            client = make_client(key, command.get("path"), redis_url)
            await client.open()
            clients[key] = client
        return clients[key]

    try:
        while line := await _read_line():
            if not line.strip():
                continue
            try:
                command = json.loads(line)
                op = command.get("op")
                if op == "enqueue":
                    client = await client_for(command)
                    count, batch = int(command["count"]), int(command.get("batch") or 0)
                    started = time.perf_counter()
                    if command.get("prefill"):
                        for start in range(0, count, max(batch, 1)):
                            await client.prefill(_items(start, min(batch, count - start)))
                    elif batch > 0:
                        for start in range(0, count, batch):
                            await client.enqueue_bulk(_items(start, min(batch, count - start)))
                    else:
                        for i in range(count):
                            await client.enqueue_one({"i": i})
                    elapsed_s = time.perf_counter() - started
                    answer: Data = {"ok": True, "count": count, "elapsed_s": elapsed_s}
                elif op == "enqueue_under_load":
                    client = await client_for(command)
                    answer = await _enqueue_watching_the_loop(
                        client, int(command["count"]), int(command["tasks"])
                    )
                elif op == "flow":
                    client = await client_for(command)
                    flows, children = int(command["flows"]), int(command["children"])
                    started = time.perf_counter()
                    for flow in range(flows):
                        await client.enqueue_flow(flow, children)
                    elapsed_s = time.perf_counter() - started
                    answer = {"ok": True, "jobs": flows * (children + 1), "elapsed_s": elapsed_s}
                elif op == "probe":
                    client = await client_for(command)
                    await client.enqueue_one({"t0_us": now_us()})
                    answer = {"ok": True}
                elif op == "close":
                    closing = clients.pop(str(command["queue"]), None)
                    if closing is not None:
                        await closing.close()
                    answer = {"ok": True}
                else:
                    answer = {"ok": False, "error": f"unknown op {op!r}"}
            except Unsupported as exc:
                answer = {"ok": False, "unsupported": True, "error": str(exc)}
            except Exception as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            _emit(answer)
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.close()


async def _enqueue_watching_the_loop(client: Client, count: int, tasks: int) -> Data:
    """Enqueue ``count`` jobs one by one from ``tasks`` tasks, as request handlers of a web app
    do, while a timer measures how late the event loop runs it."""
    lags_ms: list[float] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags_ms.append(max(0.0, (time.perf_counter() - before - 0.001) * 1000))

    async def produce(first: int) -> None:
        for i in range(first, count - 1, tasks):
            await client.enqueue_one({"i": i})
            # A request handler returns to the loop after its enqueue (to write its response):
            # what is measured is how long one enqueue holds the loop, not a loop that never
            # lets go.
            await asyncio.sleep(0)

    await client.enqueue_one({"i": -1})  # connected first: opening is not what is measured
    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    await asyncio.gather(*(produce(n) for n in range(tasks)))
    elapsed_s = time.perf_counter() - started
    done.set()
    await watcher
    lags_ms.sort()
    return {
        "ok": True,
        "count": count,
        "elapsed_s": elapsed_s,
        "lag_ms": [percentile(lags_ms, 0.5), percentile(lags_ms, 0.99), lags_ms[-1]],
        "samples": len(lags_ms),
    }


async def role_work(
    client: Client, count: int, concurrency: int, max_s: float, warm: int, start_at_us: int = 0
) -> Data:
    """Drain ``count`` prefilled jobs at ``concurrency``; report the time and the RSS.
    ``start_at_us`` (CLOCK_MONOTONIC): start the worker then, with the other worker processes."""
    await client.open()
    if start_at_us:
        await asyncio.sleep(max(0.0, (start_at_us - now_us()) / 1e6))
    start_kb = memory_kb()[0]
    meter = Meter(count, warm)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_job(data: Data) -> None:
        if meter.tick():
            loop.call_soon_threadsafe(stop.set)

    worker = asyncio.create_task(client.work(concurrency, on_job, stop))
    waiting = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({worker, waiting}, timeout=max_s, return_when="FIRST_COMPLETED")
    timed_out = not done
    if worker in done:
        waiting.cancel()
        worker.result()  # raises what the worker raised
        # A worker in another thread may finish before the loop runs the stop callback it
        # scheduled with the last job: that is a complete run, not an early stop.
        if meter.jobs < count:
            raise BenchError(f"the worker stopped after {meter.jobs} of {count} jobs")
    if timed_out:
        meter.last_us = now_us()
        meter.end_kb, meter.peak_kb = memory_kb()
        waiting.cancel()
    stop.set()
    await asyncio.wait_for(worker, 60)
    await client.close()
    return {
        "ok": True,
        "jobs": meter.jobs,
        "timed_out": timed_out,
        "elapsed_s": (meter.last_us - meter.first_us) / 1e6 if meter.jobs > 1 else 0.0,
        "first_us": meter.first_us,
        "last_us": meter.last_us,
        "rss_kb": {
            "start": start_kb,
            "warm": meter.warm_kb or meter.end_kb,
            "end": meter.end_kb,
        },
        "hwm_kb": meter.peak_kb,
    }


async def role_flow_work(
    client: Client, flows: int, children: int, concurrency: int, max_s: float
) -> Data:
    """Run ``flows`` prefilled flows of ``children`` children; report the children's rate and,
    per flow, the time from its last child's handler call to its parent's."""
    await client.open()
    lock = threading.Lock()
    last_child_us: dict[int, int] = {}
    seen = {"children": 0, "first_us": 0, "last_us": 0}
    releases_us: list[int] = []
    short: list[str] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_child(data: Data) -> None:
        t = now_us()
        with lock:
            seen["children"] += 1
            seen["first_us"] = seen["first_us"] or t
            seen["last_us"] = t
            last_child_us[int(data["f"])] = t

    def on_parent(data: Data, results: int) -> None:
        with lock:
            releases_us.append(int(data["started_us"]) - last_child_us.get(int(data["f"]), 0))
            if results != children:
                short.append(f"flow {data['f']}: the parent saw {results} of {children} children")
            if len(releases_us) == flows:
                loop.call_soon_threadsafe(stop.set)

    worker = asyncio.create_task(client.work_flows(concurrency, on_child, on_parent, stop))
    waiting = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({worker, waiting}, timeout=max_s, return_when="FIRST_COMPLETED")
    if worker in done:
        waiting.cancel()
        worker.result()
    stop.set()
    await asyncio.wait_for(worker, 60)
    await client.close()
    if short:
        return {"ok": False, "error": "; ".join(short)}
    return {
        "ok": True,
        "children": seen["children"],
        "parents": len(releases_us),
        "timed_out": not done,
        "elapsed_s": (seen["last_us"] - seen["first_us"]) / 1e6,
        "releases_ms": [us / 1000 for us in releases_us],
    }


async def role_idle_worker(client: Client) -> None:
    """Print ``{"latency_us": ...}`` for each job until stdin closes."""
    await client.open()
    lock = threading.Lock()
    stop = asyncio.Event()

    def on_job(data: Data) -> None:
        latency = now_us() - int(data["t0_us"])
        with lock:
            _emit({"latency_us": latency})

    worker = asyncio.create_task(client.work(1, on_job, stop))
    await asyncio.sleep(0.1)
    if worker.done():
        worker.result()
    _emit({"ready": True})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop.set()
    await asyncio.wait_for(worker, 30)
    await client.close()


async def role_idle(client: Client, samples: int, gap_ms: tuple[int, int]) -> Data:
    """Producer and worker in this process: the idle pickup latency without a process hop."""
    await client.open()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    pending: list[asyncio.Future[int]] = []

    def deliver(latency: int) -> None:
        if pending and not pending[0].done():
            pending[0].set_result(latency)

    def on_job(data: Data) -> None:
        loop.call_soon_threadsafe(deliver, now_us() - int(data["t0_us"]))

    worker = asyncio.create_task(client.work(1, on_job, stop))
    await asyncio.sleep(0.2)
    latencies: list[float] = []
    for index in range(samples + 1):
        await asyncio.sleep(random.uniform(*gap_ms) / 1000)
        if worker.done():
            worker.result()
            raise BenchError("the worker stopped")
        pending[:] = [loop.create_future()]
        await client.enqueue_one({"t0_us": now_us()})
        latency_us = await asyncio.wait_for(pending[0], 30)
        if index > 0:  # the first one warms up
            latencies.append(latency_us / 1000)
    stop.set()
    await asyncio.wait_for(worker, 30)
    await client.close()
    return {"ok": True, "latencies_ms": latencies}


def runner_main(
    argv: Sequence[str] | None = None,
    clients: Mapping[str, ClientFactory] = CORRAL_CLIENTS,
    prog: str = f"python -m {RUNNER_MODULE}",
) -> None:
    """``python -m corral.tools.bench SYSTEM ROLE``: one runner process of ``corral bench``;
    ``clients`` (the systems it can run) and ``prog`` for a runner entry of other systems."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("system", choices=sorted(clients))
    parser.add_argument("role", choices=("producer", "work", "idle-worker", "idle", "flow-work"))
    parser.add_argument("--queue", default="bench")
    parser.add_argument("--path", default=None, help="SQLite file (SQLite systems)")
    parser.add_argument("--redis", default=DEFAULT_REDIS_URL)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-s", type=float, default=120.0)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--start-at-us", type=int, default=0)
    parser.add_argument("--flows", type=int, default=1)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--gap-min-ms", type=int, default=50)
    parser.add_argument("--gap-max-ms", type=int, default=200)
    args = parser.parse_args(argv)

    async def go() -> None:
        if args.role == "producer":
            await role_producer(clients[args.system], args.redis)
            return
        client = clients[args.system](args.queue, args.path, args.redis)
        if args.role == "work":
            _emit(
                await role_work(
                    client, args.count, args.concurrency, args.max_s, args.warm, args.start_at_us
                )
            )
        elif args.role == "flow-work":
            _emit(
                await role_flow_work(client, args.flows, args.count, args.concurrency, args.max_s)
            )
        elif args.role == "idle-worker":
            await role_idle_worker(client)
        else:
            _emit(await role_idle(client, args.samples, (args.gap_min_ms, args.gap_max_ms)))

    asyncio.run(go())


# -- the orchestrator ---------------------------------------------------------------------------


class _Child:
    """A runner subprocess; a thread reads its stdout so that every read can time out."""

    def __init__(self, command: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path):
        self.command = list(command)
        self.log = log
        self._log_file: IO[bytes] = open(log, "wb")  # noqa: SIM115  (closed in finish)
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            cwd=cwd,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def stderr_tail(self, lines: int = 6) -> str:
        with contextlib.suppress(OSError):
            self._log_file.flush()
            text = self.log.read_text("utf-8", "replace").strip().splitlines()
            return " | ".join(text[-lines:])
        return ""

    def send(self, command: Data) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchError(f"runner exited early: {self.stderr_tail()}") from exc

    def receive(self, timeout_s: float) -> Data:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"no answer within {timeout_s:.0f}s") from None
            if line is None:
                code = self.process.wait()
                raise BenchError(f"runner exited with {code}: {self.stderr_tail()}")
            if line.lstrip().startswith("{"):
                answer: Data = json.loads(line)
                return answer

    def call(self, command: Data, timeout_s: float) -> Data:
        self.send(command)
        answer = self.receive(timeout_s)
        if not answer.get("ok"):
            error = str(answer.get("error", "failed"))
            raise Unsupported(error) if answer.get("unsupported") else BenchError(error)
        return answer

    def finish(self, timeout_s: float = 30.0) -> None:
        """Close stdin (the runner's signal to stop), wait, kill if it does not exit."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        self._log_file.close()


@dataclass(slots=True)
class Environment:
    """The Redis the orchestrator found (or started) for the systems that need one."""

    redis_url: str
    redis_version: str | None
    redis_error: str | None


def _redis_client(url: str) -> Any:
    redis: Any = importlib.import_module("redis")
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def _redis_version(url: str) -> str:
    client = _redis_client(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def _loopback_6379(url: str) -> bool:
    parts = urlsplit(url)
    return parts.hostname in ("127.0.0.1", "localhost") and (parts.port or 6379) == 6379


def ensure_redis(url: str) -> tuple[str | None, str | None, bool]:
    """(version, error, started): start a private redis-server on 127.0.0.1:6379 if the default
    URL does not answer (it is shut down again at the end)."""
    try:
        return _redis_version(url), None, False
    except Exception as exc:
        first_error = f"Redis at {url} does not answer ({type(exc).__name__})"
    server = shutil.which("redis-server")
    if not _loopback_6379(url) or server is None:
        return None, first_error, False
    subprocess.run(
        [server, "--daemonize", "yes", "--port", "6379", "--save", "", "--appendonly", "no"],
        check=False,
        capture_output=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            return _redis_version(url), None, True
        time.sleep(0.1)
    return None, f"{first_error}; redis-server was started but does not answer", False


def package_version(name: str) -> str | None:
    """The installed version of the Python distribution ``name``, or ``None``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class System(ABC):
    """A queue the benchmark measures: whether it can run here, and how to start its runners."""

    uses_redis: bool = False
    """Its queues live on the run's Redis (else each phase gets a SQLite file)."""
    multi_process: bool = False
    """``--processes N`` applies: N worker processes drain its processed phases together."""
    flows: bool = False
    """It has flows (parents run after their children): the flow phase applies."""

    def __init__(self, name: str, label: str) -> None:
        self.name = name
        self.label = label

    @abstractmethod
    def availability(self, env: Environment) -> tuple[str | None, str | None]:
        """(what runs, with versions; ``None``) if it can run here, else (``None``, why not).
        Only asked when the run's Redis answers or the system does not use Redis."""

    @abstractmethod
    def runner(self, role: str) -> list[str]:
        """The command that starts one of its runner processes in ``role``; the options
        (``--queue``, ``--redis``, ``--count``, ...) are appended."""

    def runtimes(self) -> dict[str, str | None]:
        """Versions of the runtimes it needs besides Python (e.g. ``{"node": "v20.1.0"}``),
        recorded with the machine."""
        return {}


class CorralSystem(System):
    """corral's ``QueueService`` on one backend, run by ``python -m corral.tools.bench``."""

    multi_process = True
    flows = True

    def __init__(self, backend: str) -> None:
        super().__init__(f"corral-{backend}", f"corral, {BACKEND_LABELS[backend]} backend")
        self.backend = backend
        self.uses_redis = backend == "bullmq"

    def availability(self, env: Environment) -> tuple[str | None, str | None]:
        if self.backend == "sqlite":
            return f"corral {__version__}, SQLite {sqlite3.sqlite_version}", None
        if importlib.util.find_spec("corral.backends.bullmq") is None:
            return None, "not installed: this corral has no BullMQ backend module"
        return f"corral {__version__}, Redis {env.redis_version}", None

    def runner(self, role: str) -> list[str]:
        return [sys.executable, "-m", RUNNER_MODULE, self.name, role]


@dataclass(frozen=True, slots=True)
class Suite:
    """What one benchmark command measures: its systems (in the report's order), the checks
    computed from their figures, and the Python packages whose versions the report names."""

    systems: dict[str, System]
    checks: Callable[[dict[str, SystemResult], dict[str, float], int], list[Check]]
    """From the figures of the systems, the machine's limits measured in the same run and the
    worker processes of corral's systems (``--processes``)."""
    packages: tuple[str, ...]

    def parse_systems(self, values: Sequence[str] | None) -> list[str]:
        """``--systems a,b --systems c`` as a list in the suite's order; all when empty."""
        if not values:
            return list(self.systems)
        chosen = {part.strip() for value in values for part in value.split(",") if part.strip()}
        unknown = sorted(chosen - set(self.systems))
        if unknown:
            raise ConfigError(
                f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(self.systems)}"
            )
        return [name for name in self.systems if name in chosen]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile by linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no samples")
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def pickup_of(latencies_ms: Sequence[float]) -> Pickup:
    """Summarise idle pickup samples."""
    return Pickup(
        samples=len(latencies_ms),
        p50_ms=round(statistics.median(latencies_ms), 3),
        p99_ms=round(percentile(latencies_ms, 0.99), 3),
        max_ms=round(max(latencies_ms), 3),
    )


class Bench:
    """Runs the phases of each system and collects a :class:`SystemResult` per system."""

    def __init__(
        self,
        plan: Plan,
        env: Environment,
        workdir: Path,
        progress: Progress,
        processes: int = 1,
    ) -> None:
        self.plan = plan
        self.processes = processes
        self.env = env
        self.workdir = workdir
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:8]
        self.children: list[_Child] = []
        self._redis: Any = None
        self._child_env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_")}
        self._child_env.setdefault("PYTHONUNBUFFERED", "1")
        # The runners import the corral this process imported (a checkout's src, for one).
        corral_home = str(Path(corral.__file__).resolve().parents[1])
        self._child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (corral_home, os.environ.get("PYTHONPATH", "")) if p
        )

    # Children -----------------------------------------------------------------------------

    def _command(self, system: System, role: str, options: dict[str, Any]) -> list[str]:
        command = [*system.runner(role), "--redis", self.env.redis_url]
        for key, value in options.items():
            if value is not None:
                command += [f"--{key.replace('_', '-')}", str(value)]
        return command

    def spawn(self, system: System, role: str, **options: Any) -> _Child:
        """Start a runner; every runner started here is ended by :meth:`close`."""
        log = self.workdir / f"{system.name}-{role}-{len(self.children)}.log"
        child = _Child(
            self._command(system, role, options), cwd=self.workdir, env=self._child_env, log=log
        )
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()
            with contextlib.suppress(Exception):
                child.finish(5)
        self.children.clear()
        if self._redis is not None:
            self._redis.close()

    # Places -------------------------------------------------------------------------------

    def place(self, system: System, phase: str) -> dict[str, Any]:
        """A fresh queue (and SQLite file) for one phase of one system."""
        name = f"corral-bench-{self.run_id}-{system.name}-{phase}"
        path = None
        if not system.uses_redis:
            folder = self.workdir / system.name
            folder.mkdir(exist_ok=True)
            path = str(folder / f"{phase}.db")
        return {"queue": name, "path": path}

    def discard(self, system: System, where: dict[str, Any]) -> None:
        """Delete what a phase left: the Redis keys of its queue, or its SQLite files."""
        if system.uses_redis:
            if self._redis is None:
                self._redis = _redis_client(self.env.redis_url)
            pattern = f"bull:{where['queue']}:*"
            batch: list[bytes] = []
            for key in self._redis.scan_iter(match=pattern, count=2000):
                batch.append(key)
                if len(batch) >= 2000:
                    self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                self._redis.unlink(*batch)
        elif where["path"]:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(where["path"] + suffix)

    # Phases -------------------------------------------------------------------------------

    def run_system(self, system: System, version: str, task: Any) -> SystemResult:
        result = SystemResult(system.name, system.label, True, version=version)
        plan = self.plan
        phases: list[tuple[str, Callable[[_Child], None]]] = [
            ("enqueue one by one", lambda p: self._enqueue(system, p, result, bulk=False)),
            ("enqueue in bulk", lambda p: self._enqueue(system, p, result, bulk=True)),
        ]
        for concurrency in plan.processed:
            phases.append(
                (
                    f"processed at concurrency {concurrency}",
                    functools.partial(
                        self._processed, system, result=result, concurrency=concurrency
                    ),
                )
            )
        if isinstance(system, CorralSystem):  # the loop corral's producers run on
            phases.append(
                ("enqueue under load", lambda p: self._enqueue_under_load(system, p, result))
            )
        phases.append(("idle pickup across processes", lambda p: self._pickup(system, p, result)))
        phases.append(("idle pickup in process", lambda p: self._pickup_in_process(system, result)))
        if system.flows:
            phases.append(("flows", lambda p: self._flows(system, p, result)))
        producer = self.spawn(system, "producer")
        try:
            for title, phase in phases:
                self.progress.update(task, description=f"{system.name}: {title}")
                began = time.monotonic()
                try:
                    phase(producer)
                except Unsupported as exc:
                    result.notes.append(f"{title}: {exc}")
                except Exception as exc:
                    result.errors.append(f"{title}: {exc}")
                result.phase_s[title] = round(time.monotonic() - began, 1)
                self.progress.advance(task)
        finally:
            producer.finish()
        return result

    def _enqueue_timeout(self, count: int) -> float:
        return self.plan.max_phase_s + count / 500

    def _enqueue(
        self, system: System, producer: _Child, result: SystemResult, *, bulk: bool
    ) -> None:
        plan = self.plan
        count = plan.enqueue_bulk if bulk else plan.enqueue_one
        where = self.place(system, "bulk" if bulk else "one")
        try:
            answer = producer.call(
                {"op": "enqueue", **where, "count": count, "batch": plan.bulk_batch if bulk else 0},
                self._enqueue_timeout(count),
            )
        finally:
            with contextlib.suppress(BenchError):
                producer.call({"op": "close", **where}, 30)
            self.discard(system, where)
        rate = count / float(answer["elapsed_s"])
        if bulk:
            result.enqueue_bulk_per_s = round(rate, 1)
        else:
            result.enqueue_one_per_s = round(rate, 1)

    def _processed(
        self, system: System, producer: _Child, result: SystemResult, concurrency: int
    ) -> None:
        plan = self.plan
        count = plan.processed[concurrency]
        where = self.place(system, f"c{concurrency}")
        shared = self.processes > 1 and system.multi_process
        # Several processes each stop after their share, and the jobs a process runs while it
        # stops are more than its share: extra jobs keep the last process from running dry.
        extra = self.processes * max(concurrency, 100) * 2 if shared else 0
        try:
            producer.call(
                {
                    "op": "enqueue",
                    **where,
                    "count": count + extra,
                    "batch": plan.bulk_batch,
                    "prefill": True,
                },
                self._enqueue_timeout(count + extra),
            )
            producer.call({"op": "close", **where}, 30)
            if shared:
                answer = self._processed_by_processes(system, where, count, concurrency)
            else:
                worker = self.spawn(
                    system,
                    "work",
                    **where,
                    count=count,
                    concurrency=concurrency,
                    max_s=plan.max_phase_s,
                    warm=plan.warm_jobs,
                )
                try:
                    answer = worker.receive(plan.max_phase_s + 60)
                finally:
                    worker.finish()
        finally:
            self.discard(system, where)
        if not answer.get("ok"):
            raise BenchError(str(answer.get("error")))
        jobs, elapsed_s = int(answer["jobs"]), float(answer["elapsed_s"])
        if jobs < 2 or elapsed_s <= 0:
            raise BenchError(f"the worker processed {jobs} job(s)")
        result.processed_per_s[str(concurrency)] = round((jobs - 1) / elapsed_s, 1)
        if answer.get("timed_out"):
            result.notes.append(
                f"concurrency {concurrency}: stopped after {plan.max_phase_s:.0f}s "
                f"({jobs} of {count} jobs)"
            )
        if concurrency == plan.rss_concurrency:
            rss = answer["rss_kb"]
            result.rss = Memory(
                jobs=jobs,
                start_kb=int(rss["start"]),
                warm_kb=int(rss["warm"]),
                end_kb=int(rss["end"]),
                peak_kb=int(answer.get("hwm_kb") or rss["end"]),
            )

    def _processed_by_processes(
        self, system: System, where: dict[str, Any], count: int, concurrency: int
    ) -> Data:
        """``corral worker --processes N``: N worker processes at ``concurrency`` each drain the
        queue together, each its share of ``count``; they start at the same clock time (after
        their imports), and the time is from the first job of any to the last job of any."""
        plan = self.plan
        start_at_us = now_us() + 3_000_000
        shares = [count // self.processes] * self.processes
        shares[0] += count - sum(shares)
        workers = [
            self.spawn(
                system,
                "work",
                **where,
                count=share,
                concurrency=concurrency,
                max_s=plan.max_phase_s,
                warm=min(plan.warm_jobs, share),
                start_at_us=start_at_us,
            )
            for share in shares
        ]
        try:
            answers = [worker.receive(plan.max_phase_s + 60) for worker in workers]
        finally:
            for worker in workers:
                worker.finish()
        for answer in answers:
            if not answer.get("ok"):
                return answer
        first_us = min(int(a["first_us"]) for a in answers)
        last_us = max(int(a["last_us"]) for a in answers)
        return {
            **answers[0],
            "jobs": sum(int(a["jobs"]) for a in answers),
            "timed_out": any(a.get("timed_out") for a in answers),
            "elapsed_s": (last_us - first_us) / 1e6,
        }

    def _flows(self, system: System, producer: _Child, result: SystemResult) -> None:
        plan = self.plan
        where = self.place(system, "flows")
        jobs = plan.flows * (plan.flow_children + 1)
        try:
            added = producer.call(
                {
                    "op": "flow",
                    **where,
                    "flows": plan.flows,
                    "children": plan.flow_children,
                },
                self._enqueue_timeout(jobs),
            )
            producer.call({"op": "close", **where}, 30)
            worker = self.spawn(
                system,
                "flow-work",
                **where,
                flows=plan.flows,
                count=plan.flow_children,
                concurrency=plan.flow_concurrency,
                max_s=plan.max_phase_s,
            )
            try:
                answer = worker.receive(plan.max_phase_s + 60)
            finally:
                worker.finish()
        finally:
            self.discard(system, where)
        if not answer.get("ok"):
            raise BenchError(str(answer.get("error")))
        children, elapsed_s = int(answer["children"]), float(answer["elapsed_s"])
        if answer.get("timed_out") or int(answer["parents"]) < plan.flows:
            raise BenchError(
                f"{answer['parents']} of {plan.flows} parents ran within {plan.max_phase_s:.0f}s "
                f"({children} children)"
            )
        result.flow_enqueue_per_s = round(int(added["jobs"]) / float(added["elapsed_s"]), 1)
        result.flow_children_per_s = round((children - 1) / elapsed_s, 1)
        result.flow_release = pickup_of([float(v) for v in answer["releases_ms"]])

    def _gap_s(self) -> float:
        low, high = self.plan.idle_gap_ms
        return random.uniform(low, high) / 1000

    def _enqueue_under_load(self, system: System, producer: _Child, result: SystemResult) -> None:
        """Enqueue one by one from several tasks while a worker process drains the queue, and
        measure the producer's event-loop lag meanwhile."""
        plan = self.plan
        count = plan.under_load_jobs
        where = self.place(system, "load")
        worker = self.spawn(
            system,
            "work",
            **where,
            count=count,
            concurrency=10,
            max_s=plan.max_phase_s,
            warm=min(plan.warm_jobs, count // 2),
        )
        try:
            answer = producer.call(
                {
                    "op": "enqueue_under_load",
                    **where,
                    "count": count,
                    "tasks": plan.under_load_tasks,
                },
                self._enqueue_timeout(count),
            )
            drained = worker.receive(plan.max_phase_s + 60)
        finally:
            worker.finish()
            with contextlib.suppress(BenchError):
                producer.call({"op": "close", **where}, 30)
            self.discard(system, where)
        if not drained.get("ok") or drained.get("timed_out"):
            result.notes.append(
                f"enqueue under load: the worker drained {drained.get('jobs')} jobs"
            )
        result.enqueue_under_load_per_s = round(count / float(answer["elapsed_s"]), 1)
        p50, p99, worst = (round(float(v), 2) for v in answer["lag_ms"])
        result.loop_lag = Pickup(int(answer["samples"]), p50, p99, worst)

    def _pickup(self, system: System, producer: _Child, result: SystemResult) -> None:
        plan = self.plan
        where = self.place(system, "idle")
        worker = self.spawn(system, "idle-worker", **where)
        latencies: list[float] = []
        try:
            ready = worker.receive(60)
            if not ready.get("ready"):
                raise BenchError(f"unexpected answer from the idle worker: {ready}")
            time.sleep(0.3)
            for index in range(plan.idle_samples + 1):
                time.sleep(self._gap_s())
                producer.call({"op": "probe", **where}, 30)
                answer = worker.receive(30)
                if index > 0:
                    latencies.append(int(answer["latency_us"]) / 1000)
        finally:
            worker.finish()
            with contextlib.suppress(BenchError):
                producer.call({"op": "close", **where}, 30)
            self.discard(system, where)
        result.pickup["cross_process"] = pickup_of(latencies)

    def _pickup_in_process(self, system: System, result: SystemResult) -> None:
        plan = self.plan
        where = self.place(system, "idle-in-process")
        low, high = plan.idle_gap_ms
        runner = self.spawn(
            system,
            "idle",
            **where,
            samples=plan.idle_in_process_samples,
            gap_min_ms=low,
            gap_max_ms=high,
        )
        try:
            answer = runner.receive(plan.max_phase_s + 60)
        finally:
            runner.finish()
            self.discard(system, where)
        if not answer.get("ok"):
            raise BenchError(str(answer.get("error")))
        result.pickup["in_process"] = pickup_of([float(v) for v in answer["latencies_ms"]])


# -- checks and the report ----------------------------------------------------------------------


def _fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _fmt_ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def available(results: dict[str, SystemResult], system: str) -> SystemResult | None:
    """The result of ``system`` if it was measured in this run."""
    found = results.get(system)
    return found if found is not None and found.available else None


def at_least(name: str, value: float | None, goal: float, unit: str) -> Check | None:
    """A target "``value`` >= ``goal``"; ``None`` without a value."""
    if value is None:
        return None
    return Check(name, f"{value:,.0f}{unit}", f">= {goal:,.0f}{unit}", value >= goal, {"": value})


def at_most_ms(name: str, value_ms: float, goal_ms: float) -> Check:
    """A target "``value_ms`` <= ``goal_ms``"."""
    return Check(
        name, f"{_fmt_ms(value_ms)} ms", f"<= {goal_ms:g} ms", value_ms <= goal_ms, {"": value_ms}
    )


def ratio(
    name: str, mine: dict[str, float], theirs: dict[str, float], goal: float | None
) -> Check | None:
    """``mine / theirs`` for each key both have (concurrency, or ``""`` for one figure): a
    target ">= ``goal``" for every ratio, or a reference without one; ``None`` without ratios."""
    ratios = {k: mine[k] / theirs[k] for k in mine if k in theirs and theirs[k] > 0}
    if not ratios:
        return None
    measured = " · ".join(
        (f"c={k} " if k else "") + _fmt_ratio(v) for k, v in sorted(ratios.items(), key=_key)
    )
    met = None if goal is None else all(v >= goal for v in ratios.values())
    target = "reference" if goal is None else f">= {goal:g}x"
    return Check(name, measured, target, met, {k: round(v, 3) for k, v in ratios.items()})


def one_figure(value: float | None) -> dict[str, float]:
    """A single figure in the form :func:`ratio` takes."""
    return {} if value is None else {"": value}


def of_limit(limits: dict[str, float], name: str, keys: Iterable[str] = ("",)) -> dict[str, float]:
    """The limit ``name`` under each of ``keys``, in the form :func:`ratio` takes."""
    value = limits.get(name)
    return {} if value is None else {key: value for key in keys}


def best_processed(result: SystemResult) -> tuple[str, dict[str, float]]:
    """The best processed rate of ``result`` (``c=N`` and the figure), for one ratio."""
    if not result.processed_per_s:
        return "", {}
    best_c, best = max(result.processed_per_s.items(), key=lambda kv: kv[1])
    return f" (best: c={best_c})", {"": best}


SQLITE_SHARE_GOALS = {"enqueue_one": 0.3, "enqueue_bulk": 0.12, "processed": 0.2}
"""corral on SQLite as a share of what raw SQLite does on the same machine in the same run:
enqueues one by one and processed jobs against inserts of one row per transaction, bulk
enqueues against inserts batched as the bulk phase batches. They are the former absolute
targets (15,000, 100,000 and 10,000 per second) over the limits measured on the 2-core machine
they were set on (about 50,000 inserts/s one per transaction, 800,000 batched)."""


def corral_checks(
    results: dict[str, SystemResult], limits: dict[str, float], processes: int = 1
) -> list[Check]:
    """corral's own targets and its shares of the machine's limits, from this run's figures.

    Throughput targets are ratios to what the hardware allows in the same run, so they hold
    on any machine; the idle pickup targets stay in milliseconds, since a setting
    (``poll_interval_s``) and a blocking pop bound them, not the hardware.
    """
    checks: list[Check | None] = []
    per_row = "raw SQLite inserts, one per transaction"
    sqlite = available(results, "corral-sqlite")
    if sqlite is not None:
        goals = SQLITE_SHARE_GOALS
        best_c, best = best_processed(sqlite)
        checks += [
            ratio(
                f"corral-sqlite enqueue one by one / {per_row}",
                one_figure(sqlite.enqueue_one_per_s),
                of_limit(limits, "sqlite_insert_autocommit_per_s"),
                goals["enqueue_one"],
            ),
            ratio(
                "corral-sqlite enqueue in bulk / raw SQLite inserts, batched",
                one_figure(sqlite.enqueue_bulk_per_s),
                of_limit(limits, "sqlite_insert_batched_per_s"),
                goals["enqueue_bulk"],
            ),
            ratio(
                f"corral-sqlite processed{best_c} / {per_row}",
                best,
                of_limit(limits, "sqlite_insert_autocommit_per_s"),
                goals["processed"],
            ),
        ]
        cross = sqlite.pickup.get("cross_process")
        if cross is not None:
            checks.append(
                at_most_ms("corral-sqlite idle pickup p99, across processes", cross.p99_ms, 50)
            )
    bullmq = available(results, "corral-bullmq")
    if bullmq is not None:
        best_c, best = best_processed(bullmq)
        checks += [
            ratio(
                "corral-bullmq enqueue one by one / Redis no-op Lua calls, one at a time",
                one_figure(bullmq.enqueue_one_per_s),
                of_limit(limits, "redis_lua_one_per_s"),
                None,
            ),
            ratio(
                f"corral-bullmq processed{best_c} / Redis no-op Lua calls, pipelined",
                best,
                of_limit(limits, "redis_lua_pipelined_per_s"),
                None,
            ),
        ]
        cross = bullmq.pickup.get("cross_process")
        if cross is not None:
            checks.append(
                at_most_ms("corral-bullmq idle pickup p99, across processes", cross.p99_ms, 10)
            )
    return [check for check in checks if check is not None]


CORRAL = Suite(
    systems={system.name: system for system in (CorralSystem("sqlite"), CorralSystem("bullmq"))},
    checks=corral_checks,
    packages=("redis", "hiredis", "bullmq"),
)
"""What ``corral bench`` measures: corral on each backend."""


def _key(item: tuple[str, float]) -> int:
    return int(item[0]) if item[0].isdigit() else 0


def figure_rows(results: dict[str, SystemResult], plan: Plan) -> list[tuple[str, list[str]]]:
    """The figures as (measurement, one cell per system) rows."""
    rss_jobs = plan.processed[plan.rss_concurrency]
    rows: list[tuple[str, Callable[[SystemResult], str]]] = [
        ("enqueue 1 by 1 /s", lambda r: _fmt_rate(r.enqueue_one_per_s)),
        (f"enqueue bulk /s (x{plan.bulk_batch})", lambda r: _fmt_rate(r.enqueue_bulk_per_s)),
    ]
    for c in plan.processed:
        rows.append((f"processed /s c={c}", functools.partial(_fmt_processed, c)))
    rows.append(
        (
            f"enqueue 1 by 1 /s, {plan.under_load_tasks} tasks, worker draining",
            lambda r: _fmt_rate(r.enqueue_under_load_per_s),
        )
    )
    rows.append(
        (
            "producer loop lag p99 / max ms",
            lambda r: (
                f"{_fmt_ms(r.loop_lag.p99_ms)} / {_fmt_ms(r.loop_lag.max_ms)}"
                if r.loop_lag
                else "—"
            ),
        )
    )
    for kind, where in (("cross_process", "x-process"), ("in_process", "in-process")):
        rows.append((f"pickup p50 ms {where}", functools.partial(_fmt_pickup, kind, "p50")))
        rows.append((f"pickup p99 ms {where}", functools.partial(_fmt_pickup, kind, "p99")))
    rows.append(("worker RSS MB warm", lambda r: _fmt_mb(r.rss.warm_kb if r.rss else None)))
    rows.append(
        (f"worker RSS MB {rss_jobs:,} jobs", lambda r: _fmt_mb(r.rss.end_kb if r.rss else None))
    )
    shape = f"{plan.flows} flows of {plan.flow_children:,}"
    rows.append((f"flow enqueue jobs /s ({shape})", lambda r: _fmt_rate(r.flow_enqueue_per_s)))
    rows.append(
        (f"flow children /s c={plan.flow_concurrency}", lambda r: _fmt_rate(r.flow_children_per_s))
    )
    rows.append(("flow parent release p50 ms", functools.partial(_fmt_release, "p50")))
    rows.append(("flow parent release max ms", functools.partial(_fmt_release, "max")))
    return [
        (title, [cell(r) if r.available else "not installed" for r in results.values()])
        for title, cell in rows
    ]


def results_table(results: dict[str, SystemResult], plan: Plan) -> Table:
    """The figures: one column per system, one row per measurement."""
    table = Table(title=f"corral bench ({plan.mode} run)", title_justify="left")
    table.add_column("")
    for system in results:
        table.add_column(system, justify="right")
    for title, cells in figure_rows(results, plan):
        table.add_row(title, *cells)
    return table


def _packages_text(machine: dict[str, Any]) -> str:
    packages = machine.get("packages") or {}
    found = [f"{name} {version}" for name, version in packages.items() if version]
    return f" ({', '.join(found)})" if found else ""


def _revision_text(report: dict[str, Any]) -> str:
    corral = report.get("corral") or {}
    text = f"corral {corral.get('version', '?')}"
    if corral.get("commit"):
        text += f" at {corral['commit']}" + (
            " with uncommitted edits in src" if corral["dirty"] else ""
        )
    return text


def markdown_report(report: dict[str, Any]) -> str:
    """The tables of a report as Markdown (the form docs/performance.md keeps them in)."""
    results, plan = report_from_json(report)
    machine = report["machine"]
    load = machine["load_avg_1m"]
    processes = int(report["plan"].get("worker_processes", 1))
    how = f" with {processes} worker processes per corral system" if processes > 1 else ""
    node = f", Node {machine['node']}" if machine.get("node") else ""
    lines = [
        f"{report['date']}, {report['mode']} run{how} of {_revision_text(report)}, "
        f"{machine['cpus']} cores ({machine['cpu']}), "
        f"{machine['os']}, Python {machine['python']}, SQLite {machine['sqlite']}, "
        f"Redis {machine['redis'] or '-'}{node}{_packages_text(machine)}; "
        f"load average {load['before']} before, {load['after']} after; {report['duration_s']}s.",
        "",
        "| | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    lines.append(
        "| version | "
        + " | ".join(
            (r.version or r.reason or "") if r.available else "not installed"
            for r in results.values()
        )
        + " |"
    )
    for title, cells in figure_rows(results, plan):
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    limits = report.get("limits") or {}
    if limits:
        lines += ["", "| the machine's limits (this run) | per second |", "|---|---:|"]
        lines += [f"| {LIMIT_LABELS.get(k, k)} | {_fmt_rate(v)} |" for k, v in limits.items()]
    checks = [Check(**raw) for raw in report["checks"]]
    if checks:
        lines += ["", "| check | measured | target | |", "|---|---:|---:|:---:|"]
        for check in checks:
            mark = "" if check.met is None else ("ok" if check.met else "**no**")
            lines.append(f"| {check.check} | {check.measured} | {check.target} | {mark} |")
    return "\n".join(lines) + "\n"


def _fmt_processed(concurrency: int, result: SystemResult) -> str:
    return _fmt_rate(result.processed_per_s.get(str(concurrency)))


def _fmt_pickup(kind: str, which: str, result: SystemResult) -> str:
    found = result.pickup.get(kind)
    if found is None:
        return "—"
    return _fmt_ms(found.p50_ms if which == "p50" else found.p99_ms)


def _fmt_release(which: str, result: SystemResult) -> str:
    found = result.flow_release
    if found is None:
        return "—"
    return _fmt_ms(found.p50_ms if which == "p50" else found.max_ms)


def _fmt_mb(kb: int | None) -> str:
    return "—" if kb is None else f"{kb / 1024:.1f}"


def limits_table(limits: dict[str, float]) -> Table:
    """What the machine allows, measured in the same run."""
    table = Table(title="the machine's limits (this run)", title_justify="left")
    table.add_column("")
    table.add_column("per second", justify="right")
    for name, value in limits.items():
        table.add_row(LIMIT_LABELS.get(name, name), _fmt_rate(value))
    return table


def checks_table(checks: Sequence[Check]) -> Table:
    """Targets and ratios."""
    table = Table(title="targets and ratios (this run)", title_justify="left")
    table.add_column("check")
    table.add_column("measured", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="center")
    for check in checks:
        mark = "" if check.met is None else ("[green]ok[/green]" if check.met else "[red]no[/red]")
        table.add_row(check.check, check.measured, check.target, mark)
    return table


def machine_info(env: Environment, packages: Sequence[str]) -> dict[str, Any]:
    """What the figures were measured on; ``packages``: the Python packages to name."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "redis": env.redis_version,
        "node": None,
        "packages": {name: package_version(name) for name in packages},
    }


def source_revision() -> dict[str, Any]:
    """corral's version and, when it runs from a git checkout, the commit and whether the
    package's files have uncommitted edits."""
    found: dict[str, Any] = {"version": __version__, "commit": None, "dirty": None}
    git = shutil.which("git")
    package = Path(corral.__file__).resolve().parent
    if git is None:
        return found

    def ask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [git, "-C", str(package), *args], capture_output=True, text=True, timeout=10
        )

    try:
        # Installed inside some other repository (a venv in a checkout) is not a checkout.
        tracked = ask("ls-files", "--error-unmatch", "--", "__init__.py")
        if tracked.returncode != 0:
            return found
        head = ask("rev-parse", "--short=12", "HEAD")
        status = ask("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return found
    if head.returncode == 0:
        found["commit"] = head.stdout.strip()
        found["dirty"] = bool(status.stdout.strip())
    return found


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_bench(
    suite: Suite,
    *,
    quick: bool = False,
    systems: Sequence[str] | None = None,
    redis_url: str | None = None,
    console: Console | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """Run the benchmark of ``suite``'s ``systems`` (all by default) and return the report (what
    ``--json`` writes). ``processes``: worker processes of the systems that have them
    (corral's) in the processed phases, as ``corral worker --processes`` runs them."""
    plan = QUICK if quick else FULL
    chosen = [suite.systems[name] for name in suite.parse_systems(systems)]
    console = console or Console(stderr=True)
    url = redis_url or DEFAULT_REDIS_URL
    started_at = datetime.now(UTC)
    began = time.monotonic()
    redis_version = redis_error = None
    started_redis = False
    if any(system.uses_redis for system in chosen):
        redis_version, redis_error, started_redis = ensure_redis(url)
    env = Environment(redis_url=url, redis_version=redis_version, redis_error=redis_error)
    # Before the run: the load average says whether the machine was idle.
    machine = machine_info(env, suite.packages)
    for system in chosen:
        machine.update(system.runtimes())
    revision = source_revision()
    results: dict[str, SystemResult] = {}
    runnable: list[tuple[System, str]] = []
    for system in chosen:
        version: str | None
        reason: str | None
        if system.uses_redis and redis_error:
            version, reason = None, redis_error
        else:
            version, reason = system.availability(env)
        if version is None:
            results[system.name] = SystemResult(system.name, system.label, False, reason=reason)
        else:
            runnable.append((system, version))
            results[system.name] = SystemResult(system.name, system.label, True, version=version)
    steps = sum(5 + len(plan.processed) + int(system.flows) for system, _ in runnable)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    try:
        with _workdir() as workdir, progress:
            task = progress.add_task("starting", total=steps)
            progress.update(task, description="measuring the machine's limits")
            limits, limit_errors = measure_limits(
                workdir,
                redis_url=url if redis_version is not None else None,
                batch=plan.bulk_batch,
                duration_s=plan.limit_s,
            )
            bench = Bench(plan, env, workdir, progress, processes)
            try:
                for system, version in runnable:
                    results[system.name] = bench.run_system(system, version, task)
            finally:
                bench.close()
    finally:
        if started_redis:
            with contextlib.suppress(Exception):
                _redis_client(url).shutdown(nosave=True)
    checks = suite.checks(results, limits, processes)
    load_before = machine["load_avg_1m"]
    machine["load_avg_1m"] = {"before": load_before, "after": round(os.getloadavg()[0], 2)}
    return {
        "schema": SCHEMA,
        "mode": plan.mode,
        "corral": revision,
        "date": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - began, 1),
        "machine": machine,
        "plan": {
            "enqueue_one": plan.enqueue_one,
            "enqueue_bulk": plan.enqueue_bulk,
            "bulk_batch": plan.bulk_batch,
            "processed": {str(c): n for c, n in plan.processed.items()},
            "rss_concurrency": plan.rss_concurrency,
            "warm_jobs": plan.warm_jobs,
            "idle_samples": plan.idle_samples,
            "idle_in_process_samples": plan.idle_in_process_samples,
            "idle_gap_ms": list(plan.idle_gap_ms),
            "max_phase_s": plan.max_phase_s,
            "worker_processes": processes,
            "flows": plan.flows,
            "flow_children": plan.flow_children,
            "flow_concurrency": plan.flow_concurrency,
        },
        "limits": limits,
        "limit_errors": limit_errors,
        "systems": {name: asdict(result) for name, result in results.items()},
        "checks": [asdict(check) for check in checks],
    }


def report_from_json(report: dict[str, Any]) -> tuple[dict[str, SystemResult], Plan]:
    """The results and plan of a report (to print a table of a saved run)."""
    plan = QUICK if report.get("mode") == "quick" else FULL
    results: dict[str, SystemResult] = {}
    for name, raw in report["systems"].items():
        values = dict(raw)
        values["pickup"] = {k: Pickup(**v) for k, v in (values.get("pickup") or {}).items()}
        values["rss"] = Memory(**values["rss"]) if values.get("rss") else None
        values["loop_lag"] = Pickup(**values["loop_lag"]) if values.get("loop_lag") else None
        release = values.get("flow_release")
        values["flow_release"] = Pickup(**release) if release else None
        results[name] = SystemResult(**values)
    return results, plan


def print_report(report: dict[str, Any], console: Console) -> None:
    """The tables of a report, with the errors and notes under them."""
    results, plan = report_from_json(report)
    machine = report["machine"]
    load = machine["load_avg_1m"]
    node = f"Node {machine['node']} · " if machine.get("node") else ""
    console.print(
        f"{report['date']} · {_revision_text(report)} · {machine['cpus']} cores "
        f"({machine['cpu']}) · Python "
        f"{machine['python']} · SQLite {machine['sqlite']} · Redis {machine['redis'] or '—'} · "
        f"{node}{report['duration_s']}s · load average "
        f"{load['before']} before, {load['after']} after",
        markup=False,
        highlight=False,
    )
    if isinstance(load["before"], float | int) and load["before"] > BUSY_LOAD:
        console.print(
            f"note: the machine was busy before the run (load average {load['before']}); "
            "figures from a busy machine do not compare with others",
            markup=False,
            highlight=False,
        )
    console.print(results_table(results, plan))
    limits = report.get("limits") or {}
    if limits:
        console.print(limits_table(limits))
    for line in report.get("limit_errors") or ():
        console.print(f"[red]limits[/red]: {line}", highlight=False)
    checks = [Check(**raw) for raw in report["checks"]]
    if checks:
        console.print(checks_table(checks))
    for result in results.values():
        if not result.available:
            console.print(f"{result.system}: {result.reason}", markup=False, highlight=False)
        for line in result.errors:
            console.print(f"[red]{result.system}[/red]: {line}", highlight=False)
        for line in result.notes:
            console.print(f"{result.system}: {line}", markup=False, highlight=False)


def check_loopback(url: str) -> str:
    """``url`` if it names a Redis on this machine; a benchmark floods the Redis it is given."""
    if not is_loopback_url(url):
        raise ConfigError(
            f"corral bench only uses a Redis on this machine (127.0.0.1, ::1, localhost), "
            f"not {redact_url(url)}; pass --redis-url redis://127.0.0.1:6379/0"
        )
    return url


def bench_and_report(
    suite: Suite,
    *,
    quick: bool,
    systems: Sequence[str] | None,
    redis_url: str,
    processes: int,
    json_path: Path | None,
    markdown_path: Path | None,
) -> bool:
    """Run the benchmark, print its tables on stdout and write the files asked for; ``False``
    if a phase failed. Raises ConfigError for an unknown system or a Redis elsewhere."""
    chosen = suite.parse_systems(systems)
    if any(suite.systems[name].uses_redis for name in chosen):
        check_loopback(redis_url)
    report = run_bench(suite, quick=quick, systems=chosen, redis_url=redis_url, processes=processes)
    print_report(report, Console(highlight=False))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown_report(report), encoding="utf-8")
    return not any(raw["errors"] for raw in report["systems"].values())


def bench_command(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="A smoke run: small counts, done in seconds")
    ] = False,
    systems: Annotated[
        list[str] | None,
        typer.Option(
            "--systems",
            "-s",
            metavar="NAMES",
            help="Only these (comma-separated or repeated): "
            "corral-sqlite, corral-bullmq [default: both]",
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", metavar="PATH", help="Also write the results as JSON to this file"),
    ] = None,
    markdown_path: Annotated[
        Path | None,
        typer.Option(
            "--markdown", metavar="PATH", help="Also write the tables as Markdown to this file"
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            metavar="URL",
            help="A Redis on 127.0.0.1 [default: global --redis-url, env, 127.0.0.1:6379]",
        ),
    ] = None,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=1,
            help="Worker processes in the processed phases, as "
            "`corral worker --processes N` runs them",
        ),
    ] = 1,
) -> None:
    """Load-test corral on SQLite and on BullMQ: enqueue and job rates, pickup, memory."""
    with corral_errors():
        ok = bench_and_report(
            CORRAL,
            quick=quick,
            systems=systems,
            redis_url=redis_url or cli_state(ctx).redis_url(),
            processes=processes,
            json_path=json_path,
            markdown_path=markdown_path,
        )
    if not ok:
        raise typer.Exit(1)

