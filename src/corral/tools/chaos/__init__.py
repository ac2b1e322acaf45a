"""Fault injection: run real workers, SIGKILL them at random, and check that no job was lost.

``corral chaos`` (or :func:`run_chaos`) starts ``workers`` worker processes
(``python -m corral.worker corral.tools._chaos_tasks``) on a fresh queue and, once they are all
up, enqueues ``jobs`` jobs
spread over ``duration_s`` while it kills a random worker with SIGKILL every ``kill_every_s`` and
starts a new one in its place, then lets the queue drain (within ``drain_timeout_s``) and checks
the outcome the way Jepsen's total-queue checker does, against two records:

- the queue's own state: which jobs it says are completed, failed, still active;
- a ledger outside the queue: an append-only file in which the handler writes a ``start`` line
  before its work and a ``done`` line after it (see :mod:`corral.tools._chaos_tasks`).

A job is *lost* if it was enqueued and is not completed at the end; *duplicated* if the ledger
shows it done more than once. At-least-once delivery allows duplicates only for jobs a kill
caught in flight (started and not yet settled), so the run passes when nothing is lost, nothing
is stuck active, and the extra completions do not outnumber the jobs in flight at the kills.

The run is bounded in time and size and only talks to 127.0.0.1: it is a test tool, not
something to point at a production Redis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from corral._cliutil import cli_state, corral_errors
from corral.errors import ConfigError
from corral.message import JobState
from corral.service import QueueService
from corral.settings import QueueSettings, is_loopback_url, redact_url

logger = logging.getLogger("corral.chaos")

JOB_NAME = "corral.chaos"
TASK_MODULE = "corral.tools._chaos_tasks"

MAX_JOBS = 1_000_000
MAX_WORKERS = 64
MAX_CONCURRENCY = 1_000
MAX_DURATION_S = 3_600.0
MIN_KILL_EVERY_S = 0.1
WARM_UP_LIMIT_S = 60.0  # how long the run waits for its workers to be up
ENQUEUE_TICK_S = 0.1
SAMPLE_SIZE = 10
EXIT_VIOLATION = 1


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """What to run: the queue, the workers, the faults and the bounds."""

    backend: str = "sqlite"
    jobs: int = 10_000
    workers: int = 4
    concurrency: int = 16
    """Jobs each worker process runs at once."""
    kill_every_s: float = 2.0
    duration_s: float = 60.0
    """How long jobs keep arriving and workers keep being killed."""
    job_ms: int = 500
    """Each job works for a random time from 0 to this many milliseconds."""
    lease_s: float = 2.0
    """Short, so the jobs of a killed worker come back quickly."""
    max_stalls: int = 1_000
    """High, so a job caught by several kills is delivered again rather than failed."""
    shutdown_grace_s: float = 5.0
    drain_timeout_s: float = 120.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    workdir: Path | None = None
    """Where the ledger, the SQLite file and the worker logs go; kept. ``None``: a temporary
    directory, removed at the end unless ``keep``."""
    keep: bool = False
    """Keep the work directory and the Redis keys of the queue after the run."""
    seed: int | None = None

    def validate(self) -> None:
        """Raise ConfigError, naming the option, for a value the harness will not run with."""
        if self.backend not in ("sqlite", "bullmq"):
            raise ConfigError(f"--backend must be 'sqlite' or 'bullmq', got {self.backend!r}")
        _check_range("--jobs", self.jobs, 1, MAX_JOBS)
        _check_range("--workers", self.workers, 1, MAX_WORKERS)
        _check_range("--concurrency", self.concurrency, 1, MAX_CONCURRENCY)
        _check_range("--kill-every-s", self.kill_every_s, MIN_KILL_EVERY_S, MAX_DURATION_S)
        _check_range("--duration-s", self.duration_s, 0.0, MAX_DURATION_S)
        _check_range("--job-ms", self.job_ms, 0, 600_000)
        _check_range("--lease-s", self.lease_s, 0.1, 600.0)
        _check_range("--max-stalls", self.max_stalls, 0, 1_000_000)
        _check_range("--shutdown-grace-s", self.shutdown_grace_s, 0.0, 600.0)
        _check_range("--drain-timeout-s", self.drain_timeout_s, 1.0, MAX_DURATION_S)
        if self.backend == "bullmq":
            check_local_redis(self.redis_url)


def _check_range(option: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, int | float) and math.isfinite(value) and low <= value <= high
    ):
        raise ConfigError(f"{option} must be from {low:g} to {high:g}, got {value!r}")


def check_local_redis(url: str) -> None:
    """Refuse a Redis that is not on this machine: the harness floods and deletes its queue."""
    if not is_loopback_url(url):
        raise ConfigError(
            f"corral chaos only runs against a Redis on this machine (127.0.0.1), not "
            f"{redact_url(url)}; start one with: redis-server --port 6379"
        )


# -- the report --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kill:
    """One SIGKILL: when, which worker process, how many of its jobs were in flight."""

    at_s: float
    pid: int
    in_flight: int


@dataclass(slots=True)
class ChaosReport:
    """The checker's verdict, in the terms of Jepsen's total-queue checker."""

    backend: str
    enqueued: int
    completed: int
    """Jobs the queue says are completed."""
    executed: int
    """Distinct jobs the ledger shows done at least once."""
    executions: int
    """``done`` lines in the ledger."""
    lost: int
    """Enqueued and not completed at the end."""
    duplicated: int
    """Jobs done more than once per the ledger."""
    extra_completions: int
    """Completions beyond the first, summed over the duplicated jobs."""
    extra_after_kills: int
    """Extra completions whose earlier run was on a worker that was then killed (or crashed);
    the others come from leases lost by live workers (a lease too short for the load)."""
    stuck_active: int
    failed: int
    unexpected: int
    """Job ids in the ledger that were never enqueued."""
    completed_not_executed: int
    """Jobs the queue says are completed that the ledger never saw done."""
    kills: list[Kill]
    worker_crashes: int
    """Worker processes that died without being killed by the harness."""
    in_flight_at_kills: int
    duration_s: float
    drained: bool
    samples: dict[str, list[str]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def violations(self) -> list[str]:
        """What broke the guarantees; empty when the run passed."""
        found = []
        if self.lost:
            found.append(f"{self.lost} job(s) lost")
        if self.stuck_active:
            found.append(f"{self.stuck_active} job(s) stuck active")
        if self.extra_completions > self.in_flight_at_kills:
            found.append(
                f"{self.extra_completions} extra completion(s), more than the "
                f"{self.in_flight_at_kills} job(s) in flight at the kills"
            )
        if self.unexpected:
            found.append(f"{self.unexpected} job(s) in the ledger were never enqueued")
        if self.completed_not_executed:
            found.append(f"{self.completed_not_executed} completed job(s) never ran")
        if self.worker_crashes:
            found.append(f"{self.worker_crashes} worker process(es) died on their own")
        return found

    @property
    def ok(self) -> bool:
        """No lost or stuck job, no unexplained duplicate, no phantom job."""
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON (``corral chaos --json``)."""
        body = asdict(self)
        body["kills"] = len(self.kills)
        body["kill_log"] = [asdict(kill) for kill in self.kills]
        body["ok"] = self.ok
        body["violations"] = self.violations
        return body


