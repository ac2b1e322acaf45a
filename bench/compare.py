"""corral side by side with the queues it is measured against, in one run.

    python bench/compare.py [--quick] [--systems NAMES] [--json PATH] [--markdown PATH]
                            [--redis-url URL] [--processes N]

``make bench`` (``make bench-quick``) installs what this compares and runs it: the Python
packages of ``bench/requirements.txt`` and the npm packages of ``bench/node`` (``npm ci``).

This is ``corral bench`` (:mod:`corral.tools.bench`: its plans, runner processes, phases, report
and schema) with three more systems:

- ``bullmq-py``: the ``bullmq`` Python package's own ``Queue`` and ``Worker``;
- ``bullmq-node``: BullMQ on Node.js, run by ``bench/node/bullmq-bench.mjs`` with the
  ``bullmq`` of ``bench/node/package-lock.json``;
- ``huey-sqlite``: Huey's ``SqliteHuey`` with a thread consumer;

and the ratios between corral and them. The Python peers' runner processes are
``python bench/compare.py runner SYSTEM ROLE [options]``, as corral's are
``python -m corral.tools.bench SYSTEM ROLE``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corral.errors import ConfigError
from corral.tools.bench import (
    CORRAL,
    DEFAULT_REDIS_URL,
    JOB_NAME,
    Check,
    Client,
    ClientFactory,
    Data,
    Environment,
    OnJob,
    Suite,
    System,
    SystemResult,
    available,
    bench_and_report,
    corral_checks,
    one_figure,
    package_version,
    ratio,
    runner_main,
)

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
NODE_SCRIPT = NODE_DIR / "bullmq-bench.mjs"
INSTALL = "make bench (or pip install -r bench/requirements.txt)"
EXIT_ERROR = 1
EXIT_USAGE = 2


# -- the Python peers' clients (in the runner processes) ----------------------------------------


class BullmqPyClient(Client):
    """The ``bullmq`` Python package's own Queue and Worker."""

    def __init__(self, queue_name: str, path: str | None, redis_url: str) -> None:
        super().__init__(queue_name, path, redis_url)
        self.bullmq: Any = importlib.import_module("bullmq")
        self.queue: Any = None

    async def open(self) -> None:
        self.queue = self.bullmq.Queue(self.queue_name, {"connection": self.redis_url})
        await self.queue.getJobCounts("waiting")

    async def enqueue_one(self, data: Data) -> None:
        await self.queue.add(JOB_NAME, data)

    async def enqueue_bulk(self, items: list[Data]) -> None:
        await self.queue.addBulk([{"name": JOB_NAME, "data": data} for data in items])

    async def work(self, concurrency: int, on_job: OnJob, stop: asyncio.Event) -> None:
        async def noop(job: Any, token: str) -> None:
            on_job(job.data)

        worker = self.bullmq.Worker(
            self.queue_name, noop, {"connection": self.redis_url, "concurrency": concurrency}
        )
        await stop.wait()
        await worker.close()

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.close()


class HueyClient(Client):
    """Huey's SqliteHuey with a thread-pool consumer (Huey has no asyncio API)."""

    def __init__(self, queue_name: str, path: str | None, redis_url: str) -> None:
        super().__init__(queue_name, path, redis_url)
        huey: Any = importlib.import_module("huey")
        self.huey: Any = huey.SqliteHuey(name=queue_name, filename=path or "huey-bench.db")
        self._on_job: OnJob | None = None

        def noop(data: Data) -> None:
            if self._on_job is not None:
                self._on_job(data)

        self.task: Any = self.huey.task(name=JOB_NAME)(noop)

    async def open(self) -> None:
        self.huey.storage.queue_size()

    async def enqueue_one(self, data: Data) -> None:
        self.task(data)

    async def prefill(self, items: list[Data]) -> None:
        # No bulk API: write Huey's own messages in one transaction (this is untimed setup).
        storage = self.huey.storage
        rows = [
            (storage.name, memoryview(self.huey.serialize_task(self.task.s(data))), 0)
            for data in items
        ]
        with storage.db(commit=True) as cursor:
            cursor.executemany("INSERT INTO task (queue, data, priority) VALUES (?, ?, ?)", rows)

    async def work(self, concurrency: int, on_job: OnJob, stop: asyncio.Event) -> None:
        self._on_job = on_job
        consumer = self.huey.create_consumer(
            workers=concurrency, worker_type="thread", periodic=False, check_worker_health=False
        )
        consumer.start()
        await stop.wait()
        await asyncio.to_thread(consumer.stop, graceful=True)

    async def close(self) -> None:
        self.huey.storage.close()


PEER_CLIENTS: dict[str, ClientFactory] = {"bullmq-py": BullmqPyClient, "huey-sqlite": HueyClient}


# -- the peer systems (in the orchestrator) ------------------------------------------------------


class PythonPeer(System):
    """A peer with a Python client, run by ``python bench/compare.py runner``."""

    def __init__(self, name: str, label: str, package: str, *, uses_redis: bool) -> None:
        super().__init__(name, label)
        self.package = package
        self.uses_redis = uses_redis

    def availability(self, env: Environment) -> tuple[str | None, str | None]:
        version = package_version(self.package)
        if version is None or importlib.util.find_spec(self.package) is None:
            return None, f"not installed: {INSTALL}"
        where = (
            f"Redis {env.redis_version}" if self.uses_redis else f"SQLite {sqlite3.sqlite_version}"
        )
        return f"{self.package} {version}, {where}", None

    def runner(self, role: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "runner", self.name, role]


