"""corral in one minute: enqueue a batch of jobs, drain them with a worker, print the stats.

Run it with ``make demo`` (or ``python examples/demo.py`` in an environment with corral).
It uses the SQLite backend in a file under the system's temp directory, unless QUEUE_BACKEND /
QUEUE_SQLITE_PATH say otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import demo_tasks
from rich.console import Console

from corral import JobState, QueueService, QueueSettings
from corral.cli import counts_table
from corral.worker import configure_logging

console = Console(highlight=False, soft_wrap=True)


def demo_settings() -> QueueSettings:
    """The environment's settings, with a throw-away SQLite file and queue name by default."""
    defaults: dict[str, str] = {"name": "demo"}
    if "QUEUE_SQLITE_PATH" not in os.environ:
        defaults["sqlite_path"] = str(Path(tempfile.gettempdir()) / "corral-demo" / "demo.db")
    settings = QueueSettings(**defaults)
    if settings.backend == "sqlite":
        Path(settings.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
    return settings


async def main() -> int:
    configure_logging(default="info")
    settings = demo_settings()
    async with QueueService(settings) as service:
        service.include(demo_tasks.service)
        await service.purge()  # start from an empty queue on every run

        ids = await service.enqueue_many(
            [
                *(
                    {"name": "resize_image", "data": {"path": f"photos/{n}.jpg", "width": 320}}
                    for n in range(8)
                ),
                *({"name": "send_email", "data": {"to": f"user{n}@example.com"}} for n in range(4)),
                {"name": "build_report", "data": {"rows": 50_000}, "priority": 1},
                {"name": "build_report", "data": {"rows": 80_000}, "priority": 1},
                {"name": "charge_card", "data": {"cents": 1250}, "job_id": "order-1001"},
                {"name": "charge_card", "data": {"cents": -5}, "job_id": "order-1002"},
            ]
        )
        # The same job id again: nothing is added, the existing job's id comes back.
        again = await service.enqueue("charge_card", {"cents": 1250}, job_id="order-1001")
        console.print(
            f"enqueued {len(ids)} jobs on {settings.backend}; "
            f"enqueuing order-1001 again returned {again!r} and added nothing"
        )

        # Burst mode: run until nothing is ready. Failed emails come back 0.3 s later, so
        # run again until no retry is pending.
        for _ in range(10):
            await service.start_worker(concurrency=4, burst=True)
            if (await service.counts())[JobState.DELAYED] == 0:
                break
            await asyncio.sleep(0.35)

        counts = await service.counts()
        console.print()
        console.print(f"queue {settings.name!r} after the worker drained it:")
        console.print(counts_table(counts))
        for job in await service.list_jobs(JobState.FAILED):
            console.print(f"failed: {job.id} {job.name}: {job.error}", markup=False)
        email = await service.get_job(ids[8])
        if email is not None:
            console.print(
                f"retried: {email.id} {email.name} completed on attempt {email.attempts_made} "
                f"-> {email.result}",
                markup=False,
            )
    if settings.backend == "sqlite":
        corral = shutil.which("corral") or str(Path(sys.executable).parent / "corral")
        console.print()
        console.print("Look around with the CLI:", markup=False)
        base = f"{corral} --sqlite-path {settings.sqlite_path} --queue {settings.name}"
        console.print(f"  {base} jobs --state failed", markup=False)
        console.print(f"  {base} job {ids[0]}", markup=False)
    expected_failures = 1
    return 0 if counts[JobState.FAILED] == expected_failures and not counts[JobState.WAITING] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
