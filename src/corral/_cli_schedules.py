"""The ``corral schedules``, ``corral schedule`` and ``corral unschedule`` commands."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from corral._cliutil import fail
from corral.schedules import ScheduleInfo
from corral.service import QueueService

T = TypeVar("T")
Runner = Callable[[typer.Context, Callable[[QueueService], Awaitable[T]]], T]


def register(app: typer.Typer, run: Runner[Any], out: Console) -> None:
    """Add the schedule commands to ``app``; ``run`` runs a call on the queue (cli.run)."""

    @app.command()
    def schedules(
        ctx: typer.Context,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """List the queue's schedules, the next to run first."""

        async def call(service: QueueService) -> list[ScheduleInfo]:
            return await service.schedules()

        found: list[ScheduleInfo] = run(ctx, call)
        if as_json:
            typer.echo(json.dumps([schedule_to_dict(each) for each in found]))
            return
        if not found:
            out.print("no schedules", markup=False)
            return
        table = Table()
        for column in ("id", "name", "when", "next run", "runs", "between"):
            table.add_column(column, no_wrap=column != "between")
        for each in found:
            table.add_row(
                Text(each.id),
                Text(each.name),
                Text(_when(each)),
                _time(each.next_run_at) if each.next_run_at else "-",
                f"{each.runs}/{each.limit}" if each.limit is not None else str(each.runs),
                _between(each),
            )
        out.print(table)

    @app.command()
    def schedule(
        ctx: typer.Context,
        schedule_id: Annotated[str, typer.Argument(metavar="ID", help="The schedule's id")],
        name: Annotated[str, typer.Argument(help="Job name (the handler's name)")],
        data: Annotated[
            str, typer.Argument(metavar="JSON", help="Payload of every job, as JSON")
        ] = "null",
        cron: Annotated[
            str | None,
            typer.Option(help="Cron pattern: 5 fields, or 6 with the second first"),
        ] = None,
        every_s: Annotated[
            float | None, typer.Option("--every-s", help="Seconds between runs")
        ] = None,
        tz: Annotated[
            str | None, typer.Option(help="Time zone of the cron pattern [default: UTC]")
        ] = None,
        limit: Annotated[int | None, typer.Option(help="Stop after this many runs")] = None,
        start_at: Annotated[
            str | None, typer.Option("--start-at", help="No run before (ISO 8601, with offset)")
        ] = None,
        end_at: Annotated[
            str | None, typer.Option("--end-at", help="No run after (ISO 8601, with offset)")
        ] = None,
        priority: Annotated[int, typer.Option(help="Lower runs first; 0 before all others")] = 0,
        attempts: Annotated[
            int | None, typer.Option(help="Attempts of each job [default: QUEUE_ATTEMPTS]")
        ] = None,
    ) -> None:
        """Create or replace a schedule: a job every --every-s seconds or at each --cron time."""
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            fail(f'the JSON argument is not valid JSON ({exc}); e.g. \'{{"to": "ada"}}\'')
        start, end = _moment(start_at, "--start-at"), _moment(end_at, "--end-at")

        async def call(service: QueueService) -> ScheduleInfo:
            return await service.schedule(
                schedule_id,
                name,
                payload,
                cron=cron,
                every_s=every_s,
                tz=tz,
                limit=limit,
                start_at=start,
                end_at=end,
                priority=priority,
                attempts=attempts,
            )

        stored: ScheduleInfo = run(ctx, call)
        when = _time(stored.next_run_at) if stored.next_run_at else "-"
        out.print(f"schedule {stored.id}: {_when(stored)}, next run {when}", markup=False)

    @app.command()
    def unschedule(
        ctx: typer.Context,
        schedule_id: Annotated[str, typer.Argument(metavar="ID", help="The schedule's id")],
    ) -> None:
        """Delete a schedule and its pending job (a running one finishes)."""

        async def call(service: QueueService) -> bool:
            return await service.unschedule(schedule_id)

        if not run(ctx, call):
            fail(f"no schedule with id {schedule_id!r}")
        out.print(f"removed schedule {schedule_id}", markup=False)


def schedule_to_dict(info: ScheduleInfo) -> dict[str, Any]:
    """A schedule as plain JSON (``--json`` output)."""
    return {
        "id": info.id,
        "name": info.name,
        "queue": info.queue,
        "data": info.data,
        "cron": info.cron,
        "every_s": info.every_s,
        "tz": info.tz,
        "next_run_at": _iso(info.next_run_at),
        "runs": info.runs,
        "limit": info.limit,
        "start_at": _iso(info.start_at),
        "end_at": _iso(info.end_at),
        "priority": info.priority,
        "attempts": info.attempts,
    }


def _when(info: ScheduleInfo) -> str:
    if info.cron is not None:
        return f"cron {info.cron} ({info.tz or 'local time'})"
    return f"every {info.every_s:g}s" if info.every_s is not None else "?"


def _between(info: ScheduleInfo) -> str:
    if info.start_at is None and info.end_at is None:
        return ""
    start = _time(info.start_at) if info.start_at else "…"
    end = _time(info.end_at) if info.end_at else "…"
    return f"{start} to {end}"


def _moment(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{option} {text!r} is not an ISO 8601 time such as 2030-01-01T09:00:00+00:00")
    if moment.tzinfo is None:
        fail(f"{option} {text!r} has no UTC offset; add one, e.g. 2030-01-01T09:00:00+00:00", 2)
    return moment


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _time(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