class NodeBullmq(System):
    """BullMQ on Node.js, with the ``bullmq`` npm package installed in ``bench/node``."""

    uses_redis = True

    def __init__(self) -> None:
        super().__init__("bullmq-node", "BullMQ on Node.js")
        self.node = shutil.which("node")

    def runtimes(self) -> dict[str, str | None]:
        return {"node": self.node_version()}

    def node_version(self) -> str | None:
        if self.node is None:
            return None
        try:
            done = subprocess.run(
                [self.node, "--version"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() or None

    def bullmq_version(self) -> str | None:
        try:
            package = json.loads(
                (NODE_DIR / "node_modules" / "bullmq" / "package.json").read_text()
            )
        except (OSError, ValueError):
            return None
        version = package.get("version")
        return str(version) if version else None

    def availability(self, env: Environment) -> tuple[str | None, str | None]:
        node = self.node_version()
        if node is None:
            return None, "not installed: no `node` on PATH"
        bullmq = self.bullmq_version()
        if bullmq is None:
            return None, "not installed: make bench (or npm ci in bench/node)"
        return f"bullmq {bullmq}, Node {node}, Redis {env.redis_version}", None

    def runner(self, role: str) -> list[str]:
        assert self.node is not None  # availability said so
        return [self.node, str(NODE_SCRIPT), role, "--modules", str(NODE_DIR)]


NODE_GOAL = 1.0
"""corral-bullmq against BullMQ on Node.js, processed and enqueued one by one, in one process."""
NODE_GOAL_PROCESSES = 1.2
"""The same with ``--processes 2`` or more (at c=10 and c=50)."""


def peer_checks(results: dict[str, SystemResult], processes: int = 1) -> list[Check]:
    """The ratios between corral and its peers (targets where the team set one)."""
    checks: list[Check | None] = []
    sqlite, huey = available(results, "corral-sqlite"), available(results, "huey-sqlite")
    if sqlite is not None and huey is not None:
        checks += [
            ratio(
                "corral-sqlite / huey-sqlite enqueue one by one",
                one_figure(sqlite.enqueue_one_per_s),
                one_figure(huey.enqueue_one_per_s),
                None,
            ),
            ratio(
                "corral-sqlite / huey-sqlite processed",
                sqlite.processed_per_s,
                huey.processed_per_s,
                None,
            ),
        ]
    mine = available(results, "corral-bullmq")
    py, node = available(results, "bullmq-py"), available(results, "bullmq-node")
    if mine is not None and py is not None:
        checks.append(
            ratio(
                "corral-bullmq / bullmq-py processed", mine.processed_per_s, py.processed_per_s, 2.5
            )
        )
    if mine is not None and node is not None:
        processed = mine.processed_per_s
        goal = NODE_GOAL
        if processes > 1:  # several worker processes against one Node process: c=10 and c=50
            processed = {c: v for c, v in processed.items() if c != "1"}
            goal = NODE_GOAL_PROCESSES
        checks += [
            ratio(
                "corral-bullmq / bullmq-node processed",
                processed,
                node.processed_per_s,
                goal,
            ),
            ratio(
                "corral-bullmq / bullmq-node enqueue one by one",
                one_figure(mine.enqueue_one_per_s),
                one_figure(node.enqueue_one_per_s),
                NODE_GOAL,
            ),
            ratio(
                "corral-bullmq / bullmq-node enqueue in bulk",
                one_figure(mine.enqueue_bulk_per_s),
                one_figure(node.enqueue_bulk_per_s),
                None,
            ),
        ]
    if py is not None and node is not None:
        checks.append(
            ratio(
                "bullmq-py / bullmq-node processed", py.processed_per_s, node.processed_per_s, None
            )
        )
    return [check for check in checks if check is not None]


def all_checks(
    results: dict[str, SystemResult], limits: dict[str, float], processes: int = 1
) -> list[Check]:
    """corral's own targets and shares of the machine's limits, then the ratios to its peers."""
    return corral_checks(results, limits, processes) + peer_checks(results, processes)


COMPARE = Suite(
    systems={
        **CORRAL.systems,
        "bullmq-py": PythonPeer(
            "bullmq-py", "bullmq (Python) Queue/Worker", "bullmq", uses_redis=True
        ),
        "bullmq-node": NodeBullmq(),
        "huey-sqlite": PythonPeer("huey-sqlite", "Huey SqliteHuey", "huey", uses_redis=False),
    },
    checks=all_checks,
    packages=(*CORRAL.packages, "huey"),
)


# -- the command ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/compare.py",
        description="Benchmark corral on SQLite and BullMQ against the bullmq package's Worker, "
        "Node.js BullMQ and Huey (make bench installs them).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: small counts, done in seconds"
    )
    parser.add_argument(
        "--systems",
        "-s",
        action="append",
        metavar="NAMES",
        help=f"only these (comma-separated or repeated): {', '.join(COMPARE.systems)} "
        "[default: all]",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write the results as JSON to this file"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="PATH",
        help="also write the tables as Markdown to this file",
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        default=DEFAULT_REDIS_URL,
        help="a Redis on 127.0.0.1 [default: %(default)s]",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="worker processes of corral's systems in the processed phases, as "
        "`corral worker --processes N` runs them (the others keep one)",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be 1 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison (or, with ``runner`` first, one runner process); the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["runner"]:
        runner_main(arguments[1:], PEER_CLIENTS, prog="python bench/compare.py runner")
        return 0
    args = parse_args(arguments)
    try:
        ok = bench_and_report(
            COMPARE,
            quick=args.quick,
            systems=args.systems,
            redis_url=args.redis_url,
            processes=args.processes,
            json_path=args.json,
            markdown_path=args.markdown,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if ok else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