# -- the ledger --------------------------------------------------------------------------------


class Ledger:
    """Follows the ledger file as the workers append to it."""

    def __init__(self, path: Path, *, recent_window_s: float) -> None:
        self.path = path
        self.starts: collections.Counter[str] = collections.Counter()
        self.dones: collections.Counter[str] = collections.Counter()
        self.malformed = 0
        self._offset = 0
        self._partial = b""
        self._running: dict[int, collections.Counter[str]] = {}
        self._recent_done: dict[int, collections.deque[tuple[int, str]]] = {}
        self.window_ns = int(recent_window_s * 1e9)

    def poll(self) -> None:
        """Read the lines appended since the last call."""
        with open(self.path, "rb") as ledger:
            ledger.seek(self._offset)
            chunk = ledger.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            self._add(raw)

    def _add(self, raw: bytes) -> None:
        parts = raw.decode("utf-8", "replace").split()
        if len(parts) != 5 or parts[0] not in ("start", "done"):
            self.malformed += 1
            return
        event, job_id, _attempt, pid_text, ns_text = parts
        try:
            pid, at_ns = int(pid_text), int(ns_text)
        except ValueError:
            self.malformed += 1
            return
        running = self._running.setdefault(pid, collections.Counter())
        if event == "start":
            self.starts[job_id] += 1
            running[job_id] += 1
            return
        self.dones[job_id] += 1
        running[job_id] -= 1
        if running[job_id] <= 0:
            del running[job_id]
        recent = self._recent_done.setdefault(pid, collections.deque())
        recent.append((at_ns, job_id))
        while recent and recent[0][0] < at_ns - self.window_ns:
            recent.popleft()

    def running(self, pid: int) -> set[str]:
        """Jobs ``pid`` started and has not finished, per the lines read so far."""
        return set(self._running.get(pid, ()))

    def recently_done(self, pid: int, since_ns: int) -> set[str]:
        """Jobs ``pid`` finished at or after ``since_ns`` (within the recent window)."""
        return {job for at_ns, job in self._recent_done.get(pid, ()) if at_ns >= since_ns}

    def done_pids(self, jobs: set[str]) -> dict[str, list[int]]:
        """The pids that finished each of ``jobs``, in ledger order (re-reads the file)."""
        found: dict[str, list[int]] = {job: [] for job in jobs}
        with open(self.path, "rb") as ledger:
            for raw in ledger:
                parts = raw.decode("utf-8", "replace").split()
                if len(parts) == 5 and parts[0] == "done" and parts[1] in found:
                    with contextlib.suppress(ValueError):
                        found[parts[1]].append(int(parts[3]))
        return found

    def forget(self, pid: int) -> None:
        """Drop what is known about a dead process (its pid may be reused)."""
        self._running.pop(pid, None)
        self._recent_done.pop(pid, None)


