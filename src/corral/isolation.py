"""Synchronous handlers in child processes (``@service.handler(..., isolate=True)``).

A thread cannot be stopped, a process can: each isolated attempt runs in a child process that
is killed when the handler outlives ``timeout_s`` and replaced by a fresh one. A child that
dies (a segfault in a C extension, ``os._exit``) fails that attempt; the worker carries on.

Children come from a ``forkserver`` context (``spawn`` where there is none), never ``fork``:
the worker holds threads and an event loop that a forked copy must not inherit. Idle children
are reused, at most one per concurrency slot. The job goes in as its fields with the payload as
JSON; the result comes back as JSON, checked in the child against ``max_payload_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from corral.errors import HandlerCrashError, HandlerTimeoutError, PayloadError, UnrecoverableError
from corral.message import QueueMessage
from corral.payload import decode_json, encode_payload

logger = logging.getLogger("corral.worker")

_CONTEXT: Any = multiprocessing.get_context(
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
)


@dataclass(frozen=True, slots=True)
class EncodedResult:
    """A result a child already encoded (``json``), or why it could not (``refused``)."""

    json: str
    refused: str | None = None


class ChildFailure(Exception):
    """The handler raised in its child: the error and traceback as the child saw them."""

    def __init__(self, error: str, trace: str, final: bool) -> None:
        super().__init__(error)
        self.error = error
        self.trace = trace
        self.final = final


class _Child:
    """One child process and the parent's end of its pipe."""

    def __init__(self) -> None:
        self.conn, child_end = _CONTEXT.Pipe()
        alive, self._alive = _CONTEXT.Pipe(duplex=False)
        self.process: BaseProcess = _CONTEXT.Process(
            target=_serve, args=(child_end, alive), name="corral-isolated", daemon=True
        )
        self.process.start()
        child_end.close()
        alive.close()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
            self._alive.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(2.0)

    def how_it_ended(self) -> str:
        self.process.join(2.0)
        code = self.process.exitcode
        if code is None:
            return "its process stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"its process was killed by {name}"
        return f"its process exited with code {code}"


class HandlerProcesses:
    """The child processes of isolated handlers, started on first use and reused."""

    def __init__(self, max_payload_bytes: int, safe_integers: bool) -> None:
        self.limits = (max_payload_bytes, safe_integers)
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self._closed = False

    async def run(
        self,
        name: str,
        fn: Callable[[QueueMessage], Any],
        message: QueueMessage,
        timeout_s: float | None,
    ) -> EncodedResult:
        """Run ``fn(message)`` in a child; kill the child past ``timeout_s``."""
        try:
            request = pickle.dumps((fn, _fields(message), self.limits))
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise UnrecoverableError(
                f"handler {name!r} has isolate=True but cannot be sent to a child process "
                f"({exc}); make it a module-level function of an importable module"
            ) from None
        child = self._idle.pop() if self._idle else await asyncio.to_thread(_Child)
        self._busy.add(child)
        keep = False
        try:
            child.conn.send_bytes(request)
            await _readable(child.conn, timeout_s)
            try:
                reply = child.conn.recv()
            except (EOFError, OSError):
                raise HandlerCrashError(
                    f"handler {name!r} did not finish: {child.how_it_ended()}"
                ) from None
            keep = True
        except TimeoutError:
            raise HandlerTimeoutError(
                f"handler {name!r} ran longer than timeout_s={timeout_s:g}; its process was killed"
            ) from None
        finally:
            self._busy.discard(child)
            if keep and not self._closed:
                self._idle.append(child)
            else:
                # Killed at the timeout, on a crash or on cancellation: a fresh one next time.
                await asyncio.to_thread(child.kill)
        kind, *rest = reply
        if kind == "ok":
            return EncodedResult(rest[0])
        if kind == "refused":
            return EncodedResult("", refused=rest[0])
        error, trace, final = rest
        raise ChildFailure(error, trace, final)

    def close(self) -> None:
        """Stop every child: idle ones end, busy ones (shutdown's cancel) are killed."""
        self._closed = True
        for child in (*self._idle, *self._busy):
            child.kill()
        self._idle.clear()


async def _readable(conn: Connection, timeout_s: float | None) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout_s)
    finally:
        loop.remove_reader(fd)


def _exit_with_worker(alive: Connection) -> None:
    """End this child when its worker is gone (killed, even with SIGKILL), busy or not: only
    the worker holds the other end of ``alive``, so it reads as closed then."""
    with contextlib.suppress(Exception):
        alive.poll(None)
    os._exit(1)


def _fields(message: QueueMessage) -> tuple[Any, ...]:
    data = json.dumps(message.data, ensure_ascii=False, separators=(",", ":"))
    return (
        message.id,
        message.name,
        data,
        message.queue,
        message.attempt,
        message.max_attempts,
        message.priority,
        message.enqueued_at,
        message.backoff,
        message._max_bytes,
    )


def _serve(conn: Connection, alive: Connection) -> None:
    """A child's loop: run one request at a time until the parent closes the pipe."""
    # Ctrl-C or a SIGTERM to the process group is the worker's to handle (release the job,
    # then kill this child); a child must not fail the attempt on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_worker, args=(alive,), daemon=True).start()
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, fields, (max_bytes, safe_integers) = pickle.loads(request)
            ident, name, data, queue, attempt, max_attempts, priority, at, backoff, cap = fields
            message = QueueMessage(
                ident,
                name,
                decode_json(data),
                queue,
                attempt,
                max_attempts,
                priority,
                at,
                backoff,
                _max_bytes=cap,
            )
            result = fn(message)
        except BaseException as exc:  # SystemExit too: the attempt fails, the child lives on
            reply: tuple[Any, ...] = (
                "error",
                f"{type(exc).__name__}: {exc}",
                "".join(traceback.format_exception(exc)),
                isinstance(exc, UnrecoverableError),
            )
        else:
            try:
                reply = (
                    "ok",
                    encode_payload(
                        result,
                        max_bytes=max_bytes,
                        what="handler result",
                        safe_integers=safe_integers,
                    ),
                )
            except PayloadError as exc:
                reply = ("refused", str(exc))
        conn.send(reply)
