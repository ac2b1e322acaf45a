"""How the ``corral`` command shows jobs: tables and JSON of jobs, counts and children."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from corral.message import STATE_ORDER, Child, ChildStatus, JobInfo, JobState


def counts_table(counts: dict[JobState, int]) -> Table:
    """A table of jobs per state, with a total."""
    table = Table()
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state in STATE_ORDER:
        table.add_row(state.value, str(counts.get(state, 0)))
    table.add_section()
    table.add_row("total", str(sum(counts.values())))
    return table


CHILDREN_SHOWN = 50


def children_table(children: list[Child]) -> Table:
    """A parent's children: each one's id, queue, name and status, with its result or error."""
    table = Table(title=None if len(children) <= CHILDREN_SHOWN else f"first {CHILDREN_SHOWN}")
    for column in ("child", "queue", "name", "status"):
        table.add_column(column, no_wrap=True)
    table.add_column("result or error", overflow="fold")
    for child in children[:CHILDREN_SHOWN]:
        if child.status is ChildStatus.COMPLETED:
            detail = json.dumps(child.result)
        else:
            detail = child.error or ""
        table.add_row(
            Text(child.id),
            Text(child.queue),
            Text(child.name or "(removed)"),
            child.status.value,
            Text(shorten(detail, 60)),
        )
    return table


def child_to_dict(child: Child) -> dict[str, Any]:
    """A child of a job as plain JSON (``corral job ID --json``)."""
    return {
        "id": child.id,
        "queue": child.queue,
        "name": child.name,
        "status": child.status.value,
        "result": child.result,
        "error": child.error,
    }


def attempts_text(info: JobInfo) -> str:
    """Attempts made of those allowed; past the limit (a job retried by hand, e.g. from Bull
    Board, which keeps the count) it says so instead of "3 of 2"."""
    if info.attempts_made <= info.max_attempts:
        return f"{info.attempts_made} of {info.max_attempts}"
    return f"{info.attempts_made} (retried by hand; {info.max_attempts} allowed)"


def job_to_dict(info: JobInfo) -> dict[str, Any]:
    """A job as plain JSON (``--json`` output)."""
    return {
        "id": info.id,
        "name": info.name,
        "queue": info.queue,
        "state": info.state.value,
        "attempts_made": info.attempts_made,
        "max_attempts": info.max_attempts,
        "priority": info.priority,
        "data": info.data,
        "enqueued_at": iso(info.enqueued_at),
        "run_at": iso(info.run_at),
        "finished_at": iso(info.finished_at),
        "result": info.result,
        "error": info.error,
        "traceback": info.traceback,
        "tracebacks": list(info.tracebacks),
        "progress": info.progress,
        "logs": list(info.logs),
        "parent": (
            {"id": info.parent.id, "queue": info.parent.queue} if info.parent is not None else None
        ),
    }


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def show_time(moment: datetime) -> str:
    local = moment.astimezone() if moment.tzinfo is not None else moment
    return local.strftime("%Y-%m-%d %H:%M:%S")


def shorten(text: str, width: int) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 1] + "…"