# -- the worker processes ----------------------------------------------------------------------


def settings_env(settings: QueueSettings) -> dict[str, str]:
    """Every field of ``settings`` as a ``QUEUE_*`` variable, so a worker gets exactly these."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            text = "none"
        elif isinstance(value, list):
            text = ",".join(value)
        else:
            text = str(value)
        env[f"QUEUE_{name.upper()}"] = text
    return env


class Fleet:
    """The worker processes of a run, one per slot."""

    def __init__(self, settings: QueueSettings, workdir: Path, size: int) -> None:
        self.command = [
            sys.executable,
            "-m",
            "corral.worker",
            TASK_MODULE,
            "--log-level",
            "warning",
            # A worker whose harness is gone (even killed outright) stops by itself.
            "--parent-pid",
            str(os.getpid()),
        ]
        base = {key: value for key, value in os.environ.items() if not key.startswith("QUEUE_")}
        self.env = {**base, **settings_env(settings)}
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self._logs: list[IO[bytes] | None] = [None] * size

    def start(self, slot: int) -> int:
        """Start the worker of ``slot``; return its pid."""
        log = self._logs[slot]
        if log is None:
            log = self._logs[slot] = open(self.workdir / f"worker-{slot + 1}.log", "ab")  # noqa: SIM115
        # Its own process group: a Ctrl-C reaches the harness, which stops the workers itself.
        proc = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        self.procs[slot] = proc
        return proc.pid

    def kill(self, slot: int) -> int:
        """SIGKILL the worker of ``slot`` and wait until it is gone; return its pid."""
        proc = self.procs[slot]
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        self.procs[slot] = None
        return proc.pid

    def reap(self) -> list[tuple[int, int, int]]:
        """``(slot, pid, exit code)`` of workers that exited on their own since the last call."""
        gone = []
        for slot, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is not None:
                gone.append((slot, proc.pid, proc.returncode))
                self.procs[slot] = None
        return gone

    def alive(self) -> list[int]:
        """The slots with a running worker."""
        return [slot for slot, proc in enumerate(self.procs) if proc is not None]

    def stop(self, grace_s: float) -> None:
        """SIGTERM every worker, wait ``grace_s`` plus a margin, then SIGKILL what is left."""
        running = [proc for proc in self.procs if proc is not None and proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 10.0
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait(30)
        self.procs = [None] * len(self.procs)
        for log in self._logs:
            if log is not None:
                log.close()
        self._logs = [None] * len(self._logs)


# -- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _work_directory(config: ChaosConfig) -> Iterator[Path]:
    if config.workdir is not None:
        config.workdir.mkdir(parents=True, exist_ok=True)
        yield config.workdir
        return
    path = Path(tempfile.mkdtemp(prefix="corral-chaos-"))
    try:
        yield path
    finally:
        if not config.keep:
            shutil.rmtree(path, ignore_errors=True)


def chaos_settings(config: ChaosConfig, workdir: Path) -> QueueSettings:
    """The settings of the run's fresh queue (shared with the workers through the env)."""
    return QueueSettings(
        backend=config.backend,
        redis_url=config.redis_url,
        sqlite_path=str(workdir / "chaos.db"),
        name=f"chaos-{secrets.token_hex(4)}",
        concurrency=config.concurrency,
        attempts=1,
        lease_s=config.lease_s,
        max_stalls=config.max_stalls,
        shutdown_grace_s=config.shutdown_grace_s,
        dead_letter=None,
        keep_completed=None,
        keep_failed=None,
        rate_limit_max=None,
        tasks=[],
    )


