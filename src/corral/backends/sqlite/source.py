"""The worker side of one SQLite queue: claims, fenced settles, lease renewal, housekeeping.

A claim is one ``UPDATE ... RETURNING`` that moves up to N waiting jobs to *active* and gives them
a lease: a random token and an expiry. Settling a job (complete, fail, retry, release) is fenced
on that token and on the expiry: a worker whose lease ran out gets LeaseLostError and the row is
not touched. Expired leases are taken back by any worker's housekeeping and the job is delivered
again; after ``max_stalls`` such expiries it is failed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import operator
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from corral.backends.base import Claim, PullSource, dead_letter_id, dead_letter_note
from corral.backends.sqlite import flows, schedules, workers
from corral.backends.sqlite.cancel import cancel_requests
from corral.backends.sqlite.database import Database
from corral.backends.sqlite.metrics import MinuteCounter
from corral.backends.sqlite.schema import INSERT, trim_finished
from corral.errors import ChildrenPendingError, LeaseLostError
from corral.message import (
    Child,
    Completed,
    Failed,
    Outcome,
    QueueMessage,
    Released,
    RetryLater,
)
from corral.payload import decode_json
from corral.retry import Retry
from corral.settings import QueueSettings
from corral.workers import WorkerStats

logger = logging.getLogger("corral.sqlite")

MAINTAIN_EVERY_S = 1.0


def trim_slack(keep: int) -> int:
    """How many completed jobs a worker lets pile up over ``keep_completed`` before its settle
    transaction trims them: trimming reads past ``keep`` rows, so it runs every ``keep/10``."""
    return max(100, keep // 10)


_READY_SQL = (
    "SELECT 1 WHERE EXISTS (SELECT 1 FROM jobs WHERE queue = ? AND state = 'waiting') "
    "OR EXISTS (SELECT 1 FROM jobs WHERE queue = ? AND state = 'delayed' AND run_at <= ?)"
)

# A settle changes a job only while the claim's lease holds (its parameters: seq, token, now).
_FENCE = "seq = ? AND lease_token = ? AND state = 'active' AND lease_expires_at >= ?"
_COMPLETE = (
    "UPDATE jobs SET state = 'completed', result = ?, finished_at = ?, "
    "attempts_made = attempts_made + 1, lease_token = NULL, lease_expires_at = NULL "
    f"WHERE {_FENCE} AND {flows.OPEN_CHILDREN}"
)
_DELETE = f"DELETE FROM jobs WHERE {_FENCE} AND {flows.OPEN_CHILDREN}"
# A job without a parent, and one of a flow's children (whose parent the settle must update).
# A job may become a child while it runs (a flow naming it), so the first is a guess: when it
# changes nothing, the second says whether the lease or the children refused it.
_COMPLETE_ORPHAN = f"{_COMPLETE} AND parent_seq IS NULL"
_COMPLETE_CHILD = f"{_COMPLETE} RETURNING parent_seq"
_DELETE_ORPHAN = f"{_DELETE} AND parent_seq IS NULL"
_DELETE_CHILD = f"{_DELETE} RETURNING parent_seq"

_Pending = tuple[Claim[int], Outcome, bool, "asyncio.Future[tuple[bool | str, list[Claim[int]]]]"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_datetime(ms: Any) -> datetime | None:
    if not isinstance(ms, int):  # NULL, or text a foreign writer put in the column
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, ValueError, OSError):  # out of datetime's range
        return None


_CLAIM_ORDER = operator.itemgetter(6, 9, 0)


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) else 0


@functools.lru_cache(maxsize=256)
def _parse_backoff(text: str) -> Retry | None:
    """The backoff column, parsed once per distinct value (raises ValueError if unreadable)."""
    return Retry.from_bullmq(decode_json(text))


class SQLiteSource(PullSource[int]):
    """Claims, settles and housekeeping of one queue; a claim's handle is the row's ``seq``."""

    def __init__(
        self, db: Database, queue: str, settings: QueueSettings, stop: asyncio.Event
    ) -> None:
        self.db = db
        self.queue = queue
        self.settings = settings
        self._stop = stop
        self.lease_s = settings.lease_s
        self.lease_ms = max(1, round(self.lease_s * 1000))
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._last_maintain = 0.0
        self._pending: list[_Pending] = []
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()
        keep = settings.keep_completed
        # Completions since this worker last trimmed; starting full, its first settle trims.
        self._trim_slack = trim_slack(keep) if keep else 0
        self._untrimmed = self._trim_slack
        self._metrics = MinuteCounter(queue, settings.metrics_minutes)
        db.register(queue, self)

    async def aclose(self) -> None:
        self.db.unregister(self.queue, self)

    # Claiming ---------------------------------------------------------------------------

    async def claim(self, max_jobs: int) -> list[Claim[int]]:
        now = now_ms()
        # A read needs no lock: only take the write lock when there is something to claim,
        # so idle workers woken by other queues' commits do not contend with producers.
        if not self.db.read(_READY_SQL, (self.queue, self.queue, now)):
            return []
        token = secrets.token_hex(8)
        rows = await self.db.write(lambda conn: self._take(conn, now, token, max_jobs))
        return self._claims(rows, token)

    def _take(self, conn: sqlite3.Connection, now: int, token: str, max_jobs: int) -> list[Any]:
        """Promote due delayed jobs and lease up to ``max_jobs`` waiting ones (in a transaction).

        A leased job of a schedule writes the schedule's next job in the same transaction.
        """
        queue = self.queue
        conn.execute(
            "UPDATE jobs SET state = 'waiting' WHERE queue = ? AND state = 'delayed' "
            "AND run_at <= ?",
            (queue, now),
        )
        paused = conn.execute("SELECT paused FROM queues WHERE name = ?", (queue,)).fetchone()
        if paused is not None and paused[0]:
            return []
        rows = conn.execute(
            "UPDATE jobs SET state = 'active', lease_token = ?, lease_expires_at = ?, "
            "started_at = ? WHERE seq IN (SELECT seq FROM jobs WHERE queue = ? AND "
            "state = 'waiting' ORDER BY priority, run_at, seq LIMIT ?) RETURNING "
            "seq, custom_id, name, data, attempts_made, max_attempts, priority, "
            "enqueued_at, backoff, run_at, scheduler, deferred_failure, trace_context",
            (token, now + self.lease_ms, now, queue, max_jobs),
        ).fetchall()
        for row in rows:
            if row[10] is not None and isinstance(row[1], str):
                schedules.advance(conn, queue, row[10], row[1], now)
        return rows

    def _claims(self, rows: list[Any], token: str) -> list[Claim[int]]:
        # Priority, run_at, seq. A foreign row may hold text where numbers belong: it must not
        # break the sort (and with it the whole batch); _claim fails it as unreadable.
        try:
            rows.sort(key=_CLAIM_ORDER)
        except TypeError:
            rows.sort(key=lambda r: (_int_or_zero(r[6]), _int_or_zero(r[9]), r[0]))
        return [self._claim(row, token) for row in rows]

    def _claim(self, row: Sequence[Any], token: str) -> Claim[int]:
        (
            seq,
            custom_id,
            name,
            data,
            attempts_made,
            max_attempts,
            priority,
            enqueued_at,
            backoff,
            _run_at,
            _scheduler,
            deferred_failure,
            trace_context,
        ) = row
        job_id = custom_id if custom_id is not None else str(seq)
        if deferred_failure is not None:  # a child failed it: it fails without running
            return Claim(job_id, token, None, seq, deferred_failure=str(deferred_failure))
        try:
            payload = decode_json(data)
            if not isinstance(name, str) or not name:
                raise ValueError(f"job name is {name!r}")
            if not isinstance(max_attempts, int) or not isinstance(attempts_made, int):
                raise ValueError("attempt counters are not integers")
            retry = _parse_backoff(backoff) if backoff else None
            if not isinstance(priority, int) or not isinstance(enqueued_at, int):
                raise ValueError("priority or enqueued_at is not an integer")
        except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as exc:
            return Claim(job_id, token, None, seq, unreadable=str(exc))
        message = QueueMessage(
            id=job_id,
            name=name,
            data=payload,
            queue=self.queue,
            attempt=attempts_made + 1,
            max_attempts=max(1, max_attempts),
            priority=priority,
            enqueued_at=to_datetime(enqueued_at) or datetime.fromtimestamp(0, UTC),
            backoff=retry,
            trace_context=trace_context if isinstance(trace_context, str) else None,
            _progress=self._progress_writer(seq, token),
            _log=self._log_writer(seq),
            _max_bytes=self.settings.max_payload_bytes,
            _children=self._children_reader(seq),
        )
        return Claim(job_id, token, message, seq)

    def _children_reader(self, seq: int) -> Callable[[], Any]:
        async def read() -> list[Child]:
            return flows.read_children(self.db.read(flows.CHILDREN_SQL, (seq,)))

        return read

    def _progress_writer(self, seq: int, token: str) -> Callable[[str], Any]:
        async def write(text: str) -> None:
            await self.db.write(
                lambda conn: conn.execute(
                    "UPDATE jobs SET progress = ? WHERE seq = ? AND lease_token = ?",
                    (text, seq, token),
                )
            )

        return write

    def _log_writer(self, seq: int) -> Callable[[str], Any]:
        async def write(text: str) -> None:
            await self.db.write(
                lambda conn: conn.execute(
                    "UPDATE jobs SET logs = json_insert(coalesce(logs, '[]'), '$[#]', ?) "
                    "WHERE seq = ?",
                    (text, seq),
                )
            )

        return write

    # Settling ---------------------------------------------------------------------------

    async def settle(
        self, claim: Claim[int], outcome: Outcome, *, fetch_next: bool = False
    ) -> list[Claim[int]]:
        # Group commit: settles that arrive in the same loop iteration share one transaction.
        future: asyncio.Future[tuple[bool | str, list[Claim[int]]]] = self._loop.create_future()
        self._pending.append((claim, outcome, fetch_next, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._start_flush)
        kept, fetched = await future
        if isinstance(kept, str):
            raise ChildrenPendingError(kept)
        if not kept:
            raise LeaseLostError(
                f"lease on job {claim.job_id} expired or was taken over before it could be "
                f"settled ({type(outcome).__name__}); the job was left untouched"
            )
        if isinstance(outcome, RetryLater | Released):
            self.wake()
        return fetched

    def _start_flush(self) -> None:
        task = self._loop.create_task(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flush_scheduled = False
        now = now_ms()
        # Fetch-next: a finished job's slot is leased its next job in the same transaction
        # (one commit per job instead of two, as BullMQ's moveToFinished does).
        fetch = sum(1 for _, _, fetch_next, _ in batch if fetch_next)
        token = secrets.token_hex(8)
        fetched_rows: list[Any] = []
        woken: set[str] = set()
        if self._trim_slack:
            self._untrimmed += sum(isinstance(outcome, Completed) for _, outcome, _, _ in batch)
        trim = self._trim_slack and self._untrimmed >= self._trim_slack
        if trim:
            self._untrimmed = 0

        def apply_all(conn: sqlite3.Connection) -> list[bool | str]:
            fetched_rows.clear()
            woken.clear()
            kept = [self._apply(conn, claim, outcome, now, woken) for claim, outcome, _, _ in batch]
            if trim:
                # keep_completed holds while jobs flow, not only at housekeeping.
                trim_finished(conn, self.queue, "completed", self.settings.keep_completed or 0)
            completed = failed = 0
            for (_, outcome, _, _), ok in zip(batch, kept, strict=True):
                if ok is True:
                    completed += isinstance(outcome, Completed)
                    failed += isinstance(outcome, Failed)
            self._metrics.count(conn, now, completed, failed)
            if fetch:
                fetched_rows.extend(self._take(conn, now, token, fetch))
            return kept

        try:
            kept = await self.db.write(apply_all)
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for queue in woken:  # parents released by their last child
            self.db.notify(queue)
        fetched = self._claims(fetched_rows, token) if fetched_rows else []
        for (_, _, fetch_next, future), ok in zip(batch, kept, strict=True):
            given = [fetched.pop(0)] if fetch_next and fetched and ok is True else []
            if future.done():  # its caller was cancelled: the lease is the loop's to renew
                fetched[:0] = given
                continue
            future.set_result((ok, given))
        if fetched:  # callers gone: give them back at once rather than let leases expire
            task = self._loop.create_task(self._release(fetched))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _release(self, claims: list[Claim[int]]) -> None:
        for claim in claims:
            try:
                await self.settle(claim, Released())
            except Exception as exc:  # its lease expires and it runs again
                logger.debug("job %s: could not release it: %s", claim.job_id, exc)

    def _apply(
        self,
        conn: sqlite3.Connection,
        claim: Claim[int],
        outcome: Outcome,
        now: int,
        woken: set[str],
    ) -> bool | str:
        """Apply one outcome under the claim's fence; ``False`` (and no change) if it is stale,
        the reason (and no change) if it is a parent that cannot complete yet."""
        seq = claim.handle
        fence = _FENCE
        fence_args = (seq, claim.token, now)
        if isinstance(outcome, Completed):
            # A child's result is recorded for its parent in the same transaction: a parent
            # cannot be stranded between "child completed" and "parent released".
            delete = self.settings.keep_completed == 0
            args = fence_args if delete else (outcome.result_json, now, *fence_args)
            # Most jobs have no parent: for them one statement without RETURNING does it
            # (RETURNING costs SQLite a temporary table per statement).
            if conn.execute(_DELETE_ORPHAN if delete else _COMPLETE_ORPHAN, args).rowcount == 1:
                return True
            done = conn.execute(_DELETE_CHILD if delete else _COMPLETE_CHILD, args).fetchall()
            if not done:
                return self._refusal(conn, claim, _FENCE, fence_args)
            parent_seq = done[0][0]
            if parent_seq is not None:
                self._woke(
                    woken,
                    flows.child_completed(conn, seq, parent_seq, outcome.result_json, now),
                )
            return True
        if isinstance(outcome, RetryLater):
            state = "delayed" if outcome.delay_ms > 0 else "waiting"
            cursor = conn.execute(
                "UPDATE jobs SET state = ?, run_at = ?, attempts_made = attempts_made + 1, "
                f"error = ?, traceback = ?, tracebacks = {_APPEND_TRACE}, lease_token = NULL, "
                f"lease_expires_at = NULL WHERE {fence}",
                (
                    state,
                    now + outcome.delay_ms,
                    outcome.error,
                    outcome.traceback,
                    outcome.traceback,
                    outcome.traceback,
                    *fence_args,
                ),
            )
            return cursor.rowcount == 1
        if isinstance(outcome, Failed):
            failed = conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?, traceback = ?, "
                f"tracebacks = {_APPEND_TRACE}, finished_at = ?, deferred_failure = NULL, "
                "attempts_made = attempts_made + 1, lease_token = NULL, "
                f"lease_expires_at = NULL WHERE {fence} RETURNING parent_seq, parent_policy",
                (outcome.error, outcome.traceback, *[outcome.traceback] * 2, now, *fence_args),
            ).fetchall()
            if not failed:
                return False
            parent_seq, policy = failed[0]
            if parent_seq is not None:
                self._woke(
                    woken, flows.child_failed(conn, seq, parent_seq, policy, outcome.error, now)
                )
            self._dead_letter(conn, seq, outcome.error, now)
            if self.settings.keep_failed is not None:
                trim_finished(conn, self.queue, "failed", self.settings.keep_failed)
            return True
        if isinstance(outcome, Released):
            cursor = conn.execute(
                "UPDATE jobs SET state = 'waiting', lease_token = NULL, "
                f"lease_expires_at = NULL WHERE {fence}",
                fence_args,
            )
            return cursor.rowcount == 1
        raise TypeError(f"unknown outcome {outcome!r}")  # pragma: no cover - exhaustive

    @staticmethod
    def _refusal(
        conn: sqlite3.Connection, claim: Claim[int], fence: str, fence_args: tuple[Any, ...]
    ) -> bool | str:
        """Why a completion changed nothing: the lease is gone (``False``), or the job is a
        parent with children pending or failed (the reason)."""
        if conn.execute(f"SELECT 1 FROM jobs WHERE {fence}", fence_args).fetchone() is None:
            return False
        counts = dict(
            conn.execute(
                "SELECT status, count(*) FROM dependencies WHERE parent_seq = ? AND status IN "
                "('pending', 'failed') GROUP BY status",
                (claim.handle,),
            ).fetchall()
        )
        return children_refusal(claim.job_id, counts.get("pending", 0), counts.get("failed", 0))

    def _woke(self, woken: set[str], queue: str | None) -> None:
        if queue is not None:
            woken.add(queue)

    def _dead_letter(self, conn: sqlite3.Connection, seq: int, error: str, now: int) -> None:
        target = self.settings.dead_letter
        if target is None:
            return
        row = conn.execute(
            "SELECT custom_id, name, data, max_attempts, backoff, attempts_made FROM jobs "
            "WHERE seq = ?",
            (seq,),
        ).fetchone()
        custom_id, name, data, max_attempts, backoff, attempts_made = row
        origin = custom_id if custom_id is not None else str(seq)
        note = dead_letter_note(self.queue, origin, attempts_made, error)
        conn.execute(
            INSERT + " ON CONFLICT DO NOTHING",
            (
                target,
                dead_letter_id(self.queue, origin),
                name,
                data,
                "waiting",
                0,
                now,
                now,
                max_attempts,
                backoff,
                json.dumps([note]),
                None,
            ),
        )
        self.db.notify(target)

    async def cancel_requests(self, claims: Sequence[Claim[int]]) -> dict[Claim[int], str]:
        return cancel_requests(self.db, claims)

    async def extend(self, claims: Sequence[Claim[int]]) -> list[Claim[int]]:
        now = now_ms()
        until = now + self.lease_ms
        by_token: dict[str, list[Claim[int]]] = {}
        for claim in claims:
            by_token.setdefault(claim.token, []).append(claim)

        def renew(conn: sqlite3.Connection) -> list[Claim[int]]:
            lost: list[Claim[int]] = []
            for token, group in by_token.items():
                seqs = [c.handle for c in group]
                marks = ",".join("?" * len(seqs))
                kept = {
                    r[0]
                    for r in conn.execute(
                        f"UPDATE jobs SET lease_expires_at = ? WHERE seq IN ({marks}) AND "
                        "lease_token = ? AND state = 'active' AND lease_expires_at >= ? "
                        "RETURNING seq",
                        (until, *seqs, token, now),
                    )
                }
                lost.extend(c for c in group if c.handle not in kept)
            return lost

        return await self.db.write(renew)

    async def maintain(self) -> None:
        if time.monotonic() - self._last_maintain < min(MAINTAIN_EVERY_S, self.lease_s / 3):
            return
        self._last_maintain = time.monotonic()
        now = now_ms()
        settings = self.settings
        queue = self.queue
        trim_completed = settings.keep_completed is not None and (
            self.db.read(
                "SELECT 1 FROM jobs WHERE queue = ? AND state = 'completed' LIMIT 1 OFFSET ?",
                (queue, settings.keep_completed),
            )
        )
        expired_any = self.db.read(
            "SELECT 1 FROM jobs WHERE queue = ? AND state = 'active' AND lease_expires_at < ? "
            "LIMIT 1",
            (queue, now),
        )
        if not trim_completed and not expired_any:
            return

        woken: set[str] = set()

        def housekeeping(conn: sqlite3.Connection) -> tuple[int, int]:
            woken.clear()
            expired = conn.execute(
                "SELECT seq, stalls, scheduler, parent_seq, parent_policy FROM jobs WHERE "
                "queue = ? AND state = 'active' AND lease_expires_at < ?",
                (queue, now),
            ).fetchall()
            requeued = failed = 0
            for seq, stalls, scheduler, parent_seq, policy in expired:
                # As BullMQ: a job of a live schedule is never failed for stalling.
                if stalls + 1 > settings.max_stalls and not (
                    scheduler is not None and schedules.schedule_exists(conn, queue, scheduler)
                ):
                    error = (
                        f"job stalled more than allowable limit ({settings.max_stalls}): "
                        "its worker stopped renewing the lease (crashed or was killed)"
                    )
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', stalls = stalls + 1, finished_at = ?, "
                        "attempts_made = attempts_made + 1, error = ?, lease_token = NULL, "
                        "lease_expires_at = NULL, deferred_failure = NULL WHERE seq = ?",
                        (now, error, seq),
                    )
                    if parent_seq is not None:
                        self._woke(
                            woken, flows.child_failed(conn, seq, parent_seq, policy, error, now)
                        )
                    self._dead_letter(conn, seq, "stalled", now)
                    failed += 1
                else:
                    conn.execute(
                        "UPDATE jobs SET state = 'waiting', stalls = stalls + 1, "
                        "lease_token = NULL, lease_expires_at = NULL WHERE seq = ?",
                        (seq,),
                    )
                    requeued += 1
            if settings.keep_completed is not None:
                trim_finished(conn, queue, "completed", settings.keep_completed)
            return requeued, failed

        requeued, failed = await self.db.write(housekeeping)
        for released in woken:
            self.db.notify(released)
        if requeued or failed:
            logger.warning(
                "queue %r: %d job(s) whose lease expired were requeued, %d failed as stalled",
                queue,
                requeued,
                failed,
            )
            self.wake()

    async def beat(self, stats: WorkerStats, *, leaving: bool = False) -> None:
        now = now_ms()
        await self.db.write(lambda conn: workers.beat(conn, stats, now, leaving=leaving))

    # Waiting ----------------------------------------------------------------------------

    async def wait_for_work(self, timeout_s: float) -> None:
        next_due = self.db.read(
            "SELECT min(run_at) FROM jobs WHERE queue = ? AND state = 'delayed'", (self.queue,)
        )[0][0]
        if isinstance(next_due, int):
            timeout_s = min(timeout_s, max(0.0, (next_due - now_ms()) / 1000))
        if not self._wake.is_set() and timeout_s > 0:
            woken = asyncio.ensure_future(self._wake.wait())
            changed = asyncio.ensure_future(self.db.changed(timeout_s))
            try:
                await asyncio.wait({woken, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
                changed.cancel()
        self._wake.clear()

    def wake(self) -> None:
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)


def children_refusal(job_id: str, pending: int, failed: int) -> str:
    """Why a parent cannot complete (the ChildrenPendingError message)."""
    if failed:
        return (
            f"job {job_id} cannot complete: {failed} of its children failed it "
            "(on_child_failure='fail'); retry them first"
        )
    return (
        f"job {job_id} cannot complete while {pending} of its children are pending "
        "(it was released early, by on_child_failure='continue' or a retry)"
    )


# The attempt's traceback appended to the JSON list of every attempt's (an empty one is not).
# Its two parameters are the same traceback.
_APPEND_TRACE = (
    "CASE WHEN ? = '' THEN tracebacks ELSE json_insert(coalesce(tracebacks, '[]'), '$[#]', ?) END"
)
