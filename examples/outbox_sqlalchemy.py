"""Transactional enqueue from a SQLAlchemy application: pass the Session (or Connection) that
holds the transaction; the job commits or rolls back with it.

    python examples/outbox_sqlalchemy.py postgresql+psycopg://postgres@127.0.0.1/test

Works the same with `sqlite:///app.db`. corral unwraps the Session to its DBAPI connection and
writes an outbox row there; the relay moves it to the queue after the commit.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from sqlalchemy import Integer, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from corral import QueueService, QueueSettings, outbox
from corral.relay import Relay


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


def main(
    url: str,
    queue: str = "receipts",
    table: str = "corral_outbox",
    schema: str | None = None,
    **queue_settings: Any,
) -> list[str]:
    """Place an order (committed) and another (rolled back); return the queue's job ids.
    ``schema`` puts the ORM's tables in that schema (PostgreSQL)."""
    options = {"schema_translate_map": {None: schema}} if schema else {}
    engine = create_engine(url, execution_options=options)
    Base.metadata.create_all(engine)
    settings = QueueSettings(
        name=queue,
        outbox_url=url.replace("+psycopg", ""),
        outbox_table=table,
        **queue_settings,
    )
    service = QueueService(settings)
    with engine.begin() as conn:
        outbox.install(conn, table)  # once, or in an Alembic migration (outbox.schema_sql)

    with Session(engine) as session, session.begin():
        session.add(Order(id=7))
        service.enqueue_in_transaction(session, "send_receipt", {"order": 7}, job_id="receipt-7")

    with Session(engine) as session:
        session.add(Order(id=8))
        service.enqueue_in_transaction(session, "send_receipt", {"order": 8}, job_id="receipt-8")
        session.rollback()  # no order 8, no receipt job

    async def relay_and_list() -> list[str]:
        relay = Relay(settings, service.backend)
        await relay.drain()
        await relay.close()
        jobs = await service.list_jobs("waiting")
        await service.close()
        return [job.id for job in jobs]

    try:
        return asyncio.run(relay_and_list())
    finally:
        engine.dispose()


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///shop.db"))