class _Run:
    """The state of one chaos run."""

    def __init__(
        self,
        config: ChaosConfig,
        settings: QueueSettings,
        workdir: Path,
        say: Callable[[str], None],
    ) -> None:
        self.config = config
        self.settings = settings
        self.say = say
        self.rng = random.Random(config.seed)
        self.ledger_path = workdir / "ledger"
        self.ledger_path.touch()
        self.ledger = Ledger(self.ledger_path, recent_window_s=max(10.0, 5 * config.lease_s))
        self.service = QueueService(settings)
        self.fleet = Fleet(settings, workdir, config.workers)
        self.enqueued: list[str] = []
        self.kills: list[Kill] = []
        self.crashes = 0
        self.dead_pids: set[int] = set()
        self.in_flight_at_crashes = 0
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def produce(self) -> None:
        """Enqueue the jobs in small batches spread evenly over ``duration_s``."""
        config = self.config
        batches = max(1, min(config.jobs, round(config.duration_s / ENQUEUE_TICK_S)))
        interval = config.duration_s / batches
        ledger = str(self.ledger_path)
        for index in range(batches):
            size = config.jobs * (index + 1) // batches - config.jobs * index // batches
            delay = self.started + index * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            jobs = [
                {
                    "name": JOB_NAME,
                    "data": {"ledger": ledger, "ms": self.rng.randint(0, config.job_ms)},
                }
                for _ in range(size)
            ]
            self.enqueued += await self.service.enqueue_many(jobs)

    async def in_flight(self, pid: int, died_ns: int) -> int:
        """How many jobs the dead worker ``pid`` had started and not settled."""
        self.ledger.poll()
        running = self.ledger.running(pid)
        # A job whose `done` line was written but whose completion did not reach the queue
        # before the kill will run again too; its lease keeps it active for now.
        finished = self.ledger.recently_done(pid, died_ns - self.ledger.window_ns) - running
        unsettled = 0
        for job_id in finished:
            info = await self.service.get_job(job_id)
            if info is None or info.state is not JobState.COMPLETED:
                unsettled += 1
        self.ledger.forget(pid)
        return len(running) + unsettled

    async def restart_crashed(self) -> None:
        for slot, pid, code in self.fleet.reap():
            self.crashes += 1
            self.dead_pids.add(pid)
            self.in_flight_at_crashes += await self.in_flight(pid, time.time_ns())
            self.say(f"worker pid {pid} exited on its own (code {code}); restarting it")
            self.fleet.start(slot)

    async def kill_one(self) -> None:
        slots = self.fleet.alive()
        if not slots:
            return
        slot = self.rng.choice(slots)
        at_s = self.elapsed()
        pid = self.fleet.kill(slot)
        self.dead_pids.add(pid)
        in_flight = await self.in_flight(pid, time.time_ns())
        self.fleet.start(slot)
        self.kills.append(Kill(round(at_s, 3), pid, in_flight))
        self.say(
            f"kill {len(self.kills)} at {at_s:.1f}s: worker pid {pid} "
            f"({in_flight} job(s) in flight); restarted"
        )

    async def all_done(self, producer: asyncio.Task[None]) -> bool:
        if not producer.done():
            return False
        counts = await self.service.counts()
        settled = counts[JobState.COMPLETED] + counts[JobState.FAILED]
        pending = counts[JobState.ACTIVE] + counts[JobState.WAITING] + counts[JobState.DELAYED]
        return settled >= len(self.enqueued) and pending == 0

    async def workers_up(self) -> None:
        """Wait until every worker is up (listed by the queue), so that on a busy machine the
        kills do not fall on workers still starting, which run nothing and test nothing."""
        deadline = time.monotonic() + WARM_UP_LIMIT_S
        while len(await self.service.workers()) < self.config.workers:
            if time.monotonic() > deadline:
                self.say(f"workers not all up after {WARM_UP_LIMIT_S:g}s; starting anyway")
                return
            await self.restart_crashed()
            await asyncio.sleep(0.05)

    async def go(self) -> ChaosReport:
        config = self.config
        await self.service.counts()  # reach the backend (and create the schema) first
        for slot in range(config.workers):
            self.fleet.start(slot)
        await self.workers_up()
        self.started = time.monotonic()
        producer = asyncio.create_task(self.produce(), name="corral-chaos-producer")
        try:
            next_kill = config.kill_every_s
            done = False
            while self.elapsed() < config.duration_s:
                if producer.done():
                    producer.result()  # an enqueue that failed ends the run with its error
                await self.restart_crashed()
                if await self.all_done(producer):
                    done = True
                    break
                if self.elapsed() >= next_kill:
                    await self.kill_one()
                    next_kill += config.kill_every_s
                await asyncio.sleep(0.05)
            self.say(
                f"{'all jobs done' if done else 'kills stopped'} after {self.elapsed():.1f}s "
                f"({len(self.kills)} kill(s)); draining"
            )
            await producer
            drain_deadline = time.monotonic() + config.drain_timeout_s
            while not done and time.monotonic() < drain_deadline:
                await self.restart_crashed()
                done = await self.all_done(producer)
                if not done:
                    await asyncio.sleep(0.2)
            duration_s = self.elapsed()
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            self.fleet.stop(config.shutdown_grace_s)
        if not done:
            self.say(f"the queue did not drain within {config.drain_timeout_s:g}s")
        return await self.check(duration_s, drained=done)

    async def completed_ids(self) -> set[str]:
        found: set[str] = set()
        page = 1000
        while True:
            jobs = await self.service.list_jobs(JobState.COMPLETED, limit=page, offset=len(found))
            found.update(job.id for job in jobs)
            if len(jobs) < page:
                return found

    async def check(self, duration_s: float, *, drained: bool) -> ChaosReport:
        self.ledger.poll()
        counts = await self.service.counts()
        completed = await self.completed_ids()
        enqueued = set(self.enqueued)
        dones = self.ledger.dones
        seen = set(dones) | set(self.ledger.starts)
        lost = sorted(enqueued - completed, key=_id_order)
        duplicated = sorted((job for job, n in dones.items() if n > 1), key=_id_order)
        runs = self.ledger.done_pids(set(duplicated))
        after_kills = sum(
            sum(1 for pid in pids[:-1] if pid in self.dead_pids) for pids in runs.values()
        )
        unexpected = sorted(seen - enqueued, key=_id_order)
        phantom = sorted(completed - set(dones), key=_id_order)
        config = self.config
        return ChaosReport(
            backend=config.backend,
            enqueued=len(self.enqueued),
            completed=counts[JobState.COMPLETED],
            executed=len(dones),
            executions=sum(dones.values()),
            lost=len(lost),
            duplicated=len(duplicated),
            extra_completions=sum(dones[job] - 1 for job in duplicated),
            extra_after_kills=after_kills,
            stuck_active=counts[JobState.ACTIVE],
            failed=counts[JobState.FAILED],
            unexpected=len(unexpected),
            completed_not_executed=len(phantom),
            kills=self.kills,
            worker_crashes=self.crashes,
            in_flight_at_kills=sum(k.in_flight for k in self.kills) + self.in_flight_at_crashes,
            duration_s=round(duration_s, 3),
            drained=drained,
            samples={
                "lost": lost[:SAMPLE_SIZE],
                "duplicated": duplicated[:SAMPLE_SIZE],
                "unexpected": unexpected[:SAMPLE_SIZE],
                "completed_not_executed": phantom[:SAMPLE_SIZE],
            },
            options={
                "queue": self.settings.name,
                "jobs": config.jobs,
                "workers": config.workers,
                "concurrency": config.concurrency,
                "kill_every_s": config.kill_every_s,
                "duration_s": config.duration_s,
                "job_ms": config.job_ms,
                "lease_s": config.lease_s,
                "max_stalls": config.max_stalls,
                "seed": config.seed,
            },
        )


