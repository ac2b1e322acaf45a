"""Transactional enqueue: a job exists if and only if the caller's database transaction commits.

:meth:`QueueService.enqueue_in_transaction` writes through the caller's own connection, inside
the caller's transaction, and never commits or rolls back itself:

- SQLite queue, and the connection opens the queue's own database file: the job row itself is
  written (with the SQLite backend's own insert); workers see it once the transaction commits.
- Any other case (the queue is on Redis, or the application's database is another SQLite file
  or PostgreSQL): a row in the *outbox* table of the application's database (create it with
  :func:`install` or ``corral outbox install URL``). A relay (:mod:`corral.relay`, inside
  ``corral worker`` when ``QUEUE_OUTBOX_URL`` is set, or ``corral relay``) moves committed rows to
  the queue and deletes each only after the queue acknowledged it. Every row carries a job id
  (generated when the caller gave none), so a row pushed twice (a relay killed between the push
  and the delete) is one job: the queue's duplicate-id rule drops the second push.

Connections accepted: ``sqlite3.Connection``, psycopg 3 ``Connection`` (and ``AsyncConnection``
for the async twin), SQLAlchemy ``Connection``/``Session`` (and their async versions), which are
unwrapped to their DBAPI connection. Django: pass ``django.db.connection.connection`` inside
``transaction.atomic()`` (see the README).
"""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from corral.errors import ConfigError, MissingDependencyError, PayloadError
from corral.message import NewJob

if TYPE_CHECKING:
    from corral.service import QueueService

DEFAULT_TABLE = "corral_outbox"
POSTGRES_EXTRA_HINT = "pip install 'corral[postgres]'"
_IDENT = r"[A-Za-z_][A-Za-z0-9_]{0,62}"
TABLE_NAME_RE = re.compile(rf"^(?:{_IDENT}\.)?{_IDENT}$")
GENERATED_ID_PREFIX = "tx-"

OUTBOX_COLUMNS = "queue, job_id, name, data, delay_ms, priority, attempts, backoff, created_at_ms"


def check_table_name(table: str) -> str:
    """Return ``table`` if it is ``name`` or ``schema.name`` (letters, digits, ``_``)."""
    if not isinstance(table, str) or not TABLE_NAME_RE.match(table):
        raise ValueError(
            "must be a table name, optionally schema-qualified (letters, digits and '_', "
            "e.g. corral_outbox or app.corral_outbox)"
        )
    return table


def new_job_id() -> str:
    """An id for an outbox job the caller gave none: unique, and never a queue-assigned one."""
    return GENERATED_ID_PREFIX + uuid.uuid4().hex


# -- the outbox table --------------------------------------------------------------------------


def schema_sql(dialect: str, table: str = DEFAULT_TABLE) -> list[str]:
    """The statements that create the outbox ``table`` (idempotent), for migration tools.

    ``dialect`` is ``sqlite`` or ``postgresql``. On PostgreSQL a statement-level trigger
    NOTIFYs the relay's channel (:func:`channel_name`) when rows are committed, whoever wrote
    them.
    """
    check_table_name(table)
    if dialect == "sqlite":
        return [
            f"""CREATE TABLE IF NOT EXISTS {table} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    delay_ms INTEGER NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    backoff TEXT,
    created_at_ms INTEGER NOT NULL,
    claimed_until_ms INTEGER,
    claim_token TEXT,
    last_error TEXT
)"""
        ]
    if dialect == "postgresql":
        schema, _, bare = table.rpartition(".")
        function = f"{schema + '.' if schema else ''}{bare}_notify"
        return [
            f"""CREATE TABLE IF NOT EXISTS {table} (
    id BIGSERIAL PRIMARY KEY,
    queue TEXT NOT NULL,
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    delay_ms BIGINT NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    backoff TEXT,
    created_at_ms BIGINT NOT NULL,
    last_error TEXT
)""",
            f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel_name(table)}', '');
    RETURN NULL;
