"""What the machine allows, measured in the benchmark's own run: the ceilings corral's figures are
shown against (``corral bench``, ``bench/compare.py``).

- SQLite: rows inserted per second into a file with corral's pragmas (WAL,
  ``synchronous=NORMAL``), one transaction per row (autocommit) and in transactions of
  ``batch`` rows;
- Redis: round trips per second of one client sending ``PING`` and waiting for each reply,
  commands per second when pipelined, and calls per second of a no-op Lua script
  (``EVALSHA`` of ``return 0``) one at a time and pipelined.

Redis is spoken to over a raw socket, so the figures are the server's and the loopback's, not a
client library's. Each figure runs for a fixed time and counts what it did.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

LIMIT_LABELS = {
    "sqlite_insert_autocommit_per_s": "SQLite inserts/s, one per transaction",
    "sqlite_insert_batched_per_s": "SQLite inserts/s, batched",
    "redis_round_trips_per_s": "Redis round trips/s, one client",
    "redis_pipelined_per_s": "Redis commands/s, pipelined",
    "redis_lua_one_per_s": "Redis no-op Lua calls/s, one at a time",
    "redis_lua_pipelined_per_s": "Redis no-op Lua calls/s, pipelined",
}
"""Every figure :func:`measure_limits` may return, and how the report names it."""

PIPELINE = 100
"""Commands written at once in the pipelined figures."""
_PAYLOAD = '{"n":12345,"at":1700000000000}'  # about a bench job's payload


def _rate(step: Callable[[], int], duration_s: float) -> float:
    """Call ``step`` (which returns how many operations it did) for ``duration_s``; per second."""
    step()  # warm-up: connections, caches, the first page of the file
    done = 0
    began = time.perf_counter()
    while True:
        done += step()
        elapsed = time.perf_counter() - began
        if elapsed >= duration_s:
            return done / elapsed


def sqlite_limits(workdir: Path, *, batch: int, duration_s: float) -> dict[str, float]:
    """Inserts per second, autocommit and batched, with the pragmas corral's backend uses."""
    path = workdir / "limits.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE rows (seq INTEGER PRIMARY KEY, data TEXT NOT NULL)")
        sql = "INSERT INTO rows (data) VALUES (?)"

        def one() -> int:
            conn.execute(sql, (_PAYLOAD,))
            return 1

        rows = [(_PAYLOAD,)] * batch

        def batched() -> int:
            conn.execute("BEGIN")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
            return batch

        return {
            "sqlite_insert_autocommit_per_s": _rate(one, duration_s),
            "sqlite_insert_batched_per_s": _rate(batched, duration_s),
        }
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


class _Resp:
    """Commands in RESP over a plain socket, replies counted by their known length."""

    def __init__(self, host: str, port: int, db: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if db:
            self.call(_command("SELECT", str(db)), len(b"+OK\r\n"))

    def call(self, request: bytes, reply_bytes: int) -> bytes:
        self.sock.sendall(request)
        received = b""
        while len(received) < reply_bytes:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            received += chunk
        return received

    def close(self) -> None:
        self.sock.close()


def _command(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def redis_limits(url: str, *, duration_s: float) -> dict[str, float]:
    """Round trips, pipelined commands and no-op Lua calls per second on the Redis at ``url``."""
    parts = urlsplit(url)
    db = int(parts.path.lstrip("/") or 0)
    resp = _Resp(parts.hostname or "127.0.0.1", parts.port or 6379, db)
    try:
        ping, pong = _command("PING"), len(b"+PONG\r\n")
        loaded = resp.call(_command("SCRIPT", "LOAD", "return 0"), 47)  # $40 + sha + CRLFs
        sha = loaded.split(b"\r\n")[1].decode()
        lua, zero = _command("EVALSHA", sha, "0"), len(b":0\r\n")

        def rounds(request: bytes, reply_bytes: int, count: int) -> Callable[[], int]:
            def step() -> int:
                resp.call(request * count, reply_bytes * count)
                return count

            return step

        return {
            "redis_round_trips_per_s": _rate(rounds(ping, pong, 1), duration_s),
            "redis_pipelined_per_s": _rate(rounds(ping, pong, PIPELINE), duration_s),
            "redis_lua_one_per_s": _rate(rounds(lua, zero, 1), duration_s),
            "redis_lua_pipelined_per_s": _rate(rounds(lua, zero, PIPELINE), duration_s),
        }
    finally:
        resp.close()


def measure_limits(
    workdir: Path, *, redis_url: str | None, batch: int, duration_s: float
) -> tuple[dict[str, float], list[str]]:
    """Every limit that can be measured here (Redis only with ``redis_url``), rounded, and the
    errors of those that could not."""
    limits: dict[str, float] = {}
    errors: list[str] = []
    try:
        limits.update(sqlite_limits(workdir, batch=batch, duration_s=duration_s))
    except (sqlite3.Error, OSError) as exc:
        errors.append(f"SQLite limits: {exc}")
    if redis_url is not None:
        try:
            limits.update(redis_limits(redis_url, duration_s=duration_s))
        except (OSError, ValueError, IndexError) as exc:
            errors.append(f"Redis limits: {exc}")
    return {name: round(value) for name, value in limits.items()}, errors
