"""The SQLite backend (the default): an embedded queue in one database file."""

from corral.backends.sqlite.backend import SQLiteBackend
from corral.backends.sqlite.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SQLiteBackend"]
