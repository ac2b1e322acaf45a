"""Reading a queue's BullMQ event stream (``<prefix>:<queue>:events``).

BullMQ's scripts (corral's and Node's alike) append an entry to the stream on every change of a
job: ``event`` (``added``, ``active``, ``completed``, ``failed``, ...), ``jobId`` and the event's
own fields, trimmed to about ``maxLenEvents`` entries. :class:`StreamReader` reads it with a
blocking ``XREAD`` on a connection of its own, so a reader never holds up the pooled connection
the producers and workers share; :class:`StreamWatch` is ``wait_for``'s watch of one job on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from corral.backends.base import EventFeed, JobEnd, JobWatch
from corral.backends.bullmq.connection import CLOSE_TIMEOUT_S, RedisStore, node_url
from corral.errors import ConfigError
from corral.message import Event
from corral.payload import decode_lenient

MAX_BLOCK_S = 5.0
"""The longest one ``XREAD`` blocks: a waiter longer than that blocks again."""

_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


class StreamReader(EventFeed):
    """Blocking reads of one queue's event stream, on a connection of its own."""

    def __init__(self, store: RedisStore, queue: str) -> None:
        self.store = store
        self.key = store.protocol.keys.of(queue)["events"]
        self._client: aioredis.Redis | None = None

    async def _connection(self) -> aioredis.Redis:
        """A single connection, to the node serving the stream's slot on a cluster."""
        if self._client is None:
            url = self.store.settings.redis_url
            shared = self.store.client()
            if isinstance(shared, RedisCluster):
                await shared.initialize()
                node = shared.get_node_from_key(self.key)
                if node is not None:
                    url = node_url(url, node.host, int(node.port))
            self._client = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                encoding_errors="surrogateescape",
                single_connection_client=True,
                socket_connect_timeout=5.0,
                socket_timeout=MAX_BLOCK_S + 5.0,
                retry=RedisRetry(NoBackoff(), 1),
            )
        return self._client

    async def last_id(self) -> str:
        with self.store.errors("reading the queue's events"):
            client = await self._connection()
            newest: Any = await client.xrevrange(self.key, count=1)
        return str(newest[0][0]) if newest else self.START

    async def read(self, after: str, *, block_s: float, count: int) -> list[Event]:
        """As :meth:`EventFeed.read`; one call blocks at most :data:`MAX_BLOCK_S`."""
        if not isinstance(after, str) or not _STREAM_ID.fullmatch(after):
            raise ConfigError(f"{after!r} is not an event id of a BullMQ events stream")
        block_ms = max(1, round(min(block_s, MAX_BLOCK_S) * 1000))
        with self.store.errors("reading the queue's events"):
            client = await self._connection()
            reply: Any = await client.xread({self.key: after}, count=count, block=block_ms)
        if not reply:
            return []
        _key, entries = reply[0]
        events = []
        for entry_id, raw in entries:
            fields = dict(raw or {})
            name = fields.pop("event", "")
            events.append(Event(str(entry_id), name, fields.pop("jobId", None), fields))
        return events

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT_S)


class StreamWatch(JobWatch):
    """Wakes on the stream's entries about one job; remembers how the job ended."""

    tells_end = True

    def __init__(self, reader: StreamReader, job_id: str, after: str) -> None:
        self.reader = reader
        self.job_id = job_id
        self.after = after

    @classmethod
    async def open(cls, store: RedisStore, queue: str, job_id: str) -> StreamWatch:
        reader = StreamReader(store, queue)
        try:
            return cls(reader, job_id, await reader.last_id())
        except BaseException:
            await reader.aclose()
            raise

    async def wait(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining_s := deadline - loop.time()) > 0:
            events = await self.reader.read(self.after, block_s=remaining_s, count=500)
            if not events:
                continue
            self.after = events[-1].id
            mine = [event for event in events if event.job_id == self.job_id]
            for event in mine:
                if event.name == "completed":
                    value = decode_lenient(event.fields.get("returnvalue", "null"))
                    self.ended = JobEnd(True, value)
                elif event.name == "failed":
                    self.ended = JobEnd(False, reason=event.fields.get("failedReason", ""))
            if mine:
                return

    async def aclose(self) -> None:
        await self.reader.aclose()
