"""Running handlers: lookup by job name, timeouts, the thread pool of sync handlers, and the
outcome (complete, retry after a backoff, fail) the backend records. The same for every backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import traceback
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.errors import ConfigError, HandlerTimeoutError, PayloadError, UnrecoverableError
from corral.isolation import ChildFailure, EncodedResult, HandlerProcesses
from corral.message import (
    Completed,
    Failed,
    Outcome,
    QueueMessage,
    attempt_text,
    failed_attempt,
)
from corral.payload import encode_payload
from corral.retry import Retry

logger = logging.getLogger("corral.worker")

Handler = Callable[[QueueMessage], Any]

HANDLER_THREAD_PREFIX = "corral-handler"

_pools: weakref.WeakSet[HandlerThreads] = weakref.WeakSet()


def running_sync_handlers() -> int:
    """How many synchronous handlers run in this process now (abandoned ones included)."""
    return sum(len(pool.running) for pool in list(_pools))


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler and its defaults."""

    name: str
    fn: Handler
    is_async: bool
    attempts: int | None
    backoff: Retry | None
    timeout_s: float | None
    isolate: bool = False
    """A sync handler run in a child process (corral.isolation), killed at ``timeout_s``."""


def is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def handler_spec(
    name: str,
    fn: Handler,
    attempts: int | None,
    backoff: Retry | None,
    timeout_s: float | None,
    isolate: bool | None,
    isolate_default: bool,
) -> HandlerSpec:
    """The spec of a handler being registered (its other options are checked already)."""
    is_isolated = _isolated(name, fn, isolate, isolate_default)
    timeout = float(timeout_s) if timeout_s else None
    return HandlerSpec(name, fn, is_async(fn), attempts, backoff, timeout, is_isolated)


def _isolated(name: str, fn: Handler, isolate: bool | None, default: bool) -> bool:
    """Whether handler ``name`` runs in a child process: ``isolate``, else ``default`` for a
    plain function (async ones never)."""
    if isolate is None:
        return default and not is_async(fn)
    if not isinstance(isolate, bool):
        raise ConfigError(f"isolate of handler {name!r} must be True or False, got {isolate!r}")
    if isolate and is_async(fn):
        raise ConfigError(
            f"handler {name!r} is async: isolate=True is for plain functions (an async handler "
            "is cancelled at its timeout_s already)"
        )
    qualname = getattr(fn, "__qualname__", None)
    if isolate and (
        not isinstance(qualname, str) or "<locals>" in qualname or not getattr(fn, "__module__", "")
    ):
        raise ConfigError(
            f"handler {name!r} has isolate=True but is not a function at the top level of a "
            "module (it is defined inside a function, or is a partial or an instance): a child "
            "process imports it by module and name"
        )
    return isolate


def job_fields(message: QueueMessage) -> dict[str, Any]:
    """The job of a log record, for structured (JSON) logs."""
    return {
        "job_id": message.id,
        "job_name": message.name,
        "queue": message.queue,
        "attempt": message.attempt,
    }


