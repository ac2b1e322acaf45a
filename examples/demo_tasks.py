"""An example task module: handlers a worker loads with ``corral worker demo_tasks``.

A task module defines a ``QueueService`` and registers handlers on it. The worker builds its own
service from the settings and takes the handlers of every ``QueueService`` it finds here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from corral import QueueMessage, QueueService, Retry, UnrecoverableError

service = QueueService()


@service.handler("resize_image", timeout_s=30)
async def resize_image(message: QueueMessage) -> dict[str, Any]:
    """An async handler: it runs on the worker's event loop and reports progress as it goes."""
    path: str = message.data["path"]
    width: int = message.data["width"]
    for percent in (25, 50, 75, 100):
        await asyncio.sleep(0.02)  # stands in for the real work
        await message.progress(percent)
    stem, _, extension = path.rpartition(".")
    thumbnail = f"{stem}-{width}w.{extension}"
    await message.log(f"wrote {thumbnail}")
    return {"thumbnail": thumbnail}


@service.handler("send_email", attempts=3, backoff=Retry.fixed(0.3))
def send_email(message: QueueMessage) -> dict[str, Any]:
    """A plain function: it runs in a thread pool, so blocking calls are fine.

    The first attempt of every email fails, as a flaky mail server would; the job is retried
    0.3 s later and then succeeds.
    """
    if message.attempt == 1:
        raise ConnectionError("mail server did not answer (simulated)")
    time.sleep(0.01)
    return {"delivered_to": message.data["to"], "attempt": message.attempt}


@service.handler("build_report")
def build_report(message: QueueMessage) -> dict[str, Any]:
    """A CPU-bound function, kept short."""
    rows = int(message.data["rows"])
    return {"rows": rows, "checksum": sum(i * i for i in range(rows)) % 1_000_003}


@service.handler("charge_card", attempts=5)
async def charge_card(message: QueueMessage) -> dict[str, Any]:
    """Some errors are not worth retrying: UnrecoverableError fails the job at once."""
    cents = message.data["cents"]
    if cents <= 0:
        raise UnrecoverableError(f"cannot charge {cents} cents; not retrying")
    await asyncio.sleep(0.01)
    return {"charged_cents": cents}
