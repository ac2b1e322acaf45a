"""The shapes that cross the seam: what a handler gets, what a worker reports, what is stored."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from corral.dedup import Deduplication
from corral.errors import PayloadError
from corral.payload import encode_payload
from corral.retry import Retry

JSON = Any
"""A value that survives ``json.dumps``/``json.loads`` unchanged (checked by ``corral.payload``)."""


class JobState(enum.StrEnum):
    """Where a job is in its life. The values are BullMQ's state names."""

    WAITING = "waiting"
    WAITING_CHILDREN = "waiting-children"
    """A parent in a flow, waiting until every one of its children has settled."""
    DELAYED = "delayed"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"


STATE_ORDER = (
    JobState.ACTIVE,
    JobState.WAITING,
    JobState.WAITING_CHILDREN,
    JobState.DELAYED,
    JobState.FAILED,
    JobState.COMPLETED,
)
"""The order states are shown in (CLI, dashboard): where jobs are now, then where they ended."""


@dataclass(slots=True)  # not frozen: frozen dataclasses cost a setattr call per field
class NewJob:
    """A validated job about to be written by :meth:`QueueBackend.enqueue`.

    ``data_json`` is the payload already encoded (and size-checked) by the service, so a backend
    never encodes twice and never writes something the service did not accept.
    """

    name: str
    data_json: str
    job_id: str | None = None
    delay_ms: int = 0
    priority: int = 0
    attempts: int = 1
    backoff: Retry | None = None
    queue: str | None = None
    """Target queue; ``None`` means the backend's own queue (used for dead letters)."""
    deduplication: Deduplication | None = None
    """Add it only if no job stands for this id (see :mod:`corral.dedup`)."""
    trace_context: str | None = None
    """The producer's trace context (:mod:`corral.telemetry`), stored with the job as BullMQ's
    ``tm`` option: a JSON object of W3C Trace Context headers, as ``bullmq-otel`` writes it."""


class ChildPolicy(enum.StrEnum):
    """What a child's failure (for good) does to its parent: BullMQ's four flow options."""

    FAIL = "fail"
    """The parent fails at once, without running (``failParentOnFailure``)."""
    CONTINUE = "continue"
    """The parent runs at once, even with other children pending (``continueParentOnFailure``)."""
    IGNORE = "ignore"
    """The failure is recorded; the parent waits for the others (``ignoreDependencyOnFailure``)."""
    REMOVE = "remove"
    """The child no longer counts; nothing is recorded (``removeDependencyOnFailure``)."""


@dataclass(slots=True)
class FlowEntry:
    """One job of a flow about to be written by :meth:`QueueBackend.enqueue_flow`."""

    job: NewJob
    """The validated job; its ``queue`` is always set."""
    parent: int | None
    """Index of the parent's entry (entries are in pre-order: a parent before its children)."""
    on_failure: ChildPolicy
    """What this job failing for good does to its parent (unused for the root)."""
    has_children: bool
    """It waits in ``waiting-children`` until its children have settled."""


@dataclass(slots=True)
class FlowWrite:
    """What :meth:`QueueBackend.enqueue_flow` wrote."""

    ids: list[str | None]
    """Each entry's job id; ``None`` for entries under a reused job (not written)."""
    existed: bool = False
    """The root's ``job_id`` named an existing job: nothing was written."""


class ChildStatus(enum.StrEnum):
    """Where a child stands for its parent."""

    PENDING = "pending"
    """Not settled yet: the parent waits for it."""
    COMPLETED = "completed"
    """Completed; its result is one of the parent's ``children_results()``."""
    IGNORED = "ignored"
    """Failed with ``continue`` or ``ignore``: one of the parent's ``children_failures()``."""
    FAILED = "failed"
    """Failed with ``fail``: it failed the parent."""


@dataclass(frozen=True, slots=True)
class JobRef:
    """A job of some queue of the same storage."""

    queue: str
    id: str


@dataclass(frozen=True, slots=True)
class Child:
    """One child of a parent job and its status for that parent."""

    queue: str
    id: str
    status: ChildStatus
    name: str | None = None
    """``None`` when the child job itself is gone (removed or trimmed; its result stays)."""
    result: JSON = None
    """The child's result (``COMPLETED``)."""
    error: str | None = None
    """Why it failed (``IGNORED`` and ``FAILED``)."""


