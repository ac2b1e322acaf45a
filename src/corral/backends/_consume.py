"""The worker loop every pull backend shares: claim, run, settle, keep leases alive.

:func:`consume` gives the delivery contract of ``QueueBackend.start_consuming`` over one or more
:class:`~corral.backends.base.PullSource` objects (one per queue): bounded concurrency per queue
and in total, lease heartbeats, fetch-next buffering, burst mode and the phased shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from corral.errors import (
    BackendAuthError,
    BackendConnectionError,
    ChildrenPendingError,
    LeaseLostError,
)
from corral.message import Dispatch, Failed, Outcome, Released, failed_attempt
from corral.workers import WorkerStats

if TYPE_CHECKING:
    from corral.backends.base import Claim, PullSource

logger = logging.getLogger("corral.worker")


class _Queue:
    """The loop's book-keeping for one source: its limit, what it holds, its wake-up."""

    __slots__ = ("freed", "held", "limit", "source")

    def __init__(self, source: PullSource[Any], limit: int) -> None:
        self.source = source
        self.limit = limit
        self.held: set[Claim[Any]] = set()  # claimed, not yet settled: buffered or running
        self.freed = asyncio.Event()  # one of its claims was settled


async def consume(
    sources: Sequence[tuple[PullSource[Any], int]],
    dispatch: Dispatch,
    *,
    total: int | None = None,
    stop: asyncio.Event,
    burst: bool,
    shutdown_grace_s: float,
    idle_wait_s: float = 1.0,
) -> None:
    """Run the jobs of ``sources`` (each with its concurrency) through ``dispatch`` until
    ``stop``; ``total`` caps all of them together (see ``start_consuming``)."""
    queues = [_Queue(source, limit) for source, limit in sources]
    ready: asyncio.Queue[Claim[Any] | None] = asyncio.Queue()
    owner: dict[Claim[Any], _Queue] = {}  # every claim held, by the queue it came from
    running: dict[Claim[Any], asyncio.Task[Any]] = {}
    # Claims whose outcome is being written. A renewal racing that write may find the job
    # already settled and call its lease lost: the settle itself reports a lease really lost.
    settling: set[Claim[Any]] = set()
    errors = _ErrorPacer(stop)
    # Fetch-next refills the slot a job frees with a job of the same queue. Under a shared cap
    # that would let a busy queue keep every slot, so then freed slots are claimed afresh.
    fetch_next_allowed = total is None or len(queues) == 1
    # Burst mode ends once every queue found nothing to claim since the last settle, with
    # nothing in flight: a job settling in one queue may release a parent (a flow) into
    # another. ``generation`` counts settles; ``settled`` is set (and dropped) at each, and
    # made only when a queue looks for work (not once per settle).
    generation = 0
    settled: asyncio.Event | None = None
    idle_at: dict[_Queue, int] = {}  # the generation at which a queue last found nothing
    drained = asyncio.Event()
    beat_s = max(0.05, min(queue.source.lease_s for queue in queues) / 3)
    stats = WorkerStats([queue.source.queue for queue in queues], beat_s)

    def hold(queue: _Queue, claims: Sequence[Claim[Any]]) -> None:
        for claim in claims:
            queue.held.add(claim)
            owner[claim] = queue
            ready.put_nowait(claim)

    def free(claim: Claim[Any]) -> None:
        nonlocal settled, generation
        queue = owner.pop(claim, None)
        if queue is None:
            return
        queue.held.discard(claim)
        if total is None:
            queue.freed.set()
        else:
            for each in queues:
                each.freed.set()
        if burst:
            generation += 1
            if settled is not None:
                settled.set()
                settled = None

    async def settle(claim: Claim[Any], outcome: Outcome) -> None:
        queue = owner.get(claim)
        if queue is None:
            return
        fetch_next = fetch_next_allowed and not stop.is_set() and not isinstance(outcome, Released)
        settling.add(claim)
        try:
            try:
                more = await queue.source.settle(claim, outcome, fetch_next=fetch_next)
            except ChildrenPendingError as exc:
                # A parent released early (on_child_failure="continue") or retried by hand
                # while children are unsettled: that attempt fails, as BullMQ's worker does.
                assert claim.message is not None
                retry = failed_attempt(claim.message, str(exc), "")
                logger.warning("job %s: %s", claim.job_id, exc)
                more = await queue.source.settle(claim, retry, fetch_next=fetch_next)
            hold(queue, more)  # before the slot is freed, so nothing claims it twice
            stats.done += not isinstance(outcome, Released)
        except LeaseLostError as exc:
            logger.warning("job %s: %s", claim.job_id, exc)
        except BackendConnectionError as exc:
            # An outage fails every running job's settle at once: one line for the outage.
            errors.failed(
                f"recording the outcome of job {claim.job_id}",
                exc,
                then="jobs whose outcome was lost run again once their lease expires",
            )
        except Exception:
            # The lease will expire and the job will be delivered again: at-least-once holds.
            logger.exception(
                "job %s: could not record its outcome; it will run again", claim.job_id
            )
        finally:
            settling.discard(claim)
            free(claim)

    async def run(claim: Claim[Any], task: asyncio.Task[Any]) -> None:
        if claim.message is None:
            if claim.deferred_failure is not None:
                logger.error(
                    "job %s failed without running: %s", claim.job_id, claim.deferred_failure
                )
                await settle(claim, Failed(claim.deferred_failure, ""))
            else:
                await settle(claim, Failed(f"unreadable job: {claim.unreadable}", ""))
            return
        running[claim] = task
        try:
            outcome = await dispatch(claim.message)
        except asyncio.CancelledError:
            running.pop(claim, None)
            await asyncio.shield(settle(claim, Released()))
            raise
        except Exception as exc:  # dispatch handles handler errors; this is a bug guard
            logger.exception("job %s: dispatch failed", claim.job_id)
            outcome = Failed(f"internal error: {exc!r}", "")
        running.pop(claim, None)
        await settle(claim, outcome)

    async def slot_loop() -> None:
        task = asyncio.current_task()  # once per slot: run() records it per job
        assert task is not None
        while True:
            claim = await ready.get()
            if claim is None:
                return
            if stop.is_set():
                await settle(claim, Released())
                continue
            await run(claim, task)

    async def fetch_loop(queue: _Queue, stop_wait: asyncio.Future[Any]) -> None:
        nonlocal settled
        source = queue.source
        # Housekeeping first: leases that expired while no worker ran are taken back now.
        await errors.guard(source.maintain(), "housekeeping")
        while not stop.is_set():
            room = queue.limit - len(queue.held)
            if total is not None:
                room = min(room, total - len(owner))
            if room <= 0:
                queue.freed.clear()
                await queue.freed.wait()
                continue
            if burst and settled is None:
                settled = asyncio.Event()
            generation_before, settled_before = generation, settled
            claims = await errors.guard(source.claim(room), "claiming jobs")
            if stop.is_set():
                for claim in claims or ():
                    with contextlib.suppress(Exception):
                        await source.settle(claim, Released())
                return
            if claims is not None:
                errors.ok()  # also after a claim that found jobs, or recovery goes unlogged
            if claims:
                hold(queue, claims)
                continue
            if burst and not queue.held and claims is not None:
                idle_at[queue] = generation_before
                if not owner and all(idle_at.get(each) == generation for each in queues):
                    drained.set()  # every queue came up empty after the last settle
                    return
                # Other queues are busy, or have not looked since a settle: wait for them.
                assert settled_before is not None
                await _first(stop_wait, settled_before.wait(), drained.wait())
                if drained.is_set():
                    return
                continue
            queue.freed.clear()
            await _first(
                stop_wait,
                queue.freed.wait(),
                errors.guard(source.wait_for_work(idle_wait_s), "waiting for jobs"),
            )

    async def fetch_all() -> None:
        stop_wait = asyncio.ensure_future(stop.wait())

        def on_stop(_: object) -> None:  # a stop also ends every wait for a free slot
            for queue in queues:
                queue.freed.set()

        stop_wait.add_done_callback(on_stop)
        try:
            await asyncio.gather(*(fetch_loop(queue, stop_wait) for queue in queues))
        finally:
            stop_wait.cancel()

    async def heartbeat() -> None:
        while True:
            stats.running = len(running)
            try:  # not paced like the calls below: a missed beat must not delay renewals
                await queues[0].source.beat(stats)
            except Exception as exc:
                logger.debug("could not record the worker's heartbeat: %s", exc)
            await asyncio.sleep(beat_s)
            for queue in queues:
                if queue.held:
                    # Claims being settled are renewed too: their write may wait a while.
                    lost = await errors.guard(
                        queue.source.extend(list(queue.held)), "renewing leases"
                    )
                    for claim in lost or ():
                        # A job settled while its renewal was on the way is not lost: only a
                        # claim still held, and not being settled, whose lease could not be
                        # renewed is.
                        if claim in queue.held and claim not in settling:
                            logger.warning(
                                "job %s: lease lost (held longer than lease_s without "
                                "renewal); another worker may run it",
                                claim.job_id,
                            )
                    asked = await errors.guard(
                        queue.source.cancel_requests(list(queue.held)), "reading cancel requests"
                    )
                    for claim, reason in (asked or {}).items():
                        if claim.message is not None and claim in queue.held:
                            claim.message._request_cancel(reason)
                await errors.guard(queue.source.maintain(), "housekeeping")

    limit_sum = sum(queue.limit for queue in queues)
    slot_count = min(total, limit_sum) if total is not None else limit_sum
    slots = [asyncio.create_task(slot_loop(), name=f"corral-slot-{i}") for i in range(slot_count)]
    beat = asyncio.create_task(heartbeat(), name="corral-heartbeat")
    fetcher = asyncio.create_task(fetch_all(), name="corral-fetch")
    try:
        await fetcher
        # Phase 1: no more claims. Let running jobs finish within the grace period.
        for _ in slots:
            ready.put_nowait(None)
        _, pending = (
            await asyncio.wait(slots, timeout=shutdown_grace_s) if slots else (set(), set())
        )
        # Phase 2: cancel what is left; each cancelled job is released for another worker.
        if pending:
            logger.warning(
                "shutdown: %d job(s) still running after %.1fs; releasing them",
                len(running),
                shutdown_grace_s,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5.0)
    finally:
        for task in (*slots, fetcher):
            task.cancel()
        # Claims that no slot picked up (buffered, or fetched with a finished job) go back too.
        while not ready.empty():
            claim = ready.get_nowait()
            queue = owner.get(claim) if claim is not None else None
            if claim is not None and queue is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(queue.source.settle(claim, Released()), 2.0)
                free(claim)
        beat.cancel()
        await asyncio.gather(*slots, fetcher, beat, return_exceptions=True)
        with contextlib.suppress(Exception):  # else its heartbeat goes stale
            await asyncio.wait_for(queues[0].source.beat(stats, leaving=True), 2.0)


