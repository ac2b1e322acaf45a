"""QueueService: register handlers, enqueue jobs, run a worker, manage the queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import math
import threading
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from corral.backends.base import QueueBackend
from corral.errors import (
    ConfigError,
    HandlerTimeoutError,
    PayloadError,
    UnrecoverableError,
)
from corral.message import (
    Completed,
    Failed,
    JobInfo,
    JobState,
    NewJob,
    Outcome,
    QueueMessage,
    RetryLater,
)
from corral.payload import encode_payload
from corral.retry import MAX_DELAY_MS, Retry
from corral.settings import QueueSettings

logger = logging.getLogger("corral.worker")

Handler = Callable[[QueueMessage], Any]
H = TypeVar("H", bound=Handler)
T = TypeVar("T")

PRIORITY_LIMIT = 2**21 - 1  # BullMQ's limit, so a job is valid on either backend
MAX_NAME_LENGTH = 200
MAX_JOB_ID_LENGTH = 256
MAX_ATTEMPTS = 1_000_000  # as QUEUE_ATTEMPTS; counters must fit SQLite's integers
MAX_DELAY_S = MAX_DELAY_MS / 1000


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler and its defaults."""

    name: str
    fn: Handler
    is_async: bool
    attempts: int | None
    backoff: Retry | None
    timeout_s: float | None