@dataclass(slots=True)
class QueueMessage:
    """One delivery of a job to a handler.

    ``data`` is the payload exactly as it was enqueued. ``attempt`` is 1 on the first delivery
    and grows by one with every failed attempt. ``progress()`` and ``log()`` store on the job
    what ``corral job ID`` (and Bull Board, on the BullMQ backend) show; ``enqueue()`` adds a job
    to the queue this one came from.
    """

    id: str
    name: str
    data: JSON
    queue: str
    attempt: int
    max_attempts: int
    priority: int
    enqueued_at: datetime
    backoff: Retry | None = None
    trace_context: str | None = field(default=None, repr=False)
    """The trace context its producer stored with the job (see :class:`NewJob`), or ``None``."""
    _progress: Callable[[str], Awaitable[None]] | None = field(default=None, repr=False)
    _log: Callable[[str], Awaitable[None]] | None = field(default=None, repr=False)
    _max_bytes: int = field(default=1_048_576, repr=False)
    _enqueue: Callable[..., Awaitable[str]] | None = field(default=None, repr=False)
    _children: Callable[[], Awaitable[list[Child]]] | None = field(default=None, repr=False)
    _cancelled: str | None = field(default=None, repr=False)
    _on_cancel: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> bool:
        """Whether someone asked to cancel this job while it runs (``service.cancel``): a
        synchronous handler, which cannot be interrupted, should check it and return; an async
        handler is cancelled. The attempt fails as cancelled either way, with no retry."""
        return self._cancelled is not None

    def _request_cancel(self, reason: str) -> None:
        """Mark the delivery cancelled and interrupt an async handler (the worker loop)."""
        if self._cancelled is None:
            self._cancelled = reason
            if self._on_cancel is not None:
                self._on_cancel()

    async def progress(self, value: JSON) -> None:
        """Record the job's progress: a number (0-100) or any JSON value.

        Raises:
            PayloadError: ``value`` is not plain JSON or is over ``max_payload_bytes``.
        """
        text = encode_payload(value, max_bytes=self._max_bytes, what="progress")
        if self._progress is not None:
            await self._progress(text)

    async def log(self, text: str) -> None:
        """Append a line to the job's log.

        Raises:
            PayloadError: the line is over ``max_payload_bytes``.
        """
        line = str(text)
        if (
            len(line) > self._max_bytes // 4
            and len(line.encode("utf-8", "replace")) > self._max_bytes
        ):
            raise PayloadError(
                f"log line is over the limit of {self._max_bytes} bytes "
                "(QUEUE_MAX_PAYLOAD_BYTES); log less at once"
            )
        if self._log is not None:
            await self._log(line)

    async def enqueue(self, name: str, data: JSON = None, **options: Any) -> str:
        """Add a job to the queue this message came from, on the same storage; return its id.

        Takes the options of :meth:`QueueService.enqueue`.
        """
        if self._enqueue is None:
            raise RuntimeError("this message was not delivered by a worker; use service.enqueue")
        return await self._enqueue(self.queue, name, data, **options)

    async def children(self) -> list[Child]:
        """This job's children in a flow (see :meth:`QueueService.enqueue_flow`) and where each
        stands; empty for a job without children."""
        if self._children is None:
            return []
        return await self._children()

    async def children_results(self) -> dict[str, JSON]:
        """``{child job id: result}`` of the children that completed (a parent's handler)."""
        return {c.id: c.result for c in await self.children() if c.status is ChildStatus.COMPLETED}

    async def children_failures(self) -> dict[str, str]:
        """``{child job id: error}`` of the children whose failure the parent runs with
        (``on_child_failure="ignore"`` or ``"continue"``)."""
        return {
            c.id: c.error or "" for c in await self.children() if c.status is ChildStatus.IGNORED
        }

    @property
    def is_last_attempt(self) -> bool:
        """Whether a failure now fails the job for good."""
        return self.attempt >= self.max_attempts


def attempt_text(attempt: int, max_attempts: int) -> str:
    """``attempt 2/3``; past the limit (a job retried by hand, e.g. from Bull Board, which keeps
    the attempts made) ``attempt 4 (retried by hand; 3 allowed)``."""
    if attempt <= max_attempts:
        return f"attempt {attempt}/{max_attempts}"
    return f"attempt {attempt} (retried by hand; {max_attempts} allowed)"


@dataclass(frozen=True, slots=True)
class Completed:
    """The handler returned; ``result_json`` is its return value encoded as JSON."""

    result_json: str


