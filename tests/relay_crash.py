"""A relay that pushes one batch to the queue and then hangs before deleting its outbox rows,
so that a test can kill it (SIGKILL) exactly between "pushed" and "deleted". Settings come from
the QUEUE_* environment; argv[1] is a file written once the push was acknowledged."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from corral import QueueService, QueueSettings
from corral.relay import OutboxRow, Relay


async def main(marker: Path) -> None:
    settings = QueueSettings()
    service = QueueService(settings)
    relay = Relay(settings, service.backend)
    push = relay._push

    async def push_then_hang(rows: list[OutboxRow]) -> dict[int, str]:
        bad = await push(rows)
        await asyncio.to_thread(marker.write_text, str(len(rows)))
        await asyncio.sleep(3600)
        return bad

    relay._push = push_then_hang  # type: ignore[method-assign]
    await relay.drain()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
