"""The ``corral events`` command (registered by :mod:`corral.cli`): a queue's events."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from corral._cliutil import cli_state, corral_errors
from corral.message import Event
from corral.service import QueueService

EXIT_INTERRUPTED = 130


def events(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C")
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only events after this id [default: every one kept; with --follow, new ones]",
        ),
    ] = None,
    names: Annotated[
        list[str] | None, typer.Option("--name", "-n", help="Only events of this name (repeat)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line")] = False,
) -> None:
    """Print the queue's events, oldest first: BullMQ's names (added, active, completed, ...)."""
    settings = cli_state(ctx).settings()
    start = since if since is not None or follow else "0"

    async def read() -> None:
        async with QueueService(settings) as service:
            async for event in service.events(start, names, follow=follow):
                typer.echo(_json(event) if as_json else _line(event))

    with corral_errors():
        try:
            asyncio.run(read())
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


def _json(event: Event) -> str:
    return json.dumps(
        {"id": event.id, "name": event.name, "job_id": event.job_id, "fields": event.fields},
        ensure_ascii=False,
    )


def _line(event: Event) -> str:
    parts = [event.id, event.name]
    if event.job_id is not None:
        parts.append(f"job {event.job_id}")
    parts += [f"{key}={value}" for key, value in event.fields.items()]
    return "  ".join(parts)
