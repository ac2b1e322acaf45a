"""Live workers: what a running worker says of itself, and how each backend lists them.

- SQLite: each worker loop (``start_consuming``; one per ``corral worker`` process and child)
  keeps a row of the ``workers`` table up to date from its lease heartbeat (every ``lease_s /
  3``), deletes it when it stops, and a row not renewed for three heartbeats is stale: not
  listed, and deleted by the next heartbeat of any worker.
- BullMQ: a worker is the Redis connection it blocks on, named as Node.js names its workers'
  (``<prefix>:<base64(queue)>:w:<name>``): ``CLIENT LIST`` shows the live ones, as Node's
  ``Queue.getWorkers()`` reads them, Node's workers included. Connections of one corral process
  (one per queue) are one worker.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

STALE_BEATS = 3
"""Heartbeats a worker may miss before it is no longer listed."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A live worker. ``None`` marks what the backend does not record (on BullMQ a worker's
    running and done jobs; a Node.js worker's pid)."""

    id: str
    queues: list[str]
    host: str
    pid: int | None
    started_at: datetime | None
    last_seen: datetime | None
    running: int | None = None
    """Jobs it runs now."""
    done: int | None = None
    """Jobs it has settled since it started (completed, failed or retried)."""


@dataclass(slots=True)
class WorkerStats:
    """What a worker loop reports with each heartbeat (kept by the loop, read by a source)."""

    queues: list[str]
    beat_s: float
    """Seconds between heartbeats."""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    id: str = ""
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    running: int = 0
    done: int = 0

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.host}:{self.pid}:{secrets.token_hex(4)}"

    @property
    def stale_after_ms(self) -> int:
        """How long the worker's last heartbeat stays valid."""
        return max(1_000, round(self.beat_s * STALE_BEATS * 1000))


# -- BullMQ: the named connections of CLIENT LIST ---------------------------------------------

_CORRAL_NAME = re.compile(r"^corral-(?P<host>.+)-(?P<pid>\d+)$")


def worker_of_client(prefix: str, client: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(queue, worker name)`` of a ``CLIENT LIST`` entry whose name Node's getWorkers()
    matches under ``prefix`` (``<prefix>:<base64(queue)>`` or ``...:w:<name>``), else ``None``."""
    name = str(client.get("name") or "")
    head = prefix + ":"
    if not name.startswith(head):
        return None
    encoded, marker, worker = name[len(head) :].partition(":w:")
    if not marker and ":" in encoded:
        return None  # another client of the queue (QueueEvents' ``:qe``, ...)
    try:
        queue = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (queue, worker) if queue else None


def workers_from_clients(
    prefix: str, clients: Iterable[Mapping[str, Any]], *, now: datetime | None = None
) -> list[WorkerInfo]:
    """The workers among ``CLIENT LIST`` entries, a corral process's connections as one."""
    now = now or datetime.now(UTC)
    groups: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for client in clients:
        found = worker_of_client(prefix, client)
        if found is None:
            continue
        queue, worker = found
        addr_host = str(client.get("addr") or "").rpartition(":")[0]
        key = worker if _CORRAL_NAME.match(worker) else f"{client.get('name')}@{client.get('id')}"
        groups.setdefault(key, []).append((queue, {**client, "addr_host": addr_host}))
    listed: list[WorkerInfo] = []
    for key, members in groups.items():
        corral = _CORRAL_NAME.match(key)
        ages = [_int(client.get("age")) for _, client in members]
        idles = [_int(client.get("idle")) for _, client in members]
        listed.append(
            WorkerInfo(
                id=key if corral else str(members[0][1].get("name")),
                queues=sorted({queue for queue, _ in members}),
                host=corral["host"] if corral else str(members[0][1]["addr_host"]),
                pid=int(corral["pid"]) if corral else None,
                started_at=now - timedelta(seconds=max(ages)),
                last_seen=now - timedelta(seconds=min(idles)),
            )
        )
    return sorted(listed, key=lambda w: (w.queues, w.host, w.id))


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
