"""The ``corral`` command: enqueue jobs, inspect and manage a queue, run workers.

Settings come from ``QUEUE_*`` environment variables and ``.env``; the global options
(``--backend``, ``--queue``, ``--sqlite-path``, ``--redis-url``) win over both. Every error
corral knows (bad settings, a refused payload, an unreachable backend, an unknown job) is one
line on stderr and exit code 1 (2 for bad settings and usage).
"""

from __future__ import annotations

import asyncio
import enum
import json
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from corral import __version__
from corral._cli_events import events
from corral._cli_results import register as register_result_commands
from corral._cli_schedules import register as register_schedule_commands
from corral._cli_tx import move, outbox_app, relay
from corral._cli_workers import register as register_worker_commands
from corral._cliutil import PASS_ARGUMENTS, CliState, corral_errors, fail, run_tool_command
from corral._cliutil import cli_state as _state
from corral._cliviews import (
    attempts_text,
    child_to_dict,
    children_table,
    counts_table,
    job_to_dict,
    shorten,
    show_time,
)
from corral.errors import ConfigError, CorralError, JobNotFoundError
from corral.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from corral.message import STATE_ORDER, Child, JobInfo, JobState
from corral.service import QueueService
from corral.settings import QueueSettings
from corral.worker import (
    EXIT_CONFIG,
    EXIT_ERROR,
    WorkerOptions,
    exit_process,
    serve,
)
from corral.worker import check as health_check

T = TypeVar("T")

