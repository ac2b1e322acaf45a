"""The ``corral move``, ``corral relay`` and ``corral outbox`` commands (registered by
:mod:`corral.cli`): moving a queue to another backend, and the transactional outbox."""

from __future__ import annotations

import asyncio
import enum
import json
import signal
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from corral._cliutil import cli_state, corral_errors, fail
from corral.move import MoveReport, parse_states
from corral.service import QueueService
from corral.settings import QueueSettings

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


class TargetBackend(enum.StrEnum):
    SQLITE = "sqlite"
    BULLMQ = "bullmq"


def _where(settings: QueueSettings) -> str:
    location = settings.sqlite_path if settings.backend == "sqlite" else settings.redis_url_redacted
    return f"queue {settings.name!r} ({settings.backend} at {location})"


def move(
    ctx: typer.Context,
    to_backend: Annotated[
        TargetBackend | None,
        typer.Option("--to-backend", help="The target's backend [default: the source's]"),
    ] = None,
    to_redis_url: Annotated[
        str | None, typer.Option("--to-redis-url", help="The target's Redis (bullmq)")
    ] = None,
    to_sqlite_path: Annotated[
        str | None, typer.Option("--to-sqlite-path", help="The target's SQLite file (sqlite)")
    ] = None,
    to_queue: Annotated[
        str | None, typer.Option("--to-queue", help="The queue's name there [default: the same]")
    ] = None,
    to_prefix: Annotated[
        str | None, typer.Option("--to-prefix", help="The target's BullMQ key prefix")
    ] = None,
    states: Annotated[
        str, typer.Option("--states", help="Comma-separated: waiting, delayed, failed")
    ] = "waiting,delayed,failed",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would move; change nothing")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Jobs per batch")] = 500,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Move the queue's waiting, delayed and failed jobs to another backend or queue."""
    state = cli_state(ctx)
    with corral_errors():
        chosen = parse_states(states)
        source = state.settings()
        values: dict[str, Any] = {
            key: value for key, value in state.overrides.items() if key not in ("name",)
        }
        values["name"] = to_queue or source.name
        values["backend"] = (to_backend.value if to_backend else None) or source.backend
        for key, value in (
            ("redis_url", to_redis_url),
            ("sqlite_path", to_sqlite_path),
            ("prefix", to_prefix),
        ):
            if value is not None:
                values[key] = value
        target = QueueSettings(**values)
    service = QueueService(source)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    )

    async def go() -> MoveReport:
        try:
            counts = await service.counts()
            total = sum(counts[each] for each in chosen)
            task = progress.add_task("checking" if dry_run else "moving", total=total)
            with progress:
                return await service.move_to(
                    target,
                    states=chosen,
                    dry_run=dry_run,
                    batch_size=batch_size,
                    progress=lambda n: progress.advance(task, n),
                )
        finally:
            await service.close()

    with corral_errors():
        report = asyncio.run(go())
    if as_json:
        typer.echo(json.dumps(_report_json(report)))
    else:
        _print_report(report, source, target)
    if not dry_run and (report.conflicts or report.duplicated or sum(report.left.values())):
        raise typer.Exit(1)


def _report_json(report: MoveReport) -> dict[str, Any]:
    return {
        "dry_run": report.dry_run,
        "moved": {state.value: count for state, count in report.moved.items()},
        "already_there": report.already_there,
        "conflicts": report.conflicts,
        "changed": report.changed,
        "duplicated": report.duplicated,
        "active_skipped": report.active_skipped,
        "in_flow": report.in_flow,
        "schedules": report.schedules,
        "left": {state.value: count for state, count in report.left.items()},
    }


