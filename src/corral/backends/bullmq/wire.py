"""Pipelined writes to Redis: pre-packed commands over one dedicated connection.

The one module that uses redis-py's private API (a connection's ``_writer`` and
``read_response``), so a redis-py upgrade that changes it touches this file only.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection

COMMAND_TIMEOUT_S = 30.0
"""A reply later than this: the connection is dropped and its calls fail."""


def bulk(value: Any) -> bytes:
    """``value`` as a RESP bulk string, encoded as the client's redis-py encoder does (UTF-8 with
    ``surrogateescape``: a foreign job's bytes are written back as they were read)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogateescape")
    elif isinstance(value, int) and not isinstance(value, bool):
        data = b"%d" % value
    elif isinstance(value, float):
        data = repr(value).encode()
    else:
        raise redis_errors.DataError(f"cannot send {type(value).__name__} {value!r} to Redis")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack_command(*args: Any) -> bytes:
    """A command in RESP."""
    return b"*%d\r\n" % len(args) + b"".join(map(bulk, args))


class Wire:
    """Pre-packed commands over one dedicated connection, as ioredis carries Node's: a call is
    written at once, one reader task takes the replies in order. No connection pool, no
    per-command encoding, no round trip waited out before the next call is sent.

    A lost connection fails every call in flight with ConnectionError; :meth:`execute` sends a
    call again once on a new connection, as redis-py retries a command on a dropped connection.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        # No socket timeout on the connection: the reader times each batch of replies instead.
        self._options = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection_class = pool.connection_class
        self._connection: AbstractConnection | None = None
        self._connecting = asyncio.Lock()
        self._waiting: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
        self._more: asyncio.Future[None] | None = None  # the idle reader waits on it
        self._reader: asyncio.Task[None] | None = None

    def submit(self, commands: list[bytes]) -> asyncio.Future[list[Any]] | None:
        """Write ``commands`` now; the future gets their replies (an error reply in its place).
        ``None`` when not connected: use :meth:`execute`."""
        connection = self._connection
        writer = connection._writer if connection is not None else None
        if connection is None or writer is None or writer.is_closing():
            return None
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        writer.writelines(commands)
        self._waiting.append((len(commands), future))
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read(connection))
        elif self._more is not None and not self._more.done():
            self._more.set_result(None)
        return future

    async def execute(self, commands: list[bytes], *, retry: bool = True) -> list[Any]:
        """Send ``commands`` (connecting if needed) and wait for their replies."""
        for attempt in range(2 if retry else 1):
            future = self.submit(commands)
            if future is None:
                await self._connect()
                future = self.submit(commands)
                if future is None:
                    raise redis_errors.ConnectionError("the connection to Redis closed")
            writer = self._connection._writer if self._connection is not None else None
            if writer is not None and writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()  # Redis reads slower than we write: wait
            try:
                return await future
            except redis_errors.ConnectionError:
                if attempt or not retry:
                    raise
        raise AssertionError("unreachable")

    async def _read(self, connection: AbstractConnection) -> None:
        waiting = self._waiting
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not waiting:
                    self._more = loop.create_future()
                    await self._more
                    continue
                count, future = waiting[0]
                replies: list[Any] = []
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    for _ in range(count):
                        try:
                            replies.append(await connection.read_response(timeout=math.inf))
                        except redis_errors.ResponseError as exc:
                            replies.append(exc)
                waiting.popleft()
                if not future.done():  # not cancelled by its caller
                    future.set_result(replies)
        except BaseException as exc:
            # The stream is gone or out of step: no later reply on it can be trusted.
            if isinstance(exc, TimeoutError):
                failure: Exception = redis_errors.TimeoutError(
                    f"Redis did not answer within {COMMAND_TIMEOUT_S:g} s"
                )
            elif isinstance(exc, redis_errors.ConnectionError):
                failure = exc
            else:
                failure = redis_errors.ConnectionError(f"connection to Redis lost: {exc!r}")
            self._drop(connection, failure)
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _drop(self, connection: AbstractConnection, failure: Exception) -> None:
        if self._connection is not connection:
            return
        self._connection = None
        self._reader = None
        self._more = None
        waiting, self._waiting = self._waiting, deque()
        for _, future in waiting:
            if not future.done():
                future.set_exception(failure)

    async def _connect(self) -> None:
        async with self._connecting:
            if self._connection is None or self._connection._writer is None:
                connection = self._connection_class(**self._options)
                await connection.connect()  # type: ignore[no-untyped-call]
                self._connection = connection

    async def aclose(self) -> None:
        connection, reader = self._connection, self._reader
        if connection is not None:
            self._drop(connection, redis_errors.ConnectionError("the backend was closed"))
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()
