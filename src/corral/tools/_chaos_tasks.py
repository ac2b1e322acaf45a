"""The task module of ``corral chaos``: one handler that records every execution in a ledger.

The ledger is a file outside the queue, so what it says about which jobs ran cannot be rewritten
by the queue under test. Each job names the ledger in its data (``{"ledger": PATH, "ms": N}``).
A line is ``<event> <job id> <attempt> <pid> <unix time ns>`` with ``start`` before the work and
``done`` after it; each line is one ``write`` to a file opened with ``O_APPEND``, so the lines of
concurrent worker processes never mix, and a line written before a SIGKILL is kept.
"""

from __future__ import annotations

import asyncio
import os
import time

from corral.errors import UnrecoverableError
from corral.message import QueueMessage
from corral.service import QueueService
from corral.tools.chaos import JOB_NAME

service = QueueService()

_ledgers: dict[str, int] = {}


def record(ledger: str, event: str, message: QueueMessage) -> None:
    """Append one ``event`` line for ``message`` to ``ledger``."""
    fd = _ledgers.get(ledger)
    if fd is None:
        fd = _ledgers[ledger] = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    line = f"{event} {message.id} {message.attempt} {os.getpid()} {time.time_ns()}\n"
    os.write(fd, line.encode())


@service.handler(JOB_NAME)
async def chaos_job(message: QueueMessage) -> None:
    """Record the start, work for ``data["ms"]`` milliseconds, record the end."""
    data = message.data
    if not isinstance(data, dict) or not isinstance(data.get("ledger"), str):
        raise UnrecoverableError('chaos jobs carry {"ledger": PATH, "ms": N}')
    record(data["ledger"], "start", message)
    work_ms = data.get("ms", 0)
    if isinstance(work_ms, int | float) and work_ms > 0:
        await asyncio.sleep(work_ms / 1000)
    record(data["ledger"], "done", message)
