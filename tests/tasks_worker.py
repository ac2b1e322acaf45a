"""Task module for the worker and CLI tests: handlers that leave a trace in a file.

Each handler appends lines like ``start <job id> <attempt> <pid>`` / ``end ...`` to the file named
by ``data["out"]``, so a test in another process can see what ran, when and where.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from corral import QueueMessage, QueueService, Retry

service = QueueService()


def trace(message: QueueMessage, event: str) -> None:
    """Append ``event`` for ``message`` to ``data["out"]`` (one line, flushed at once)."""
    with open(message.data["out"], "a", encoding="utf-8") as out:
        out.write(f"{event} {message.id} {message.attempt} {os.getpid()}\n")


@service.handler("echo")
async def echo(message: QueueMessage) -> Any:
    trace(message, "start")
    trace(message, "end")
    return message.data.get("value")


def sleep_for(message: QueueMessage) -> float:
    """``data["seconds"]``; with ``data["once"]``, only the job's first run sleeps."""
    if message.data.get("once"):
        marker = Path(message.data["out"] + f".{message.id}.ran")
        if marker.exists():
            return 0.0
        marker.touch()
    return float(message.data["seconds"])


@service.handler("sleep")
async def sleep(message: QueueMessage) -> str:
    trace(message, "start")
    seconds = sleep_for(message)
    await asyncio.sleep(seconds)
    trace(message, "end")
    return "slept" if seconds else "quick"


@service.handler("sync_sleep")
def sync_sleep(message: QueueMessage) -> str:
    """A synchronous handler: it runs in a thread, which a shutdown cannot cancel."""
    trace(message, "start")
    seconds = sleep_for(message)
    time.sleep(seconds)
    trace(message, "end")
    return "slept" if seconds else "quick"


@service.handler("flaky", attempts=3, backoff=Retry.fixed(0))
async def flaky(message: QueueMessage) -> int:
    """Fail the first attempt, succeed on the next."""
    trace(message, "start")
    if message.attempt == 1:
        raise ConnectionError("first attempt fails on purpose")
    return message.attempt


@service.handler("boom", attempts=1)
def boom(message: QueueMessage) -> None:
    raise ValueError(f"bad input {message.data.get('value')!r}")


@service.handler("report")
async def report(message: QueueMessage) -> str:
    """Use progress and log."""
    await message.progress(50)
    await message.log("halfway there")
    await message.progress(100)
    await message.log("done")
    return "reported"