class QueueService:
    """One queue: its handlers, its producer side and its worker.

    Example::

        service = QueueService()          # settings from QUEUE_* env vars and .env

        @service.handler("send_email", attempts=5, backoff=Retry.exponential(2.0))
        async def send_email(message: QueueMessage) -> None:
            ...

        await service.enqueue("send_email", {"to": "ada@example.com"})
    """

    def __init__(self, settings: QueueSettings | None = None) -> None:
        self.settings = settings if settings is not None else QueueSettings()
        self.handlers: dict[str, HandlerSpec] = {}
        self._backend: QueueBackend | None = None
        self._stop = asyncio.Event()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._sync: _SyncRunner | None = None
        self._default_backoff = self.settings.backoff

    def __repr__(self) -> str:
        s = self.settings
        where = s.sqlite_path if s.backend == "sqlite" else s.redis_url_redacted
        return f"<QueueService queue={s.name!r} backend={s.backend} at {where}>"

    # -- handlers --------------------------------------------------------------------------

    def handler(
        self,
        name: str,
        *,
        attempts: int | None = None,
        backoff: Retry | None = None,
        timeout_s: float | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated function as the handler of jobs called ``name``.

        Async functions run on the worker's event loop; plain functions run in a thread pool
        sized to the worker's concurrency, so they never block the loop. ``attempts`` and
        ``backoff`` are the defaults for jobs of this name enqueued from a process that
        registered the handler; ``timeout_s`` fails an attempt that runs longer.
        """
        _check_name(name)
        if attempts is not None:
            _check_attempts(attempts)
        if timeout_s is not None and not (
            isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0
        ):
            raise ConfigError(
                f"timeout_s of handler {name!r} must be a number > 0, got {timeout_s!r}"
            )
        if backoff is not None and not isinstance(backoff, Retry):
            raise ConfigError(f"backoff of handler {name!r} must be a Retry, got {backoff!r}")

        def register(fn: H) -> H:
            if name in self.handlers and self.handlers[name].fn is not fn:
                raise ConfigError(f"a handler is already registered for {name!r}")
            self.handlers[name] = HandlerSpec(
                name, fn, _is_async(fn), attempts, backoff, float(timeout_s) if timeout_s else None
            )
            return fn

        return register

    def include(self, other: QueueService) -> None:
        """Register every handler of ``other`` here (how a worker gathers task modules)."""
        for spec in other.handlers.values():
            existing = self.handlers.get(spec.name)
            if existing is not None and existing.fn is not spec.fn:
                raise ConfigError(f"two handlers are registered for {spec.name!r}")
            self.handlers[spec.name] = spec

    # -- the backend -----------------------------------------------------------------------

    def _init_backend(self) -> QueueBackend:
        """Build the backend ``settings.backend`` names; its driver is imported only now."""
        kind = self.settings.backend
        if kind == "sqlite":
            from corral.backends.sqlite import SQLiteBackend

            return SQLiteBackend(self.settings)
        if kind == "bullmq":
            try:
                from corral.backends.bullmq import BullMQBackend
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ConfigError(
                    f"QUEUE_BACKEND=bullmq needs the 'bullmq' and 'redis' packages ({exc}); "
                    "install them with: pip install 'bullmq==3.4.4' redis"
                ) from exc
            return BullMQBackend(self.settings)
        raise ConfigError(f"QUEUE_BACKEND must be 'sqlite' or 'bullmq', got {kind!r}")

    @property
    def backend(self) -> QueueBackend:
        """The backend of this service, created on first use."""
        if self._backend is None:
            self._backend = self._init_backend()
        return self._backend

    # -- producing -------------------------------------------------------------------------

    def build_job(
        self,
        name: str,
        data: Any = None,
        *,
        delay_s: float = 0,
        priority: int = 0,
        attempts: int | None = None,
        backoff: Retry | None = None,
        job_id: str | None = None,
        queue: str | None = None,
    ) -> NewJob:
        """Validate a job and encode its payload; raise PayloadError before anything is written."""
        _check_name(name, error=PayloadError)
        # Fast paths first: the defaults (0) are by far the most common values.
        if (delay_s != 0 or type(delay_s) is not int) and (
            isinstance(delay_s, bool)
            or not isinstance(delay_s, int | float)
            or not (math.isfinite(delay_s) and 0 <= delay_s <= MAX_DELAY_S)
        ):
            raise PayloadError(
                f"delay_s must be a finite number from 0 to {MAX_DELAY_S:.0f} (a year), "
                f"got {delay_s!r}"
            )
        if type(priority) is not int or not (0 <= priority <= PRIORITY_LIMIT):
            raise PayloadError(
                f"priority must be a whole number from 0 (first) to {PRIORITY_LIMIT}, "
                f"got {priority!r}"
            )
        spec = self.handlers.get(name)
        if attempts is None:
            attempts = spec.attempts if spec and spec.attempts else self.settings.attempts
        _check_attempts(attempts, error=PayloadError)
        if backoff is None:
            backoff = spec.backoff if spec and spec.backoff else self._default_backoff
        if not isinstance(backoff, Retry):
            raise PayloadError(
                f"backoff must be a Retry (Retry.fixed/exponential), got {backoff!r}"
            )
        if job_id is not None:
            _check_job_id(job_id)
        data_json = encode_payload(data, max_bytes=self.settings.max_payload_bytes)
        return NewJob(
            name=name,
            data_json=data_json,
            job_id=job_id,
            delay_ms=round(delay_s * 1000),
            priority=priority,
            attempts=attempts,
            backoff=backoff,
            queue=queue,
        )

    async def enqueue(
        self,
        name: str,
        data: Any = None,
        *,
        delay_s: float = 0,
        priority: int = 0,
        attempts: int | None = None,
        backoff: Retry | None = None,
        job_id: str | None = None,
    ) -> str:
        """Add a job and return its id.

        ``data`` must be plain JSON; it reaches the handler exactly as given. ``priority``: lower
        runs first (0, the default, before any other). If ``job_id`` names a job that already
        exists in the queue (any state, until removed), nothing is added and that id is returned.

        Raises:
            PayloadError: bad data or options; nothing was written.
        """
        job = self.build_job(
            name,
            data,
            delay_s=delay_s,
            priority=priority,
            attempts=attempts,
            backoff=backoff,
            job_id=job_id,
        )
        (job_id_out,) = await self.backend.enqueue([job])
        return job_id_out

    async def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Add several jobs atomically (all or none) and return their ids in order.

        Each item holds the keyword arguments of :meth:`enqueue`:
        ``{"name": "resize", "data": {...}, "delay_s": 5}``. Every job is validated first; one
        bad job raises PayloadError and nothing is written.
        """
        built: list[NewJob] = []
        for index, item in enumerate(jobs):
            if (type(item) is not dict and not isinstance(item, Mapping)) or "name" not in item:
                raise PayloadError(f"job #{index} must be a mapping with at least a 'name'")
            try:
                built.append(self.build_job(**item))
            except TypeError as exc:
                raise PayloadError(f"job #{index}: {exc}") from None
            except PayloadError as exc:
                raise PayloadError(f"job #{index}: {exc}") from None
        if not built:
            return []
        return await self.backend.enqueue(built)

    def enqueue_sync(self, name: str, data: Any = None, **options: Any) -> str:
        """:meth:`enqueue` for synchronous code (Django, Flask, scripts).

        Works whether or not an event loop runs in the calling thread: the call runs on a
        private background loop with its own connection.
        """
        job = self.build_job(name, data, **options)
        ids: list[str] = self._run_sync(lambda backend: backend.enqueue([job]))
        return ids[0]

    def enqueue_many_sync(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """:meth:`enqueue_many` for synchronous code."""
        items = list(jobs)

        async def run(backend: QueueBackend) -> list[str]:
            return await _with_backend(self, backend).enqueue_many(items)

        result: list[str] = self._run_sync(run)
        return result

    def _run_sync(self, call: Callable[[QueueBackend], Awaitable[T]]) -> T:
        if self._sync is None:
            self._sync = _SyncRunner(self._init_backend)
        return self._sync.run(call)

    # -- consuming -------------------------------------------------------------------------

    async def start_worker(
        self,
        concurrency: int | None = None,
        burst: bool = False,
    ) -> None:
        """Process jobs until :meth:`stop` is called (or, with ``burst``, the queue is drained).

        The loop itself belongs to the backend (``start_consuming``): SQLite claims jobs with
        leases, BullMQ moves them to active with locks. Handler lookup, timeouts and the retry
        arithmetic are the same for both and happen here.
        """
        workers = concurrency if concurrency is not None else self.settings.concurrency
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"concurrency must be a whole number >= 1, got {workers!r}")
        if not self.handlers:
            logger.warning(
                "no handlers are registered; every job will fail "
                "(pass task modules with QUEUE_TASKS or `corral worker MODULE`)"
            )
        self._stop = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="corral-handler"
        )
        logger.info(
            "worker started: queue=%r backend=%s concurrency=%d handlers=%s",
            self.settings.name,
            self.settings.backend,
            workers,
            ", ".join(sorted(self.handlers)) or "-",
        )
        try:
            await self.backend.start_consuming(
                self.dispatch, concurrency=workers, stop=self._stop, burst=burst
            )
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            logger.info("worker stopped: queue=%r", self.settings.name)

    def stop(self) -> None:
        """Ask a running worker to stop claiming and shut down gracefully (signal-safe)."""
        self._stop.set()

    async def dispatch(self, message: QueueMessage) -> Outcome:
        """Run one delivery through its handler and say what should happen to the job."""
        spec = self.handlers.get(message.name)
        if spec is None:
            error = f"no handler registered for {message.name!r}"
            logger.error(
                "job %s %r attempt %d/%d failed: %s",
                message.id,
                message.name,
                message.attempt,
                message.max_attempts,
                error,
            )
            return Failed(error, "")
        try:
            result = await self._call(spec, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failure(message, exc)
        try:
            return Completed(
                encode_payload(
                    result, max_bytes=self.settings.max_payload_bytes, what="handler result"
                )
            )
        except PayloadError as exc:
            # The work ran; repeating it could repeat side effects, so this is final.
            logger.error("job %s %r attempt %d: %s", message.id, message.name, message.attempt, exc)
            return Failed(f"{exc}", "")

    async def _call(self, spec: HandlerSpec, message: QueueMessage) -> Any:
        if spec.is_async:
            awaitable = spec.fn(message)
        else:
            loop = asyncio.get_running_loop()
            ctx = contextvars.copy_context()
            awaitable = loop.run_in_executor(self._executor, ctx.run, spec.fn, message)
        if spec.timeout_s is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, spec.timeout_s)
        except TimeoutError:
            raise HandlerTimeoutError(
                f"handler {spec.name!r} ran longer than timeout_s={spec.timeout_s:g}"
            ) from None

    def _failure(self, message: QueueMessage, exc: BaseException) -> Outcome:
        error = f"{type(exc).__name__}: {exc}"
        trace = "".join(traceback.format_exception(exc))
        final = isinstance(exc, UnrecoverableError) or message.attempt >= message.max_attempts
        if final:
            logger.error(
                "job %s %r attempt %d/%d failed for good: %s",
                message.id,
                message.name,
                message.attempt,
                message.max_attempts,
                error,
            )
            return Failed(error, trace)
        delay_ms = message.backoff.delay_for(message.attempt) if message.backoff else 0
        logger.warning(
            "job %s %r attempt %d/%d failed, retry in %d ms: %s",
            message.id,
            message.name,
            message.attempt,
            message.max_attempts,
            delay_ms,
            error,
        )
        return RetryLater(error, trace, delay_ms)

    # -- managing --------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        """The job's state, attempts, result or error with traceback, progress and logs."""
        return await self.backend.get_job(job_id)

    async def list_jobs(
        self, state: JobState | str, *, limit: int = 50, offset: int = 0
    ) -> list[JobInfo]:
        """Jobs in ``state`` (see :meth:`QueueBackend.list_jobs`)."""
        try:
            job_state = JobState(state)
        except ValueError:
            allowed = ", ".join(s.value for s in JobState)
            raise ConfigError(f"unknown state {state!r}; use one of {allowed}") from None
        return await self.backend.list_jobs(job_state, limit=limit, offset=offset)

    async def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state."""
        return await self.backend.counts()

    async def retry_failed(self, *, limit: int | None = None) -> int:
        """Replay failed jobs (fresh attempts); return how many were moved back to waiting."""
        return await self.backend.retry_failed(limit=limit)

    async def remove(self, job_id: str) -> bool:
        """Delete a job that is not active; ``False`` if it did not exist."""
        return await self.backend.remove(job_id)

    async def pause(self) -> None:
        """Stop every worker of this queue from starting jobs."""
        await self.backend.pause()

    async def resume(self) -> None:
        """Let workers start jobs again."""
        await self.backend.resume()

    async def is_paused(self) -> bool:
        """Whether the queue is paused."""
        return await self.backend.is_paused()

    async def purge(self) -> int:
        """Delete every job that is not active; return how many."""
        return await self.backend.purge()

    async def close(self) -> None:
        """Close the backend and the background loop of the ``*_sync`` calls."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        if self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.close()

    async def __aenter__(self) -> QueueService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _SyncRunner:
    """A private event loop in a daemon thread, with its own backend, for the ``*_sync`` calls."""

    def __init__(self, make_backend: Callable[[], QueueBackend]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="corral-sync", daemon=True
        )
        self._thread.start()
        self._backend = make_backend()
        self._lock = threading.Lock()

    def run(self, call: Callable[[QueueBackend], Awaitable[T]]) -> T:
        async def invoke() -> T:
            return await call(self._backend)

        future = asyncio.run_coroutine_threadsafe(invoke(), self._loop)
        return future.result()

    def close(self) -> None:
        with self._lock:
            if self._loop.is_closed():
                return
            with_timeout = asyncio.wait_for(self._backend.close(), 5.0)
            try:
                asyncio.run_coroutine_threadsafe(with_timeout, self._loop).result(6.0)
            except Exception:  # closing is best effort
                logger.debug("closing the sync backend failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            self._loop.close()


def _with_backend(service: QueueService, backend: QueueBackend) -> QueueService:
    """A shallow view of ``service`` that talks to ``backend`` (for the sync runner's loop)."""
    view = QueueService.__new__(QueueService)
    view.settings = service.settings
    view.handlers = service.handlers
    view._backend = backend
    view._sync = None
    view._executor = None
    view._stop = asyncio.Event()
    view._default_backoff = service._default_backoff
    return view


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _check_name(name: Any, *, error: type[Exception] = ConfigError) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise error(
            f"job name must be a non-empty string of at most {MAX_NAME_LENGTH} "
            f"characters, got {name!r}"
        )


def _check_attempts(attempts: Any, *, error: type[Exception] = ConfigError) -> None:
    if type(attempts) is int and 1 <= attempts <= MAX_ATTEMPTS:
        return  # the common case, without the isinstance chain
    if (
        isinstance(attempts, bool)
        or not isinstance(attempts, int)
        or not 1 <= attempts <= MAX_ATTEMPTS
    ):
        raise error(f"attempts must be a whole number >= 1 and <= {MAX_ATTEMPTS}, got {attempts!r}")


def _check_job_id(job_id: Any) -> None:
    # The rules of Node BullMQ's Job.validateOptions, applied on both backends alike.
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
        raise PayloadError(
            f"job_id must be a non-empty string of at most {MAX_JOB_ID_LENGTH} "
            f"characters, got {job_id!r}"
        )
    if ":" in job_id:
        raise PayloadError(f"job_id may not contain ':' (BullMQ's key separator): {job_id!r}")
    try:
        is_integer = job_id.isascii() and str(int(job_id)) == job_id
    except ValueError:
        is_integer = False
    if is_integer:
        raise PayloadError(
            f"job_id may not be an integer ({job_id!r}); integers are the ids "
            "the queue assigns itself. Use e.g. 'order-42'"
        )
    if any(ch.isspace() or ord(ch) < 32 for ch in job_id):
        raise PayloadError(f"job_id may not contain spaces or control characters: {job_id!r}")
    if not job_id.isascii():
        try:
            job_id.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError(
                f"job_id is not valid Unicode (a lone surrogate): {job_id!r}"
            ) from None


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code (the CLI's helper)."""
    return asyncio.run(coro)
