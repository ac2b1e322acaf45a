"""Transactional enqueue from a psycopg 3 application: the receipt job exists if and only if the
order's transaction commits, whatever crashes in between.

    QUEUE_BACKEND=bullmq python examples/outbox_psycopg.py postgresql://postgres@127.0.0.1/test

The outbox table lives in the application's database; the relay moves committed rows to the
queue (here once, by hand; in production `corral worker` with QUEUE_OUTBOX_URL set, or
`corral relay`, runs it all the time).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import psycopg

from corral import QueueService, QueueSettings, outbox
from corral.relay import Relay


def place_order(conn: psycopg.Connection, service: QueueService, order_id: int) -> str:
    """The order row and its receipt job, in one transaction."""
    with conn.transaction():
        conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
        return service.enqueue_in_transaction(
            conn, "send_receipt", {"order": order_id}, job_id=f"receipt-{order_id}"
        )


def main(
    url: str, schema: str = "shop", queue: str = "receipts", **queue_settings: Any
) -> list[str]:
    """Place two orders, one of which fails, relay the outbox; return the queue's job ids."""
    settings = QueueSettings(
        name=queue, outbox_url=url, outbox_table=f"{schema}.corral_outbox", **queue_settings
    )
    service = QueueService(settings)
    with psycopg.connect(url) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {schema}.orders (id INT PRIMARY KEY)")
        conn.execute(f"SET search_path TO {schema}")
        conn.commit()
        outbox.install(conn, settings.outbox_table)  # once, or in a migration
        place_order(conn, service, 42)
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            place_order(conn, service, 42)  # a duplicate order: the transaction rolls back

    async def relay_and_list() -> list[str]:
        relay = Relay(settings, service.backend)
        await relay.drain()
        await relay.close()
        jobs = await service.list_jobs("waiting")
        await service.close()
        return [job.id for job in jobs]

    return asyncio.run(relay_and_list())


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1/test"))
