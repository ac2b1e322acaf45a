"""Task module for the flow tests with worker processes: parts and the parents that assemble them.

Every handler appends ``<event> <job id> <pid>`` to the file named by ``data["out"]``, so the
test (another process) sees what ran, in what order and where.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from corral import QueueMessage, QueueService

service = QueueService()


def trace(message: QueueMessage, event: str, detail: Any = None) -> None:
    line = f"{event} {message.id} {os.getpid()}"
    if detail is not None:
        line += " " + json.dumps(detail, sort_keys=True)
    with open(message.data["out"], "a", encoding="utf-8") as out:
        out.write(line + "\n")


@service.handler("part")
def part(message: QueueMessage) -> int:
    """``data["n"] * 10``; with ``data["hang_once"]`` its first run hangs (to be killed)."""
    trace(message, "start")
    if message.data.get("hang_once"):
        marker = Path(message.data["out"] + f".{message.id}.ran")
        if not marker.exists():
            marker.touch()
            time.sleep(600)
    trace(message, "end")
    return int(message.data["n"]) * 10


@service.handler("assemble")
async def assemble(message: QueueMessage) -> int:
    """A parent: the sum of its children's results."""
    results = await message.children_results()
    trace(message, "assemble", results)
    return sum(results.values())
