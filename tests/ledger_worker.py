"""A worker process for crash and load tests: every execution is appended to a ledger file.

Usage: python ledger_worker.py LEDGER  (queue settings come from QUEUE_* variables)
Job data: {"sleep_s": float} to make a job take a while; {"die": true} kills the process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from corral import QueueMessage, QueueService


def main() -> None:
    ledger_path = sys.argv[1]
    service = QueueService()
    fd = os.open(ledger_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @service.handler("record")
    async def record(message: QueueMessage) -> None:
        data = message.data if isinstance(message.data, dict) else {}
        os.write(fd, f"start {message.id} {message.attempt} {os.getpid()}\n".encode())
        if data.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        if data.get("sleep_s"):
            await asyncio.sleep(float(data["sleep_s"]))
        os.write(fd, f"done {message.id} {message.attempt} {os.getpid()}\n".encode())

    async def run() -> None:
        await service.counts()  # connected (its backend imported and reachable) before "ready"
        loop = asyncio.get_running_loop()
        # No await between these and start_worker, which takes a stop request from then on: a
        # signal handled in between would be forgotten.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        os.write(fd, f"ready - - {os.getpid()}\n".encode())
        try:
            await service.start_worker(burst=os.environ.get("LEDGER_BURST") == "1")
        finally:
            await service.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
