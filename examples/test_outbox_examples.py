"""The outbox examples run as written, against the machine's PostgreSQL and a SQLite file."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("sqlalchemy")

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def schema() -> Iterator[str]:
    try:
        admin = psycopg.connect(PG_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL does not answer at {PG_URL}: {exc}")
    name = f"ex_{uuid.uuid4().hex[:10]}"
    yield name
    admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    admin.close()


def test_psycopg_example_enqueues_the_committed_order_only(schema: str, tmp_path: Path) -> None:
    example = importlib.import_module("outbox_psycopg")
    queue = f"receipts-{uuid.uuid4().hex[:8]}"
    got = example.main(PG_URL, schema=schema, queue=queue, sqlite_path=str(tmp_path / "q.db"))
    assert got == ["receipt-42"]


def test_sqlalchemy_example_on_sqlite(tmp_path: Path) -> None:
    example = importlib.import_module("outbox_sqlalchemy")
    queue = f"receipts-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    assert example.main(url, queue=queue, sqlite_path=str(tmp_path / "q.db")) == ["receipt-7"]


def test_sqlalchemy_example_on_postgresql(schema: str, tmp_path: Path) -> None:
    example = importlib.import_module("outbox_sqlalchemy")
    queue = f"receipts-{uuid.uuid4().hex[:8]}"
    url = PG_URL.replace("postgresql://", "postgresql+psycopg://")
    admin = psycopg.connect(PG_URL, autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")
    admin.close()
    got = example.main(
        url,
        queue=queue,
        table=f"{schema}.corral_outbox",
        schema=schema,
        sqlite_path=str(tmp_path / "q.db"),
    )
    assert got == ["receipt-7"]