async def _first(*aws: Any) -> None:
    """Wait until the first of ``aws`` finishes; cancel the others (not shared futures)."""
    tasks = [a if isinstance(a, asyncio.Future) else asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task, original in zip(tasks, aws, strict=True):
            if task is not original:
                task.cancel()


_MAX_PAUSE_S = 2.0  # the longest pause between retries: a worker resumes this soon after an outage


class _ErrorPacer:
    """Swallow storage errors in the loop with a growing pause and a bounded number of log lines,
    so an outage gives a few clear lines and a prompt recovery, not a traceback storm."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.failures = 0  # failed calls since the storage last answered
        self.retries = 0  # paced retries among them: sets the pause
        self.stop = stop

    def ok(self) -> None:
        if self.failures:
            logger.warning(
                "storage reachable again after %d failed call(s); resuming", self.failures
            )
        self.failures = 0
        self.retries = 0

    def failed(self, doing: str, exc: Exception, then: str = "retrying with backoff") -> None:
        """Count a failed call; log the first of an outage and every 20th, without traceback."""
        self.failures += 1
        if self.failures == 1:
            logger.error("storage error while %s: %s; %s", doing, exc, then)
        elif self.failures % 20 == 0:
            logger.error(
                "storage still failing while %s (%d attempts): %s", doing, self.failures, exc
            )
        else:
            logger.debug("storage error while %s: %s", doing, exc)

    async def guard(self, coro: Any, doing: str) -> Any:
        try:
            return await coro
        except (asyncio.CancelledError, BackendAuthError):
            raise  # wrong credentials stay wrong: the worker stops and says why
        except Exception as exc:
            self.failed(doing, exc)
            self.retries += 1
            pause_s = min(0.1 * 2 ** min(self.retries - 1, 6), _MAX_PAUSE_S)
            # Paced, but a stop request during an outage is honoured at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), pause_s)
            return None