END
$$""",
            f"DROP TRIGGER IF EXISTS {bare}_notify ON {table}",
            f"CREATE TRIGGER {bare}_notify AFTER INSERT ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
        ]
    raise ConfigError(f"unknown outbox dialect {dialect!r}; use 'sqlite' or 'postgresql'")


def channel_name(table: str) -> str:
    """The LISTEN/NOTIFY channel of the outbox ``table`` on PostgreSQL."""
    return f"corral_{table.replace('.', '_')}"[:63]


def install(conn: Any, table: str = DEFAULT_TABLE) -> None:
    """Create the outbox ``table`` through ``conn``; idempotent. ``corral outbox install URL``
    does the same.

    A ``sqlite3`` or psycopg connection is committed; a SQLAlchemy ``Connection``/``Session``
    is not (its transaction, e.g. ``engine.begin()`` or a migration's, commits the table).
    """
    raw = unwrap(conn)
    if isinstance(raw, sqlite3.Connection):
        dialect = "sqlite"
    elif _is_psycopg(raw):
        dialect = "postgresql"
    else:
        raise _unsupported(conn)
    for statement in schema_sql(dialect, table):
        raw.execute(statement)
    if raw is conn:
        raw.commit()


# -- outbox URLs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxLocation:
    """Where an outbox lives: a SQLite file, or a PostgreSQL conninfo URL."""

    dialect: str
    target: str
    """The SQLite file path, or the PostgreSQL URL as psycopg takes it."""


def parse_outbox_url(url: str) -> OutboxLocation:
    """``sqlite:///app.db`` (relative), ``sqlite:////abs/app.db`` or ``postgresql://...``
    (``postgres://`` and SQLAlchemy's ``postgresql+psycopg://`` too).

    Raises:
        ValueError: anything else.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme in ("sqlite", "sqlite3"):
        if parts.netloc:
            raise ValueError(
                "names a host; a SQLite file is sqlite:///relative.db or sqlite:////abs.db"
            )
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ValueError("names no file; use sqlite:///app.db")
        return OutboxLocation("sqlite", path)
    base = scheme.split("+", 1)[0]
    if base in ("postgresql", "postgres"):
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("has no host; use postgresql://user:password@host:5432/db")
        return OutboxLocation("postgresql", url.replace(parts.scheme + "://", "postgresql://", 1))
    raise ValueError("must start with sqlite:/// or postgresql://")


# -- connections --------------------------------------------------------------------------------


def unwrap(conn: Any) -> Any:
    """The DBAPI connection under a SQLAlchemy ``Connection`` or ``Session`` (the session's
    connection, which begins its transaction if none is open); anything else as it is."""
    module = type(conn).__module__
    if module.startswith("sqlalchemy"):
        if hasattr(conn, "get_bind") and callable(getattr(conn, "connection", None)):
            conn = conn.connection()  # a Session: the Connection of its transaction
        pooled = getattr(conn, "connection", None)
        raw = getattr(pooled, "dbapi_connection", None)
        if raw is None:
            raise ConfigError(
                f"cannot find the DBAPI connection of {type(conn).__name__}; pass a "
                "sqlalchemy Connection or Session, or the DBAPI connection itself"
            )
        return raw
    return conn


async def unwrap_async(conn: Any) -> Any:
    """:func:`unwrap` for SQLAlchemy's ``AsyncConnection``/``AsyncSession``: the driver's own
    async connection (psycopg's ``AsyncConnection``)."""
    module = type(conn).__module__
    if module.startswith("sqlalchemy.ext.asyncio"):
        if hasattr(conn, "get_bind") and hasattr(conn, "sync_session"):
            conn = await conn.connection()  # an AsyncSession
        raw = await conn.get_raw_connection()
        return raw.driver_connection
    return unwrap(conn)


def _is_psycopg(conn: Any) -> bool:
    return type(conn).__module__.startswith("psycopg")


def _unsupported(conn: Any) -> ConfigError:
    return ConfigError(
        f"enqueue_in_transaction cannot write through a {type(conn).__module__}."
        f"{type(conn).__name__}; pass a sqlite3 or psycopg 3 connection, or a SQLAlchemy "
        "Connection/Session on one of them (Django: django.db.connection.connection)"
    )


# -- writing --------------------------------------------------------------------------------------


def outbox_row(job: NewJob, queue: str, now_ms: int) -> tuple[Any, ...]:
    """The values of :data:`OUTBOX_COLUMNS` for ``job``."""
    import json

    return (
        job.queue or queue,
        job.job_id,
        job.name,
        job.data_json,
        job.delay_ms,
        job.priority,
        job.attempts,
        json.dumps(job.backoff.to_bullmq()) if job.backoff else None,
        now_ms,
    )


def enqueue_in_transaction(
    service: QueueService, conn: Any, name: str, data: Any, options: dict[str, Any]
) -> str:
    """See :meth:`QueueService.enqueue_in_transaction`."""
    job = _build(service, name, data, options)  # refused here, before anything is written
    raw = unwrap(conn)
    if isinstance(raw, sqlite3.Connection):
        _check_sqlite_transaction(raw)
        if _opens_queue_file(raw, service):
            return _insert_job(raw, job, service)
        return _insert_outbox_sqlite(raw, job, service)
    if _is_psycopg(raw):
        if type(raw).__name__.startswith("Async"):
            raise ConfigError(
                "this is an async connection: use await service.enqueue_in_transaction_async()"
            )
        _check_psycopg_transaction(raw)
        sql, params = _outbox_insert_pg(job, service)
        try:
            raw.execute(sql, params)
        except Exception as exc:
            raise _pg_error(exc, service) from exc
        return str(params[1])
    raise _unsupported(conn)


async def enqueue_in_transaction_async(
    service: QueueService, conn: Any, name: str, data: Any, options: dict[str, Any]
) -> str:
    """See :meth:`QueueService.enqueue_in_transaction_async`."""
    job = _build(service, name, data, options)
    raw = await unwrap_async(conn)
    if _is_psycopg(raw) and type(raw).__name__.startswith("Async"):
        _check_psycopg_transaction(raw)
        sql, params = _outbox_insert_pg(job, service)
        try:
            await raw.execute(sql, params)
        except Exception as exc:
            raise _pg_error(exc, service) from exc
        return str(params[1])
    if isinstance(raw, sqlite3.Connection) or _is_psycopg(raw):
        # A synchronous connection: the write is one short statement.
        return enqueue_in_transaction(service, raw, name, data, options)
    raise _unsupported(conn)


def _build(service: QueueService, name: str, data: Any, options: dict[str, Any]) -> NewJob:
    if options.get("deduplication") is not None:
        raise PayloadError(
            "deduplication is not an option of enqueue_in_transaction (the job is written in "
            "your transaction or by the relay, not by an enqueue that checks it); give it a "
            "job_id to make it idempotent"
        )
    return service.build_job(name, data, **options)


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def _check_sqlite_transaction(conn: sqlite3.Connection) -> None:
    # In sqlite3's default mode the driver opens a transaction before an INSERT; with
    # autocommit (isolation_level=None, or autocommit=True) only an explicit BEGIN does.
    autocommit = getattr(conn, "autocommit", -1) is True or conn.isolation_level is None
    if autocommit and not conn.in_transaction:
        raise ConfigError(
            "the sqlite3 connection is in autocommit mode with no transaction open, so the "
            "job would be committed on its own; execute BEGIN first (or use the default mode)"
        )


def _check_psycopg_transaction(conn: Any) -> None:
    from psycopg.pq import TransactionStatus

    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise ConfigError(
            "the psycopg connection is in autocommit mode with no transaction open, so the "
            "job would be committed on its own; use `with conn.transaction():` around it"
        )


def _opens_queue_file(conn: sqlite3.Connection, service: QueueService) -> bool:
    settings = service.settings
    if settings.backend != "sqlite" or settings.sqlite_path == ":memory:":
        return False
    for _, schema, path in conn.execute("PRAGMA database_list").fetchall():
        if schema == "main":
            return bool(path) and os.path.realpath(path) == os.path.realpath(settings.sqlite_path)
    return False


def _insert_job(conn: sqlite3.Connection, job: NewJob, service: QueueService) -> str:
    """The job row itself, in the caller's transaction, with the backend's own insert."""
    from corral.backends.sqlite.backend import job_row
    from corral.backends.sqlite.database import Database
    from corral.backends.sqlite.schema import INSERT, SCHEMA_VERSION, check_not_newer

    path = service.settings.sqlite_path
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    check_not_newer(version, path)
    if version < SCHEMA_VERSION:
        if conn.in_transaction:
            raise ConfigError(
                f"the queue database {path!r} has not been created or migrated by this corral "
                "yet, and this transaction holds it; open the queue once first (a worker, "
                "`corral stats`, or any enqueue) or call this before the transaction's writes"
            )
        db = Database(path, poll_interval_s=service.settings.poll_interval_s)
        try:
            db.conn  # noqa: B018  (opening migrates the file)
        finally:
            db.close()
    row = job_row(job, service.settings.name, _now_ms())
    found = conn.execute(INSERT + " ON CONFLICT DO NOTHING RETURNING seq", row).fetchone()
    if job.job_id is not None:
        return job.job_id  # inserted now, or the existing job's (left as it is)
    return str(found[0])


def _insert_outbox_sqlite(conn: sqlite3.Connection, job: NewJob, service: QueueService) -> str:
    if job.job_id is None:
        job.job_id = new_job_id()
    table = service.settings.outbox_table
    marks = ", ".join("?" * len(OUTBOX_COLUMNS.split(", ")))
    try:
        conn.execute(
            f"INSERT INTO {table} ({OUTBOX_COLUMNS}) VALUES ({marks})",
            outbox_row(job, service.settings.name, _now_ms()),
        )
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise ConfigError(_missing_table(table)) from exc
        raise
    return job.job_id


def _outbox_insert_pg(job: NewJob, service: QueueService) -> tuple[str, Sequence[Any]]:
    if job.job_id is None:
        job.job_id = new_job_id()
    marks = ", ".join(["%s"] * len(OUTBOX_COLUMNS.split(", ")))
    sql = f"INSERT INTO {service.settings.outbox_table} ({OUTBOX_COLUMNS}) VALUES ({marks})"
    return sql, outbox_row(job, service.settings.name, _now_ms())


def _pg_error(exc: Exception, service: QueueService) -> Exception:
    try:
        from psycopg import errors
    except ImportError:  # pragma: no cover - a psycopg connection implies psycopg
        return exc
    if isinstance(exc, errors.UndefinedTable):
        return ConfigError(_missing_table(service.settings.outbox_table))
    return exc


def _missing_table(table: str) -> str:
    return (
        f"the outbox table {table!r} does not exist in this database; create it once with "
        f"corral.outbox.install(conn, {table!r}) or `corral outbox install URL --table {table}` "
        "(the transaction is now aborted: roll it back)"
    )


def require_psycopg() -> Any:
    """The psycopg module, or a MissingDependencyError naming the extra."""
    try:
        import psycopg
    except ImportError as exc:
        raise MissingDependencyError(
            f"a PostgreSQL outbox needs psycopg 3 ({exc.name or exc} is not installed); "
            f"install it with: {POSTGRES_EXTRA_HINT}"
        ) from exc
    return psycopg
