"""Transactional enqueue from Django (documented code: it needs a Django project to run).

Django's ``connection.connection`` is the DBAPI connection of the current thread (psycopg 3 on
PostgreSQL, sqlite3 on SQLite); inside ``transaction.atomic()`` the job commits or rolls back with
the model writes. Create the outbox table with a migration running
``corral.outbox.schema_sql("postgresql")`` (``migrations.RunSQL``) or once with
``corral outbox install $DATABASE_URL``.
"""

from __future__ import annotations

from typing import Any

from django.db import connection, transaction  # type: ignore[import-not-found]

from corral import QueueService

service = QueueService()  # QUEUE_OUTBOX_URL points at the same database for the relay


def place_order(order_model: Any, order_id: int) -> str:
    with transaction.atomic():
        order_model.objects.create(id=order_id)
        connection.ensure_connection()
        return service.enqueue_in_transaction(
            connection.connection, "send_receipt", {"order": order_id}
        )