def _id_order(job_id: str) -> tuple[int, str]:
    return (int(job_id), "") if job_id.isdecimal() else (sys.maxsize, job_id)


async def run_chaos(
    config: ChaosConfig, *, say: Callable[[str], None] | None = None
) -> ChaosReport:
    """Run the workers under SIGKILLs as ``config`` says and return the checker's report.

    ``say`` receives one line per event (start, each kill, drain).

    Raises:
        ConfigError: a bad option, or a Redis that is not on 127.0.0.1.
        BackendError: the queue could not be reached.
    """
    config.validate()
    tell = say or logger.info
    with _work_directory(config) as workdir:
        settings = chaos_settings(config, workdir)
        run = _Run(config, settings, workdir, tell)
        tell(
            f"chaos: {config.workers} {config.backend} worker(s) x {config.concurrency}, "
            f"{config.jobs} job(s) over {config.duration_s:g}s, SIGKILL every "
            f"{config.kill_every_s:g}s, lease {config.lease_s:g}s; queue {settings.name!r}, "
            f"work dir {workdir}"
        )
        try:
            return await run.go()
        finally:
            try:
                if config.backend == "bullmq" and not config.keep:
                    await _delete_redis_queue(settings)
            finally:
                await run.service.close()


async def _delete_redis_queue(settings: QueueSettings) -> None:
    """Delete the keys of the run's queue (a fresh name, so nothing else is touched)."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        pattern = f"{settings.prefix}:{settings.name}:*"
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)
    except Exception as exc:  # cleanup is best effort; the report matters more
        logger.warning("could not delete the keys of queue %r: %s", settings.name, exc)
    finally:
        await client.aclose()


# -- the command -------------------------------------------------------------------------------


def report_table(report: ChaosReport) -> Table:
    """The report as a two-column table."""
    table = Table(title=f"corral chaos on {report.backend}")
    table.add_column("check")
    table.add_column("value", justify="right")
    rows: list[tuple[str, object]] = [
        ("enqueued", report.enqueued),
        ("completed (queue state)", report.completed),
        ("executed to completion (ledger)", report.executed),
        ("lost", report.lost),
        ("duplicated", report.duplicated),
        ("extra completions", report.extra_completions),
        ("  of them after a kill", report.extra_after_kills),
        ("stuck active", report.stuck_active),
        ("failed", report.failed),
        ("unexpected (never enqueued)", report.unexpected),
        ("completed, never executed", report.completed_not_executed),
        ("kills", len(report.kills)),
        ("jobs in flight at the kills", report.in_flight_at_kills),
        ("worker crashes", report.worker_crashes),
        ("duration", f"{report.duration_s:.1f}s"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def chaos_command(
    ctx: typer.Context,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend", "-b", help="sqlite or bullmq [default: the global --backend, or sqlite]"
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(min=1, max=MAX_JOBS, help="Jobs to enqueue")] = 10_000,
    workers: Annotated[int, typer.Option(min=1, max=MAX_WORKERS, help="Worker processes")] = 4,
    concurrency: Annotated[
        int, typer.Option(min=1, max=MAX_CONCURRENCY, help="Jobs at once per worker")
    ] = 16,
    kill_every_s: Annotated[
        float, typer.Option("--kill-every-s", min=MIN_KILL_EVERY_S, help="SIGKILL rhythm")
    ] = 2.0,
    duration_s: Annotated[
        float,
        typer.Option(
            "--duration-s", min=0.0, max=MAX_DURATION_S, help="How long jobs arrive and kills go on"
        ),
    ] = 60.0,
    job_ms: Annotated[
        int, typer.Option("--job-ms", min=0, help="Each job works a random 0..N milliseconds")
    ] = 500,
    lease_s: Annotated[
        float, typer.Option("--lease-s", min=0.1, help="Lease of a claimed job")
    ] = 2.0,
    max_stalls: Annotated[
        int, typer.Option("--max-stalls", min=0, help="Lease expiries before a job is failed")
    ] = 1_000,
    drain_timeout_s: Annotated[
        float,
        typer.Option("--drain-timeout-s", min=1.0, help="How long to wait for the queue to drain"),
    ] = 120.0,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis-url", help="A Redis on 127.0.0.1 [default: global --redis-url, env]"),
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Keep the ledger, SQLite file and worker logs here"),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the work directory and the Redis keys")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the random choices")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Kill workers at random while they work, then check no job was lost (exit 1 if one was)."""
    state = cli_state(ctx)
    with corral_errors():
        config = ChaosConfig(
            backend=backend or state.overrides.get("backend") or "sqlite",
            jobs=jobs,
            workers=workers,
            concurrency=concurrency,
            kill_every_s=kill_every_s,
            duration_s=duration_s,
            job_ms=job_ms,
            lease_s=lease_s,
            max_stalls=max_stalls,
            drain_timeout_s=drain_timeout_s,
            redis_url=redis_url or state.redis_url(),
            workdir=workdir,
            keep=keep,
            seed=seed,
        )

        def say(line: str) -> None:
            typer.echo(line, err=True)

        async def main() -> ChaosReport:
            # SIGTERM ends the run as Ctrl-C does: the workers are stopped on the way out.
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            return await run_chaos(config, say=say)

        try:
            report = asyncio.run(main())
        except asyncio.CancelledError:
            typer.echo("error: the chaos run was stopped; its workers were stopped too", err=True)
            raise typer.Exit(128 + signal.SIGTERM) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        console = Console(highlight=False, soft_wrap=False)
        console.print(report_table(report))
        if report.ok:
            console.print(
                "PASS: nothing lost, nothing stuck, duplicates within bounds", markup=False
            )
        else:
            console.print(f"FAIL: {'; '.join(report.violations)}", markup=False)
    if not report.ok:
        raise typer.Exit(EXIT_VIOLATION)