class HandlerThreads:
    """The threads that run synchronous handlers.

    A thread cannot be cancelled. When a sync handler outlives its ``timeout_s`` its thread is
    *abandoned*: the attempt fails, the thread no longer counts against the worker's
    concurrency and the pool grows by one so other jobs keep running. At most
    ``max_abandoned`` threads may be abandoned at once; past that the worker stops (see
    :attr:`overflowing`), since only ending the process frees them.
    """

    def __init__(
        self,
        concurrency: int,
        max_abandoned: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.max_abandoned = max_abandoned
        self.on_overflow = on_overflow
        """Called when a thread abandoned makes the pool :attr:`overflowing`."""
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency + max_abandoned, thread_name_prefix=HANDLER_THREAD_PREFIX
        )
        self.running: set[concurrent.futures.Future[Any]] = set()
        self.abandoned: set[concurrent.futures.Future[Any]] = set()
        _pools.add(self)

    @property
    def overflowing(self) -> bool:
        return len(self.abandoned) >= self.max_abandoned

    async def run(self, spec: HandlerSpec, message: QueueMessage) -> Any:
        ctx = contextvars.copy_context()
        future = self._pool.submit(ctx.run, spec.fn, message)
        self.running.add(future)
        future.add_done_callback(self._done)
        wrapped = asyncio.wrap_future(future)
        if spec.timeout_s is None:
            return await wrapped
        try:
            return await asyncio.wait_for(asyncio.shield(wrapped), spec.timeout_s)
        except TimeoutError:
            if not future.done():
                self.abandoned.add(future)
                logger.warning(
                    "job %s %r: synchronous handler still running after timeout_s=%g; its "
                    "thread is abandoned and no longer counts against concurrency "
                    "(%d of at most %d abandoned threads still running)",
                    message.id,
                    message.name,
                    spec.timeout_s,
                    len(self.abandoned),
                    self.max_abandoned,
                    extra=job_fields(message),
                )
                if self.overflowing and self.on_overflow is not None:
                    self.on_overflow()
            raise HandlerTimeoutError(
                f"handler {spec.name!r} ran longer than timeout_s={spec.timeout_s:g}"
            ) from None

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        self.running.discard(future)
        if future in self.abandoned:
            self.abandoned.discard(future)
            logger.info("an abandoned synchronous handler thread finished")

    def shutdown(self) -> None:
        """Stop idle threads; threads still running a handler are left to finish."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class Dispatcher:
    """Runs one delivery through its handler and says what should happen to the job."""

    def __init__(
        self,
        handlers: Mapping[str, HandlerSpec],
        *,
        max_payload_bytes: int,
        safe_integers: bool,
        threads: HandlerThreads,
        enqueue: Callable[..., Any] | None = None,
    ) -> None:
        self.handlers = handlers
        self.max_payload_bytes = max_payload_bytes
        self.safe_integers = safe_integers
        self.threads = threads
        self.enqueue = enqueue
        self.processes = HandlerProcesses(max_payload_bytes, safe_integers)

    def close(self) -> None:
        """Stop the child processes of isolated handlers."""
        self.processes.close()

    async def __call__(self, message: QueueMessage) -> Outcome:
        spec = self.handlers.get(message.name)
        if spec is None:
            error = f"no handler registered for {message.name!r}"
            logger.error(
                "job %s %r %s failed: %s",
                message.id,
                message.name,
                attempt_text(message.attempt, message.max_attempts),
                error,
                extra=job_fields(message),
            )
            return Failed(error, "")
        message._enqueue = self.enqueue
        if message._cancelled is not None:  # asked while it waited in the worker's buffer
            return self.cancelled(message)
        # service.cancel interrupts an async (or isolated) handler by cancelling this task; a
        # thread cannot be interrupted, so a sync handler checks message.cancelled instead.
        task = asyncio.current_task() if spec.is_async or spec.isolate else None
        message._on_cancel = task.cancel if task is not None else None
        try:
            result = await self._call(spec, message)
        except asyncio.CancelledError:
            if message._cancelled is not None and _uncancel(task) == 0:
                return self.cancelled(message)  # service.cancel, not a shutdown
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker's own cancellation (shutdown): the job is released
            return self.failure(message, asyncio.CancelledError("the handler was cancelled"))
        except BaseException as exc:
            if message._cancelled is not None:
                _uncancel(task)  # the handler turned the cancellation into another error
                return self.cancelled(message)
            # A handler that calls sys.exit() or raises KeyboardInterrupt fails its attempt;
            # only a signal to the process stops the worker.
            return self.failure(message, exc)
        finally:
            message._on_cancel = None
        if message._cancelled is not None:
            _uncancel(task)  # the handler caught the cancellation and returned
            return self.cancelled(message)
        try:
            if isinstance(result, EncodedResult):  # an isolated handler's, checked in its child
                if result.refused is not None:
                    raise PayloadError(result.refused)
                return Completed(result.json)
            return Completed(
                encode_payload(
                    result,
                    max_bytes=self.max_payload_bytes,
                    what="handler result",
                    safe_integers=self.safe_integers,
                )
            )
        except PayloadError as exc:
            # The work ran; repeating it could repeat side effects, so this is final.
            logger.error(
                "job %s %r %s: %s",
                message.id,
                message.name,
                attempt_text(message.attempt, message.max_attempts),
                exc,
                extra=job_fields(message),
            )
            return Failed(f"{exc}", "")

    async def _call(self, spec: HandlerSpec, message: QueueMessage) -> Any:
        if spec.isolate:
            return await self.processes.run(spec.name, spec.fn, message, spec.timeout_s)
        if not spec.is_async:
            return await self.threads.run(spec, message)
        if spec.timeout_s is None:
            return await spec.fn(message)
        try:
            return await asyncio.wait_for(spec.fn(message), spec.timeout_s)
        except TimeoutError:
            raise HandlerTimeoutError(
                f"handler {spec.name!r} ran longer than timeout_s={spec.timeout_s:g}"
            ) from None

    def cancelled(self, message: QueueMessage) -> Failed:
        """A cancelled attempt: it fails for good, whatever attempts remain."""
        reason = message._cancelled or "cancelled"
        logger.warning(
            "job %s %r %s %s",
            message.id,
            message.name,
            attempt_text(message.attempt, message.max_attempts),
            reason,
            extra=job_fields(message),
        )
        return Failed(reason, "")

    def failure(self, message: QueueMessage, exc: BaseException) -> Outcome:
        if isinstance(exc, ChildFailure):  # raised in an isolated handler's child process
            error, trace, final = exc.error, exc.trace, exc.final
        else:
            error = f"{type(exc).__name__}: {exc}"
            trace = "".join(traceback.format_exception(exc))
            final = isinstance(exc, UnrecoverableError)
        outcome = failed_attempt(message, error, trace, final=final)
        attempt = attempt_text(message.attempt, message.max_attempts)
        if isinstance(outcome, Failed):
            logger.error(
                "job %s %r %s failed for good: %s",
                message.id,
                message.name,
                attempt,
                error,
                extra={**job_fields(message), "traceback": trace},
            )
            return outcome
        logger.warning(
            "job %s %r %s failed, retry in %d ms: %s",
            message.id,
            message.name,
            attempt,
            outcome.delay_ms,
            error,
            extra={**job_fields(message), "traceback": trace},
        )
        return outcome


def _uncancel(task: asyncio.Task[Any] | None) -> int:
    """Take back the cancellation ``service.cancel`` asked of ``task`` (see
    :meth:`Dispatcher.__call__`); return the cancellations still pending."""
    if task is None:
        return 0
    return task.uncancel() if task.cancelling() else 0
