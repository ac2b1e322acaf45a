"""Pipelined writes to Redis: pre-packed commands over one dedicated connection.

The one module that uses redis-py's private API (a connection's ``_writer``, its parser's error
mapping), so a redis-py upgrade that changes it touches this file only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelManagedConnection

COMMAND_TIMEOUT_S = 30.0
"""No reply for this long while calls wait: the connection is dropped and its calls fail."""


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
    written at once, and its replies are parsed (by hiredis) as their bytes arrive and handed to
    the caller's future from the transport's callback: no reader task, no stream, no
    per-command encoding, no round trip waited out before the next call is sent.

    redis-py makes the connection (TLS, AUTH, SELECT, CLIENT SETNAME, the Sentinel's primary);
    then :class:`_Replies` takes over the reading side of its transport.

    A lost connection fails every call in flight with ConnectionError; :meth:`execute` sends a
    call again once on a new connection, as redis-py retries a command on a dropped connection.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        # No socket timeout on the connection: a watchdog times the replies instead.
        self._options = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection_class = pool.connection_class
        self._connection: AbstractConnection | None = None
        self._replies: _Replies | None = None
        self._connecting = asyncio.Lock()

    def submit(self, commands: list[bytes]) -> asyncio.Future[list[Any]] | None:
        """Write ``commands`` now; the future gets their replies (an error reply in its place).
        ``None`` when not connected: use :meth:`execute`."""
        replies = self._replies
        if replies is None or replies.lost:
            return None
        future: asyncio.Future[list[Any]] = replies.loop.create_future()
        replies.expect(len(commands), future)
        replies.transport.writelines(commands)
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

    def _drop(self, replies: _Replies, failure: Exception) -> None:
        """Fail the calls waiting on ``replies``' connection and forget it."""
        replies.fail(failure)
        if self._replies is not replies:
            return
        connection = self._connection
        self._replies = self._connection = None
        if connection is not None and connection._writer is not None:
            connection._writer.transport.abort()

    async def _connect(self) -> None:
        async with self._connecting:
            if self._replies is not None and not self._replies.lost:
                return
            connection = self._connection_class(**self._options)
            await connection.connect()  # type: ignore[no-untyped-call]
            writer = connection._writer
            assert writer is not None
            self._connection = connection
            self._replies = _Replies(self, writer.transport, self._options)

    async def aclose(self) -> None:
        connection, replies = self._connection, self._replies
        if replies is not None:
            self._drop(replies, redis_errors.ConnectionError("the backend was closed"))
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)


class _Replies(asyncio.Protocol):
    """The reading side of a Wire's connection: bytes in, replies out to the waiting futures in
    the order their commands were written. Flow control and the connection's end also go on to
    the transport's own protocol, so redis-py's writer can still drain and close."""

    def __init__(self, wire: Wire, transport: Any, options: dict[str, Any]) -> None:
        self.wire = wire
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.sentinel = issubclass(wire._connection_class, SentinelManagedConnection)
        encoding = options.get("encoding", "utf-8") if options.get("decode_responses") else None
        self._reader = hiredis.Reader(
            encoding=encoding,
            errors=options.get("encoding_errors", "strict"),
            replyError=BaseParser.parse_error,
        )
        self._waiting: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
        self._batch: list[Any] = []
        self._received = 0  # replies parsed, for the watchdog
        self._watchdog: asyncio.TimerHandle | None = None
        self.lost = False
        self._original = transport.get_protocol()
        transport.set_protocol(self)

    def expect(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self._waiting.append((count, future))
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(COMMAND_TIMEOUT_S, self._check, self._received)

    def data_received(self, data: bytes) -> None:
        reader, waiting, batch = self._reader, self._waiting, self._batch
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                self._received += 1
                if isinstance(reply, redis_errors.ConnectionError):
                    raise reply  # LOADING, MASTERDOWN...: as redis-py, the connection is dropped
                if self.sentinel and isinstance(reply, redis_errors.ReadOnlyError):
                    # The primary was demoted: a new connection asks the sentinels again.
                    raise redis_errors.ConnectionError("the previous primary is now a replica")
                if not waiting:
                    raise redis_errors.ConnectionError("Redis sent a reply nobody asked for")
                batch.append(reply)
                count, future = waiting[0]
                if len(batch) == count:
                    waiting.popleft()
                    done, batch = batch, []
                    self._batch = batch
                    if not future.done():  # not cancelled by its caller
                        future.set_result(done)
        except (redis_errors.ConnectionError, hiredis.ProtocolError) as exc:
            failure = (
                exc
                if isinstance(exc, redis_errors.ConnectionError)
                else redis_errors.ConnectionError(f"unreadable reply from Redis: {exc}")
            )
            self.wire._drop(self, failure)

    def eof_received(self) -> bool | None:
        self.wire._drop(self, redis_errors.ConnectionError("Connection closed by server."))
        return self._original.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        failure = redis_errors.ConnectionError(
            f"connection to Redis lost: {exc!r}" if exc else "Connection closed by server."
        )
        self.wire._drop(self, failure)
        self._original.connection_lost(exc)

    def pause_writing(self) -> None:
        self._original.pause_writing()

    def resume_writing(self) -> None:
        self._original.resume_writing()

    def fail(self, failure: Exception) -> None:
        """Fail every waiting call; this connection takes no more."""
        self.lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self._waiting = self._waiting, deque()
        for _, future in waiting:
            if not future.done():
                future.set_exception(failure)

    def _check(self, received_before: int) -> None:
        self._watchdog = None
        if not self._waiting or self.lost:
            return
        if self._received == received_before:
            self.wire._drop(
                self,
                redis_errors.TimeoutError(f"Redis did not answer within {COMMAND_TIMEOUT_S:g} s"),
            )
            return
        self._watchdog = self.loop.call_later(COMMAND_TIMEOUT_S, self._check, self._received)
