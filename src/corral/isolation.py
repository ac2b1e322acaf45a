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
import importlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, cast

from corral.errors import HandlerCrashError, HandlerTimeoutError, PayloadError, UnrecoverableError
from corral.message import QueueMessage
from corral.payload import encode_payload
from corral.retry import Retry

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
        request = _request(fn, message, self.limits)
        child = self._idle.pop() if self._idle else await asyncio.to_thread(_Child)
        self._busy.add(child)
        keep = False
        try:
            child.conn.send_bytes(request)
            await _readable(child.conn, timeout_s)
            try:
                reply = json.loads(child.conn.recv_bytes())
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
        if "result" in reply:
            return EncodedResult(reply["result"])
        if "refused" in reply:
            return EncodedResult("", refused=reply["refused"])
        raise ChildFailure(reply["error"], reply["trace"], reply["final"])

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


def _request(
    fn: Callable[[QueueMessage], Any], message: QueueMessage, limits: tuple[int, bool]
) -> bytes:
    """What a child is sent: where to import the handler from, and the job (JSON)."""
    return json.dumps(
        {
            "module": fn.__module__,
            "qualname": fn.__qualname__,
            "id": message.id,
            "name": message.name,
            "data": message.data,
            "queue": message.queue,
            "attempt": message.attempt,
            "max_attempts": message.max_attempts,
            "priority": message.priority,
            "enqueued_at_ms": round(message.enqueued_at.timestamp() * 1000),
            "backoff": message.backoff.to_bullmq() if message.backoff else None,
            "max_payload_bytes": limits[0],
            "safe_integers": limits[1],
        },
        ensure_ascii=False,
    ).encode("utf-8", "surrogatepass")


def _handler(module: str, qualname: str) -> Callable[[QueueMessage], Any]:
    """The handler, imported as its module names it (the worker checked it is top-level)."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return cast("Callable[[QueueMessage], Any]", found)


def _run_one(request: bytes) -> dict[str, Any]:
    try:
        job = json.loads(request.decode("utf-8", "surrogatepass"))
        message = QueueMessage(
            job["id"],
            job["name"],
            job["data"],
            job["queue"],
            job["attempt"],
            job["max_attempts"],
            job["priority"],
            datetime.fromtimestamp(job["enqueued_at_ms"] / 1000, UTC),
            Retry.from_bullmq(job["backoff"]),
            _max_bytes=job["max_payload_bytes"],
        )
        result = _handler(job["module"], job["qualname"])(message)
    except BaseException as exc:  # SystemExit too: the attempt fails, the child lives on
        return {
            "error": f"{type(exc).__name__}: {exc}",
            "trace": "".join(traceback.format_exception(exc)),
            "final": isinstance(exc, UnrecoverableError),
        }
    try:
        return {
            "result": encode_payload(
                result,
                max_bytes=job["max_payload_bytes"],
                what="handler result",
                safe_integers=job["safe_integers"],
            )
        }
    except PayloadError as exc:
        return {"refused": str(exc)}


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
        reply = json.dumps(_run_one(request), ensure_ascii=False)
        conn.send_bytes(reply.encode("utf-8", "surrogatepass"))
