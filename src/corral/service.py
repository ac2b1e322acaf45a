"""QueueService: register handlers, enqueue jobs, run a worker, manage the queue."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from corral._sync import SyncRunner
from corral.backends.base import QueueBackend
from corral.cancel import QueueCancel
from corral.dedup import Deduplication, check_deduplication
from corral.errors import ConfigError, MissingDependencyError, PayloadError
from corral.events import QueueEvents
from corral.flows import FlowJob, FlowNode, FlowPlan, plan_flow, write_flow
from corral.handlers import Dispatcher, Handler, HandlerSpec, HandlerThreads, handler_spec
from corral.jobs import check_attempts, check_name, new_job
from corral.manage import QueueManagement
from corral.message import (
    Dispatch,
    JobState,
    NewJob,
    Send,
)
from corral.results import QueueResults
from corral.retry import Retry
from corral.schedules import (
    Periodic,
    QueueSchedules,
    include_periodics,
    periodic_writes,
    write_declared,
)
from corral.settings import QueueSettings

if TYPE_CHECKING:
    from corral.move import MoveReport

logger = logging.getLogger("corral.worker")

H = TypeVar("H", bound=Handler)

REDIS_EXTRA_HINT = "pip install 'corral[redis]'"


class QueueService(QueueManagement, QueueSchedules, QueueResults, QueueEvents, QueueCancel):
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
        self.periodics: dict[str, Periodic] = {}
        self._backend: QueueBackend | None = None
        self._stop = asyncio.Event()
        self._sync = SyncRunner(self._init_backend)
        self._backoff: tuple[tuple[object, ...], Retry] | None = None
        self.stuck: str | None = None
        """Why the last worker run stopped on its own (too many abandoned handler threads)."""
        # Wrappers of a worker's job runs and of the service's writes, innermost first: how
        # Prometheus metrics and OpenTelemetry spans are taken (corral.prometheus, .telemetry).
        self.instruments: list[Callable[[Dispatch], Dispatch]] = []
        self.senders: list[Callable[[Send], Send]] = []

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
        isolate: bool | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated function as the handler of jobs called ``name``.

        Async functions run on the worker's event loop; plain functions run in a thread pool
        sized to the worker's concurrency, so they never block the loop. ``attempts`` and
        ``backoff`` are the defaults for jobs of this name enqueued from a process that
        registered the handler; ``timeout_s`` fails an attempt that runs longer. ``isolate``
        (default: the ``isolate_sync`` setting) runs a plain function in a child process,
        killed at ``timeout_s``; a crash of it fails the attempt, not the worker.
        """
        check_name(name)
        if attempts is not None:
            check_attempts(attempts)
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
            isolate_default = self.settings.isolate_sync
            self.handlers[name] = handler_spec(
                name, fn, attempts, backoff, timeout_s, isolate, isolate_default
            )
            return fn

        return register

    def periodic(
        self,
        schedule_id: str,
        *,
        data: Any = None,
        name: str | None = None,
        timeout_s: float | None = None,
        **options: Any,
    ) -> Callable[[H], H]:
        """Register the decorated function as the handler of a schedule's jobs (named ``name``,
        by default ``schedule_id``) and the schedule: ``options`` are :meth:`schedule`'s
        (``cron`` or ``every_s``, ``tz``, ``limit``, ``attempts``, ...). Workers of the queue
        write it when they start (not ``burst`` ones) if it is missing or different, so
        deploying the code is enough; removing the decorator does not delete it.

        Raises:
            ConfigError, PayloadError: the schedule is not valid (checked now).
        """
        declared = Periodic(schedule_id, name if name is not None else schedule_id, data, options)
        self._build_periodic(declared)  # refuse a bad schedule at import, not in the worker
        if schedule_id in self.periodics:
            raise ConfigError(f"a periodic schedule {schedule_id!r} is already declared")
        register = self.handler(
            declared.name,
            attempts=options.get("attempts"),
            backoff=options.get("backoff"),
            timeout_s=timeout_s,
        )

        def declare(fn: H) -> H:
            register(fn)
            self.periodics[schedule_id] = declared
            return fn

        return declare

    def include(self, other: QueueService) -> None:
        """Register every handler and periodic schedule of ``other`` here (how a worker
        gathers task modules), and its :attr:`instruments` and :attr:`senders` (tracing set up
        in a task module); the schedules stay on ``other``'s queue."""
        self.instruments += [wrap for wrap in other.instruments if wrap not in self.instruments]
        self.senders += [wrap for wrap in other.senders if wrap not in self.senders]
        for spec in other.handlers.values():
            existing = self.handlers.get(spec.name)
            if existing is not None and existing.fn is not spec.fn:
                raise ConfigError(f"two handlers are registered for {spec.name!r}")
            self.handlers[spec.name] = spec
        include_periodics(self.periodics, other.periodics.values(), other.settings.name)

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
            except ImportError as exc:
                raise MissingDependencyError(
                    f"QUEUE_BACKEND=bullmq needs the Redis extra ({exc.name or exc} is not "
                    f"installed); install it with: {REDIS_EXTRA_HINT}"
                ) from exc
            return BullMQBackend(self.settings)
        raise ConfigError(f"QUEUE_BACKEND must be 'sqlite' or 'bullmq', got {kind!r}")

    @property
    def backend(self) -> QueueBackend:
        """The backend of this service, created on first use."""
        if self._backend is None:
            self._backend = self._init_backend()
        return self._backend

    def use_settings(self, settings: QueueSettings) -> None:
        """Replace the settings (a worker applying its command line); before first use only."""
        if self._backend is not None:
            raise ConfigError(
                f"{self!r} was already used; settings can only change before its first call"
            )
        self.settings = settings

    # -- producing -------------------------------------------------------------------------

    @property
    def _safe_integers(self) -> bool:
        # A queue in Redis is shared with Node.js by design, whose numbers are doubles.
        return self.settings.backend == "bullmq" and not self.settings.allow_unsafe_integers

    def _default_backoff(self) -> Retry:
        # Built once per settings value rather than once per enqueue (a hot path).
        settings = self.settings
        key = (settings.backoff_type, settings.backoff_delay_s, settings.backoff_jitter)
        cached = self._backoff
        if cached is None or cached[0] != key:
            cached = self._backoff = (key, settings.backoff)
        return cached[1]

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
        deduplication: Deduplication | None = None,
    ) -> NewJob:
        """Validate a job and encode its payload; raise PayloadError before anything is written."""
        spec = self.handlers.get(name) if type(name) is str else None
        if attempts is None:
            attempts = spec.attempts if spec and spec.attempts else self.settings.attempts
        if backoff is None:
            backoff = spec.backoff if spec and spec.backoff else self._default_backoff()
        job = new_job(
            name,
            data,
            delay_s=delay_s,
            priority=priority,
            attempts=attempts,
            backoff=backoff,
            job_id=job_id,
            queue=queue,
            max_payload_bytes=self.settings.max_payload_bytes,
            safe_integers=self._safe_integers,
        )
        if deduplication is not None:
            job.deduplication = check_deduplication(deduplication)
        return job

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
        deduplication: Deduplication | None = None,
    ) -> str:
        """Add a job and return its id.

        ``data`` must be plain JSON; it reaches the handler exactly as given. ``priority``: lower
        runs first (0, the default, before any other). If ``job_id`` names a job that already
        exists in the queue (any state, until removed), nothing is added and that id is returned.
        ``deduplication`` adds it only if no job stands for that id (simple, throttle or debounce,
        see :mod:`corral.dedup`); the id returned is then the standing job's.

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
            deduplication=deduplication,
        )
        (job_id_out,) = await self._send([job])
        return job_id_out

    def _build_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[NewJob]:
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
        return built

    async def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Add several jobs atomically (all or none) and return their ids in order.

        Each item holds the keyword arguments of :meth:`enqueue`:
        ``{"name": "resize", "data": {...}, "delay_s": 5}``. Every job is validated first; one
        bad job raises PayloadError and nothing is written.
        """
        built = self._build_many(jobs)
        return await self._send(built) if built else []

    def enqueue_sync(self, name: str, data: Any = None, **options: Any) -> str:
        """:meth:`enqueue` for synchronous code (Django, Flask, scripts).

        Safe from any number of threads, with or without a running event loop: the calls run on
        one private background loop with its own connection, released by :meth:`close`.
        """
        job = self.build_job(name, data, **options)
        ids: list[str] = self._sync.run(lambda backend: self._send([job], backend))
        return ids[0]

    def enqueue_many_sync(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """:meth:`enqueue_many` for synchronous code."""
        built = self._build_many(jobs)
        if not built:
            return []
        ids: list[str] = self._sync.run(lambda backend: self._send(built, backend))
        return ids

    def enqueue_in_transaction(self, conn: Any, name: str, data: Any = None, **options: Any) -> str:
        """Add a job that exists if and only if ``conn``'s current transaction commits; return
        its id. Takes the options of :meth:`enqueue`.

        Writes through ``conn`` (a ``sqlite3`` or psycopg 3 connection, or a SQLAlchemy
        ``Connection``/``Session``) inside its transaction, and never commits or rolls back.
        On the SQLite backend, a connection to the queue's own file gets the job row itself;
        otherwise the job goes into the outbox table of that database (:func:`corral.outbox.
        install`), which a relay moves to the queue after the commit. Outbox jobs always have
        an id (``tx-...`` when none is given), which makes a second push of the same row a
        no-op. See :mod:`corral.outbox`.

        Raises:
            PayloadError: bad data or options; nothing was written.
            ConfigError: an unsupported connection, one in autocommit mode with no
                transaction open, or a missing outbox table.
        """
        from corral.outbox import enqueue_in_transaction

        return enqueue_in_transaction(self, conn, name, data, options)

    async def enqueue_in_transaction_async(
        self, conn: Any, name: str, data: Any = None, **options: Any
    ) -> str:
        """:meth:`enqueue_in_transaction` for async drivers: psycopg's ``AsyncConnection`` or
        SQLAlchemy's ``AsyncConnection``/``AsyncSession`` on it."""
        from corral.outbox import enqueue_in_transaction_async

        return await enqueue_in_transaction_async(self, conn, name, data, options)

    async def enqueue_flow(self, flow: FlowJob | Mapping[str, Any]) -> FlowNode:
        """Add a tree of jobs, across queues, atomically; return its ids in the same shape.

        A job with children waits (``waiting-children``) until every child has settled, then
        runs; its handler reads them with ``await message.children_results()`` and
        ``message.children_failures()``. ``flow`` is a :class:`~corral.flows.FlowJob` (or the
        same as a mapping, see ``FlowJob.from_dict``). If the root's ``job_id`` names an existing
        job, nothing is added and the stored flow is returned.

        Raises:
            PayloadError: a bad job or option anywhere in the tree, a job id used twice, an
                unusable queue name, more jobs than ``max_flow_jobs``, or a ``job_id`` of a job
                that already belongs to another flow; nothing was written.
        """
        return await self._send_flow(plan_flow(self, flow), self.backend)

    def enqueue_flow_sync(self, flow: FlowJob | Mapping[str, Any]) -> FlowNode:
        """:meth:`enqueue_flow` for synchronous code."""
        plan = plan_flow(self, flow)
        node: FlowNode = self._sync.run(lambda backend: self._send_flow(plan, backend))
        return node

    async def _send_flow(self, plan: FlowPlan, backend: QueueBackend) -> FlowNode:
        """Write a flow, through the senders when there are (its jobs are traced as one)."""
        if not self.senders:
            return await write_flow(backend, plan)
        written: list[FlowNode] = []

        async def write(jobs: list[NewJob]) -> list[str]:
            written.append(await write_flow(backend, plan))
            return [written[0].id]

        await self._send([entry.job for entry in plan.entries], write=write)
        return written[0]

    # -- consuming -------------------------------------------------------------------------

    async def start_worker(
        self,
        concurrency: int | None = None,
        burst: bool = False,
        *,
        queues: Sequence[str | QueueSettings] | None = None,
        total_concurrency: int | None = None,
    ) -> None:
        """Process jobs until :meth:`stop` is called (or, with ``burst``, the queues are drained).

        ``queues`` serves several queues of this service's storage in one worker (names, or
        settings for queues with settings of their own); by default this service's queue.
        ``concurrency`` is per queue; ``total_concurrency`` caps all queues together.

        The loop itself belongs to the backend (``start_consuming``): SQLite claims jobs with
        leases, BullMQ moves them to active with locks. Handler lookup, timeouts and the retry
        arithmetic are the same for both and happen here.
        """
        workers = concurrency if concurrency is not None else self.settings.concurrency
        for value, what in ((workers, "concurrency"), (total_concurrency, "total_concurrency")):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{what} must be a whole number >= 1, got {value!r}")
        served = self._served(queues, workers)
        if not self.handlers:
            logger.warning(
                "no handlers are registered; every job will fail "
                "(pass task modules with QUEUE_TASKS or `corral worker MODULE`)"
            )
        self.stuck = None
        slots = sum(each.concurrency for each in served)
        if total_concurrency is not None:
            slots = min(slots, total_concurrency)

        def overflowed() -> None:  # checked when a thread is abandoned, not once per job
            if self.stuck is None:
                self.stuck = (
                    f"{len(threads.abandoned)} synchronous handler threads are still running "
                    "past their timeout_s; stopping this worker so that its process can be "
                    "restarted (only that frees them; isolate=True kills such a handler instead)"
                )
                logger.error("%s", self.stuck)
                self.stop()

        threads = HandlerThreads(slots, max_abandoned=max(4, slots), on_overflow=overflowed)
        dispatch = Dispatcher(
            self.handlers,
            max_payload_bytes=self.settings.max_payload_bytes,
            safe_integers=self._safe_integers,
            threads=threads,
            enqueue=self._enqueue_to,
        )

        logger.info(
            "worker started: %s backend=%s handlers=%s",
            ", ".join(f"queue={each.name!r} concurrency={each.concurrency}" for each in served),
            self.settings.backend,
            ", ".join(sorted(self.handlers)) or "-",
        )
        # A burst worker drains what is there: it writes no schedule (corral.testing's runs
        # would otherwise never end).
        declared = None
        if not burst and self.periodics:
            writes = periodic_writes(self.backend, self.periodics, self.settings.name, served)
            declared = asyncio.create_task(write_declared(writes, self._build_periodic, self._stop))
        instrumented: Dispatch = dispatch
        for instrument in self.instruments:
            instrumented = instrument(instrumented)
        try:
            await self.backend.start_consuming(
                instrumented,
                concurrency=workers,
                stop=self._stop,
                burst=burst,
                queues=served,
                total_concurrency=total_concurrency,
            )
        finally:
            if declared is not None:
                declared.cancel()
                await asyncio.gather(declared, return_exceptions=True)
            threads.shutdown()
            dispatch.close()
            self._stop = asyncio.Event()  # a fresh one for the next run (and its event loop)
            logger.info("worker stopped: %s", ", ".join(f"queue={each.name!r}" for each in served))

    def _served(
        self, queues: Sequence[str | QueueSettings] | None, concurrency: int
    ) -> list[QueueSettings]:
        if not queues:
            return [self.settings.model_copy(update={"concurrency": concurrency})]
        served: list[QueueSettings] = []
        for queue in queues:
            if isinstance(queue, QueueSettings):
                served.append(queue)
            else:
                served.append(
                    self.settings.with_name(queue).model_copy(update={"concurrency": concurrency})
                )
        names = [each.name for each in served]
        if len(set(names)) != len(names):
            raise ConfigError(f"a queue is named twice in {names}")
        return served

    def stop(self) -> None:
        """Ask a running worker to stop claiming and shut down gracefully (signal-safe). Called
        before :meth:`start_worker`, it makes that run stop at once (a signal during start-up)."""
        self._stop.set()

    async def _enqueue_to(self, queue: str, name: str, data: Any = None, **options: Any) -> str:
        """``message.enqueue``: a job into ``queue`` on this service's storage."""
        job = self.build_job(name, data, queue=queue, **options)
        (job_id,) = await self._send([job])
        return job_id

    async def _send(
        self, jobs: list[NewJob], backend: QueueBackend | None = None, *, write: Send | None = None
    ) -> list[str]:
        # The sync calls' task runs in a copy of the caller's context: a span there is the parent.
        send: Send = write or (backend or self.backend).enqueue  # wrapped by the senders
        for wrap in self.senders:
            send = wrap(send)
        return await send(jobs)

    # -- moving ---------------------------------------------------------------------------

    async def move_to(
        self,
        target: QueueSettings | QueueService,
        *,
        to_queue: str | None = None,
        states: str | Sequence[str | JobState] | None = None,
        dry_run: bool = False,
        batch_size: int = 500,
        progress: Callable[[int], None] | None = None,
    ) -> MoveReport:
        """Move this queue's waiting, delayed and failed jobs to ``target`` (other settings: a
        backend, storage or queue name; ``to_queue`` renames the queue there).

        Jobs keep their ids, data, options, attempts made, due time, priority, errors and
        tracebacks, progress and logs. Each job is deleted here only once the target has it; a
        re-run after an interruption neither loses nor duplicates jobs; active jobs are skipped
        and counted. See :mod:`corral.move` for the guarantees in full.

        Raises:
            ConfigError: a state that cannot move, or the target is this queue itself.
        """
        from corral.move import move_jobs, parse_states

        chosen = parse_states(states)
        owned = not isinstance(target, QueueService)
        other = QueueService(target) if isinstance(target, QueueSettings) else target
        try:
            backend = other.backend
            if to_queue is not None:
                backend = backend.for_queue(to_queue, other.settings.with_name(to_queue))
            return await move_jobs(
                self.backend,
                backend,
                states=chosen,
                dry_run=dry_run,
                batch_size=batch_size,
                progress=progress,
            )
        finally:
            if owned:
                await other.close()

    async def close(self) -> None:
        """Close the backend and the background loop of the ``*_sync`` calls."""
        self._sync.close()
        if self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.close()

    async def __aenter__(self) -> QueueService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
