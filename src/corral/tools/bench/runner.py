"""The runner side of ``corral bench``: ``python -m corral.tools.bench SYSTEM ROLE`` runs one
system's producer or worker in its own process and answers the orchestrator with JSON lines.

Roles: ``producer`` (answers ``enqueue``, ``enqueue_under_load``, ``flow``, ``probe`` and
``close`` commands on stdin), ``work`` (drains prefilled jobs), ``flow-work`` (runs prefilled
flows), ``idle-worker`` (one line per job, for the idle pickup across processes) and ``idle``
(producer and worker in one process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from corral.errors import BenchError, Unsupported
from corral.flows import FlowJob
from corral.message import QueueMessage
from corral.service import QueueService
from corral.settings import QueueSettings
from corral.tools.bench.model import (
    DEFAULT_REDIS_URL,
    FLOW_CHILD,
    FLOW_PARENT,
    JOB_NAME,
    RUNNER_MODULE,
    Data,
    OnJob,
    now_us,
    percentile,
)


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
