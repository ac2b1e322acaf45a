"""The ``corral workers`` command: the live workers of a queue, or of every queue."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from corral.service import QueueService
from corral.workers import WorkerInfo

T = TypeVar("T")
Runner = Callable[[typer.Context, Callable[[QueueService], Awaitable[T]]], T]


def register(app: typer.Typer, run: Runner[Any], out: Console) -> None:
    """Add ``corral workers`` to ``app``; ``run`` runs a call on the queue (cli.run)."""

    @app.command()
    def workers(
        ctx: typer.Context,
        every_queue: Annotated[
            bool, typer.Option("--all", help="The workers of every queue on the storage")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """List the live workers of the queue (BullMQ: as Node's Queue.getWorkers())."""

        async def call(service: QueueService) -> list[WorkerInfo]:
            return await service.workers(every_queue=every_queue)

        found: list[WorkerInfo] = run(ctx, call)
        if as_json:
            typer.echo(json.dumps([worker_to_dict(each) for each in found]))
            return
        if not found:
            out.print("no live workers", markup=False)
            return
        now = datetime.now(UTC)
        table = Table()
        for column in ("id", "host", "pid", "queues", "up", "seen", "running", "done"):
            table.add_column(column, no_wrap=column != "queues")
        for each in found:
            table.add_row(
                Text(each.id),
                Text(each.host),
                _num(each.pid),
                Text(", ".join(each.queues)),
                _ago(now, each.started_at),
                _ago(now, each.last_seen) + " ago" if each.last_seen else "-",
                _num(each.running),
                _num(each.done),
            )
        out.print(table)


def worker_to_dict(worker: WorkerInfo) -> dict[str, Any]:
    """A worker as ``corral workers --json`` prints it."""
    return {
        "id": worker.id,
        "host": worker.host,
        "pid": worker.pid,
        "queues": worker.queues,
        "started_at": worker.started_at.isoformat() if worker.started_at else None,
        "last_seen": worker.last_seen.isoformat() if worker.last_seen else None,
        "running": worker.running,
        "done": worker.done,
    }


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ago(now: datetime, then: datetime | None) -> str:
    """A duration in its largest units: ``42s``, ``5m03s``, ``2h10m``, ``3d04h``."""
    if then is None:
        return "-"
    seconds = max(0, round((now - then).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