@dataclass(frozen=True, slots=True)
class RetryLater:
    """The attempt failed and another one is due after ``delay_ms``."""

    error: str
    traceback: str
    delay_ms: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The job failed for good (last attempt, unrecoverable error, unknown name, bad payload)."""

    error: str
    traceback: str


@dataclass(frozen=True, slots=True)
class Released:
    """The worker is shutting down and gave the job back unfinished; it does not use an attempt."""


Outcome = Completed | RetryLater | Failed | Released


def failed_attempt(
    message: QueueMessage, error: str, traceback: str, *, final: bool = False
) -> RetryLater | Failed:
    """The outcome of a failed attempt: another one after the backoff if attempts remain (and
    the failure is not ``final``), else the job fails for good."""
    if final or message.attempt >= message.max_attempts:
        return Failed(error, traceback)
    delay_ms = message.backoff.delay_for(message.attempt) if message.backoff else 0
    return RetryLater(error, traceback, delay_ms)


Dispatch = Callable[[QueueMessage], Awaitable[Outcome]]
Send = Callable[[list[NewJob]], Awaitable[list[str]]]
"""How a service writes validated jobs: ``QueueBackend.enqueue``, or a wrapper of it."""
"""What a backend calls for each delivery; the service's dispatcher (handler lookup, timeouts,
retry arithmetic) lives above the backends and is the same for all of them."""


@dataclass(slots=True)
class JobInfo:
    """A job as stored: what ``get_job`` returns and ``corral job`` prints."""

    id: str
    name: str
    data: JSON
    queue: str
    state: JobState
    attempts_made: int
    """Attempts that have ended (failed or completed); the next delivery is attempt ``+ 1``."""
    max_attempts: int
    priority: int
    enqueued_at: datetime
    run_at: datetime | None = None
    finished_at: datetime | None = None
    result: JSON = None
    error: str | None = None
    traceback: str | None = None
    """The last attempt's stack trace (``tracebacks[-1]``)."""
    tracebacks: list[str] = field(default_factory=list)
    """Every failed attempt's stack trace, oldest first (BullMQ's ``stacktrace`` list)."""
    progress: JSON = 0
    logs: list[str] = field(default_factory=list)
    parent: JobRef | None = None
    """The job's parent in a flow, if it has one."""


@dataclass(frozen=True, slots=True)
class Event:
    """One change of a queue or of a job in it, as its events stream tells it (BullMQ's names).

    ``fields`` holds the rest as stored (text): ``prev`` (the state left), ``returnvalue`` (JSON
    text), ``failedReason``, ``data`` (a progress value as JSON text), ``delay`` (when a delayed
    job is due, milliseconds since the epoch), ``attemptsMade``, ``deduplicationId``, ...
    """

    id: str
    """Its position in the stream: give it as ``since=`` to read on after it, with no gap."""
    name: str
    job_id: str | None
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class JobRecord:
    """A job as :meth:`QueueBackend.export_jobs` reads it: everything needed to recreate it in
    another queue or on another backend (:meth:`QueueBackend.import_jobs`).

    Times are milliseconds since the epoch. ``data_json`` is the payload's JSON exactly as
    stored, so a copy carries the same text.
    """

    id: str
    name: str
    data_json: str
    state: JobState
    """``waiting``, ``delayed`` or ``failed``: the states a job can be moved in."""
    priority: int
    max_attempts: int
    attempts_made: int
    backoff: Retry | None
    enqueued_at_ms: int
    run_at_ms: int | None = None
    """When a delayed job is due (absolute, so the delay left is kept however long a move
    takes); ``None`` for other states."""
    finished_at_ms: int | None = None
    """When a failed job failed."""
    error: str | None = None
    """The last failed attempt's error (failed jobs, and jobs waiting for a retry)."""
    tracebacks: list[str] = field(default_factory=list)
    progress_json: str | None = None
    logs: list[str] = field(default_factory=list)
    in_flow: bool = False
    """The job has a parent or children in a flow: a move leaves it where it is, since those
    links (and the children's results) do not travel with it."""


class ImportOutcome(enum.StrEnum):
    """What :meth:`QueueBackend.import_jobs` did with one record."""

    CREATED = "created"
    """The job was written."""
    PRESENT = "present"
    """A job with that id was already there with the same name and data (an earlier copy, e.g.
    of an interrupted move); nothing was written."""
    CONFLICT = "conflict"
    """The id is taken by a different job (another name or data, or, for a queue-assigned
    number on SQLite, a job of another queue in the same file); nothing was written."""


@dataclass(slots=True)
class JobSearch:
    """One step of a search through a state's jobs (:meth:`QueueBackend.search_jobs`)."""

    jobs: list[JobInfo]
    """The matching jobs found in this step, in the state's order."""
    next_offset: int | None
    """Where the next step starts; ``None`` once the end of the state was reached."""