def _print_report(report: MoveReport, source: QueueSettings, target: QueueSettings) -> None:
    verb = "would move" if report.dry_run else "moved"
    parts = ", ".join(f"{count} {state.value}" for state, count in report.moved.items())
    out.print(f"{verb} {parts} job(s)", markup=False)
    out.print(f"  from {_where(source)}", markup=False)
    out.print(f"  to   {_where(target)}", markup=False)
    if report.schedules:
        out.print(f"{verb} {report.schedules} schedule(s)", markup=False)
    if report.already_there:
        what = "are already" if report.dry_run else "were already"
        out.print(
            f"{report.already_there} job(s) {what} in the target (copied by an earlier, "
            "interrupted move)" + ("" if report.dry_run else "; removed from the source"),
            markup=False,
        )
    if report.active_skipped:
        out.print(
            f"skipped {report.active_skipped} active job(s): they finish where they run; stop "
            "the workers and move again to take them along",
            markup=False,
        )
    if report.in_flow:
        shown = ", ".join(report.in_flow[:10]) + (" ..." if len(report.in_flow) > 10 else "")
        out.print(
            f"{len(report.in_flow)} job(s) of flows stay in the source (their parents and "
            f"children do not move with them): {shown}",
            markup=False,
        )
    if report.conflicts:
        shown = ", ".join(report.conflicts[:10]) + (" ..." if len(report.conflicts) > 10 else "")
        out.print(
            f"{len(report.conflicts)} job(s) stay in the source: the target holds their id "
            f"for another job: {shown}",
            markup=False,
        )
    if report.changed:
        out.print(
            f"{report.changed} job(s) changed state in the source while moving (a worker "
            "claimed them) and stay there",
            markup=False,
        )
    if report.duplicated:
        out.print(
            f"{len(report.duplicated)} job(s) are in both queues (workers ran on both sides): "
            + ", ".join(report.duplicated[:10]),
            markup=False,
        )
    left = sum(report.left.values())
    if left and not report.dry_run:
        out.print(f"{left} job(s) of the moved states are still in the source", markup=False)


def relay(
    ctx: typer.Context,
    outbox_url: Annotated[
        str | None,
        typer.Option("--outbox-url", help="The outbox's database [env: QUEUE_OUTBOX_URL]"),
    ] = None,
    table: Annotated[
        str | None, typer.Option("--table", help="The outbox table [env: QUEUE_OUTBOX_TABLE]")
    ] = None,
    burst: Annotated[
        bool, typer.Option("--burst", help="Move the rows there are now, then exit")
    ] = False,
) -> None:
    """Move committed outbox rows to the queue until SIGTERM/SIGINT."""
    from corral.logs import configure_logging
    from corral.relay import Relay

    state = cli_state(ctx)
    with corral_errors():
        configure_logging(state.log_level, default="info")
        settings = _outbox_settings(state.overrides, outbox_url, table)
        if settings.outbox_url is None:
            fail(
                "set QUEUE_OUTBOX_URL or pass --outbox-url (sqlite:///app.db, postgresql://...)", 2
            )
        service = QueueService(settings)

        async def go() -> int:
            runner = Relay(settings, service.backend)
            try:
                if burst:
                    moved = await runner.drain()
                    await runner.close()
                    return moved
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                await runner.run(stop)
                return runner.moved
            finally:
                await service.close()

        moved = asyncio.run(go())
    if burst:
        out.print(
            f"moved {moved} job(s) from the outbox {settings.outbox_table} at "
            f"{settings.outbox_url_redacted}",
            markup=False,
        )


def _outbox_settings(
    overrides: dict[str, Any], url: str | None, table: str | None
) -> QueueSettings:
    values = dict(overrides)
    if url is not None:
        values["outbox_url"] = url
    if table is not None:
        values["outbox_table"] = table
    return QueueSettings(**values)


outbox_app = typer.Typer(
    help="The transactional outbox: create its table, see what waits in it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@outbox_app.command("install")
def outbox_install(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Argument(
            metavar="URL", help="sqlite:///app.db or postgresql://... [env: QUEUE_OUTBOX_URL]"
        ),
    ] = None,
    table: Annotated[
        str | None, typer.Option("--table", help="Table name [env: QUEUE_OUTBOX_TABLE]")
    ] = None,
) -> None:
    """Create the outbox table (and, on PostgreSQL, its NOTIFY trigger); idempotent."""
    from corral.relay import install_at

    with corral_errors():
        settings = _outbox_settings(cli_state(ctx).overrides, url, table)
        dialect = install_at(settings)
    out.print(
        f"outbox table {settings.outbox_table} ready ({dialect} at {settings.outbox_url_redacted})",
        markup=False,
    )


@outbox_app.command("status")
def outbox_status_command(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Argument(metavar="URL", help="The outbox's database")] = None,
    table: Annotated[str | None, typer.Option("--table", help="Table name")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Rows waiting for the relay, and rows it skipped (with why)."""
    from corral.relay import outbox_status

    with corral_errors():
        settings = _outbox_settings(cli_state(ctx).overrides, url, table)
        status = outbox_status(settings)
    if as_json:
        typer.echo(json.dumps(status))
        return
    out.print(f"{status['pending']} row(s) waiting for the relay", markup=False)
    for row in status["skipped"]:
        out.print(
            f"skipped row {row['row']} (job {row['job_id']}, {row['name']}): {row['error']}",
            markup=False,
        )


__all__ = ["move", "outbox_app", "relay"]