app = typer.Typer(
    name="corral",
    help="corral: one job queue API over SQLite and BullMQ on Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

out = Console(highlight=False, soft_wrap=False)


class BackendName(enum.StrEnum):
    """The values ``--backend`` accepts."""

    SQLITE = "sqlite"
    BULLMQ = "bullmq"


def run(ctx: typer.Context, call: Callable[[QueueService], Awaitable[T]]) -> T:
    """Build the queue from the settings, run ``call`` on it, close it, map errors to exits."""
    with corral_errors():
        service = QueueService(_state(ctx).settings())

        async def go() -> T:
            try:
                return await call(service)
            finally:
                await service.close()

        return asyncio.run(go())


def _where(settings: QueueSettings) -> str:
    location = settings.sqlite_path if settings.backend == "sqlite" else settings.redis_url_redacted
    return f"queue {settings.name!r} ({settings.backend} at {location})"


# -- global options -----------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        typer.echo(f"corral {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    backend: Annotated[
        BackendName | None,
        typer.Option(
            "--backend", "-b", help="Storage backend [env: QUEUE_BACKEND; default sqlite]"
        ),
    ] = None,
    queue: Annotated[
        str | None, typer.Option("--queue", "-q", help="Queue name [env: QUEUE_NAME]")
    ] = None,
    sqlite_path: Annotated[
        str | None,
        typer.Option("--sqlite-path", help="SQLite database file [env: QUEUE_SQLITE_PATH]"),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis-url", help="Redis URL for bullmq [env: QUEUE_REDIS_URL]"),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            help=f"One of {', '.join(LOG_LEVELS)} [env: QUEUE_LOG_LEVEL; default warning, "
            "info for worker]",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """corral: one job queue API over SQLite and BullMQ on Redis."""
    values = {
        "backend": backend.value if backend is not None else None,
        "name": queue,
        "sqlite_path": sqlite_path,
        "redis_url": redis_url,
    }
    ctx.obj = CliState(
        overrides={key: value for key, value in values.items() if value is not None},
        log_level=log_level,
    )
    if ctx.invoked_subcommand != "worker":
        with corral_errors():
            configure_logging(log_level, default="warning")


# -- producing ----------------------------------------------------------------------------------


@app.command()
def enqueue(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Job name (the handler's name)")],
    data: Annotated[
        str, typer.Argument(metavar="JSON", help='Payload as JSON, e.g. \'{"to": "ada"}\'')
    ] = "null",
    delay_s: Annotated[float, typer.Option("--delay-s", help="Run no sooner than this")] = 0.0,
    priority: Annotated[int, typer.Option(help="Lower runs first; 0 before all others")] = 0,
    job_id: Annotated[
        str | None,
        typer.Option("--job-id", help="Your id; an existing job with it makes this a no-op"),
    ] = None,
    attempts: Annotated[
        int | None, typer.Option(help="Attempts before failing [default: QUEUE_ATTEMPTS]")
    ] = None,
) -> None:
    """Add a job and print its id."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        fail(f'the JSON argument is not valid JSON ({exc}); e.g. \'{{"to": "ada"}}\'')

    async def call(service: QueueService) -> str:
        return await service.enqueue(
            name, payload, delay_s=delay_s, priority=priority, attempts=attempts, job_id=job_id
        )

    out.print(run(ctx, call), markup=False)


# -- inspecting ---------------------------------------------------------------------------------


@app.command()
def stats(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """How many jobs are in each state, and whether the queue is paused."""

    async def call(service: QueueService) -> tuple[dict[JobState, int], bool]:
        return await service.counts(), await service.is_paused()

    counts, paused = run(ctx, call)
    settings = _state(ctx).settings()
    if as_json:
        body = {
            "queue": settings.name,
            "backend": settings.backend,
            "paused": paused,
            "counts": {state.value: counts.get(state, 0) for state in STATE_ORDER},
        }
        typer.echo(json.dumps(body))
        return
    out.print(Text(_where(settings)))
    out.print(counts_table(counts))
    out.print(f"paused: {'yes' if paused else 'no'}", markup=False)


@app.command()
def jobs(
    ctx: typer.Context,
    state: Annotated[
        JobState | None,
        typer.Option("--state", "-s", help="Only this state [default: every state]"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (with --state)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List jobs: waiting/delayed in delivery order, finished ones newest first."""

    async def call(service: QueueService) -> list[JobInfo]:
        if state is not None:
            return await service.list_jobs(state, limit=limit, offset=offset)
        found: list[JobInfo] = []
        for each in STATE_ORDER:
            if len(found) >= limit:
                break
            found += await service.list_jobs(each, limit=limit - len(found))
        return found

    found = run(ctx, call)
    if as_json:
        typer.echo(json.dumps([job_to_dict(job) for job in found]))
        return
    if not found:
        out.print(f"no {state.value + ' ' if state else ''}jobs", markup=False)
        return
    table = Table()
    for column in ("id", "name", "state", "attempts", "priority", "enqueued"):
        table.add_column(column, no_wrap=True)
    table.add_column("error", overflow="fold")
    for job in found:
        table.add_row(
            Text(job.id),
            Text(job.name),
            job.state.value,
            attempts_text(job).replace(" of ", "/"),
            str(job.priority),
            show_time(job.enqueued_at),
            Text(shorten(job.error or "", 60)),
        )
    out.print(table)


@app.command()
def job(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show one job: state, attempts, data, result or error with traceback, progress, logs,
    and in a flow its parent and children."""

    async def call(service: QueueService) -> tuple[JobInfo | None, list[Child]]:
        info = await service.get_job(job_id)
        return info, (await service.get_children(job_id) if info is not None else [])

    info, children = run(ctx, call)
    if info is None:
        with corral_errors():
            raise JobNotFoundError(f"no job with id {job_id!r} in {_where(_state(ctx).settings())}")
    if as_json:
        body = job_to_dict(info)
        body["children"] = [child_to_dict(child) for child in children]
        typer.echo(json.dumps(body))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    rows: list[tuple[str, str]] = [
        ("id", info.id),
        ("name", info.name),
        ("queue", info.queue),
        ("state", info.state.value),
        ("attempts", attempts_text(info)),
        ("priority", str(info.priority)),
        ("enqueued", show_time(info.enqueued_at)),
    ]
    if info.run_at is not None:
        rows.append(("run at", show_time(info.run_at)))
    if info.finished_at is not None:
        rows.append(("finished", show_time(info.finished_at)))
    rows.append(("data", json.dumps(info.data)))
    if info.state is JobState.COMPLETED:
        rows.append(("result", json.dumps(info.result)))
    rows.append(("progress", json.dumps(info.progress)))
    if info.error:
        rows.append(("error", info.error))
    if info.parent is not None:
        rows.append(("parent", f"{info.parent.id} (queue {info.parent.queue})"))
    if children:
        tally = Counter(child.status.value for child in children)
        rows.append(("children", ", ".join(f"{n} {status}" for status, n in tally.items())))
    for key, value in rows:
        grid.add_row(key, Text(value))
    out.print(grid)
    if children:
        out.print(children_table(children))
    traces = info.tracebacks or ([info.traceback] if info.traceback else [])
    for number, trace in enumerate(traces, start=1):
        heading = "traceback:" if len(traces) == 1 else f"traceback {number} of {len(traces)}:"
        out.print(heading, markup=False)
        out.print(Text(trace.rstrip()), soft_wrap=True)
    if info.logs:
        out.print("logs:", markup=False)
        for line in info.logs:
            out.print(Text(f"  {line}"), soft_wrap=True)


# -- managing -----------------------------------------------------------------------------------


@app.command()
def retry(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option(min=1, help="Retry at most this many")] = None,
) -> None:
    """Move failed jobs back to waiting, with a fresh set of attempts."""

    async def call(service: QueueService) -> int:
        return await service.retry_failed(limit=limit)

    moved = run(ctx, call)
    out.print(f"{moved} failed job(s) moved back to waiting", markup=False)


@app.command()
def remove(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id")],
) -> None:
    """Delete a job that is not running."""

    async def call(service: QueueService) -> bool:
        return await service.remove(job_id)

    if not run(ctx, call):
        fail(f"no job with id {job_id!r} in {_where(_state(ctx).settings())}")
    out.print(f"removed job {job_id}", markup=False)


@app.command()
def promote(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The delayed job's id")],
) -> None:
    """Run a delayed job now instead of when it is due."""

    async def call(service: QueueService) -> bool:
        return await service.promote(job_id)

    if not run(ctx, call):
        fail(f"no delayed job with id {job_id!r} in {_where(_state(ctx).settings())}")
    out.print(f"promoted job {job_id}", markup=False)


@app.command()
def pause(ctx: typer.Context) -> None:
    """Stop every worker of the queue from starting jobs (enqueueing still works)."""

    async def call(service: QueueService) -> None:
        await service.pause()

    run(ctx, call)
    out.print(f"paused {_where(_state(ctx).settings())}", markup=False)


@app.command()
def resume(ctx: typer.Context) -> None:
    """Let workers start jobs again."""

    async def call(service: QueueService) -> None:
        await service.resume()

    run(ctx, call)
    out.print(f"resumed {_where(_state(ctx).settings())}", markup=False)


@app.command()
def purge(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """Delete every waiting, delayed, completed and failed job (running jobs finish)."""
    with corral_errors():
        where = _where(_state(ctx).settings())
    if not yes:
        try:
            sure = typer.confirm(f"Delete every job of {where} that is not running?", default=False)
        except typer.Abort:
            sure = False
        if not sure:
            fail("purge cancelled; nothing was deleted (pass --yes to skip the question)")

    async def call(service: QueueService) -> int:
        return await service.purge()

    deleted = run(ctx, call)
    out.print(f"deleted {deleted} job(s) from {where}", markup=False)


register_schedule_commands(app, run, out)
register_result_commands(app, run)
register_worker_commands(app, run, out)
app.command()(events)


# -- workers ------------------------------------------------------------------------------------


@app.command()
def worker(
    ctx: typer.Context,
    modules: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODULE",
            help="Task modules (package.module or module:attr) [default: QUEUE_TASKS]",
        ),
    ] = None,
    queues: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            metavar="NAME[:N]",
            help="A queue to serve, with its own concurrency after ':' (repeat for several) "
            "[default: QUEUE_NAMES, else the task modules' queues]",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            help="Jobs at once per queue [default: QUEUE_CONCURRENCY]",
        ),
    ] = None,
    total_concurrency: Annotated[
        int | None,
        typer.Option("--total-concurrency", min=1, help="Jobs at once over all queues"),
    ] = None,
    burst: Annotated[
        bool, typer.Option("--burst", help="Exit once no job is ready to run")
    ] = False,
    processes: Annotated[
        int, typer.Option("--processes", "-p", min=1, help="Worker processes under a supervisor")
    ] = 1,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="Overrides the global --log-level")
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format", help=f"One of {', '.join(LOG_FORMATS)} [env: QUEUE_LOG_FORMAT]"
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", min=1, max=65535, help="Serve Prometheus /metrics here"),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address of --metrics-port")
    ] = "127.0.0.1",
) -> None:
    """Run a worker until SIGTERM/SIGINT (a second signal exits at once)."""
    state = _state(ctx)
    code = serve(
        WorkerOptions(
            modules=tuple(modules or ()),
            queues=tuple(queues or ()),
            concurrency=concurrency,
            total_concurrency=total_concurrency,
            log_format=log_format,
            burst=burst,
            processes=processes,
            log_level=log_level or state.log_level,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            overrides=state.overrides,
        )
    )
    exit_process(code)


@app.command()
def check(
    ctx: typer.Context,
    modules: Annotated[
        list[str] | None,
        typer.Argument(metavar="MODULE", help="Also import these task modules"),
    ] = None,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", min=0.1, help="How long to wait for the backend")
    ] = 10.0,
) -> None:
    """Health check: exit 0 if the settings are valid and the backend answers."""
    code = health_check(_state(ctx).overrides, tuple(modules or ()), timeout_s=timeout_s)
    raise typer.Exit(code)


# -- moving queues, the transactional outbox ----------------------------------------------------

app.command()(move)
app.command()(relay)
app.add_typer(outbox_app, name="outbox")


# -- tools, imported only when they run ---------------------------------------------------------


@app.command(context_settings=PASS_ARGUMENTS, add_help_option=False)
def chaos(ctx: typer.Context) -> None:
    """Kill workers at random while they work, then check no job was lost (exit 1 if one was)."""
    from corral.tools.chaos import chaos_command

    run_tool_command(ctx, chaos_command)


@app.command(context_settings=PASS_ARGUMENTS, add_help_option=False)
def dashboard(ctx: typer.Context) -> None:
    """Serve the web dashboard of every queue on the storage (needs corral[dashboard])."""
    from corral.dashboard.serve import dashboard_command

    run_tool_command(ctx, dashboard_command)


@app.command(context_settings=PASS_ARGUMENTS, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Load-test corral on SQLite and on BullMQ: enqueue and job rates, pickup, memory."""
    from corral.tools.bench import bench_command

    run_tool_command(ctx, bench_command)


# -- entry point --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """The ``corral`` console script."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="corral")
    except CorralError as exc:  # a safety net; commands already report their own errors
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["app", "counts_table", "main"]  # counts_table: the table `corral stats` prints

if __name__ == "__main__":
    main()
