"""One ``corral chaos`` run and its checker (:func:`run_chaos`), and the ``corral chaos``
command that prints its report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from corral._cliutil import cli_state, corral_errors
from corral.message import JobState
from corral.service import QueueService
from corral.settings import QueueSettings
from corral.tools.chaos.fleet import Fleet
from corral.tools.chaos.ledger import Ledger
from corral.tools.chaos.model import (
    ENQUEUE_TICK_S,
    EXIT_VIOLATION,
    JOB_NAME,
    MAX_CONCURRENCY,
    MAX_DURATION_S,
    MAX_JOBS,
    MAX_WORKERS,
    MIN_KILL_EVERY_S,
    SAMPLE_SIZE,
    WARM_UP_LIMIT_S,
    ChaosConfig,
    ChaosReport,
    Kill,
)

logger = logging.getLogger("corral.chaos")


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
