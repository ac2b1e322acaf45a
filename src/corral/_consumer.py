"""The worker loop shared by pull backends: claim in batches, run, settle, keep leases alive.

A backend supplies a :class:`PullSource` (claim / settle / extend / wait) and gets the whole
delivery contract of :meth:`QueueBackend.start_consuming` from :func:`consume`: bounded
concurrency, lease heartbeats, burst mode and the phased shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.errors import BackendConnectionError, LeaseLostError
from corral.message import Dispatch, Failed, Outcome, QueueMessage, Released

logger = logging.getLogger("corral.worker")


@dataclass(eq=False, slots=True)
class Claim:
    """A job this worker holds a lease on. ``message`` is ``None`` when the job was unreadable,
    in which case ``unreadable`` says why and the job is failed without running."""

    job_id: str
    token: str
    message: QueueMessage | None
    unreadable: str | None = None
    extra: Any = field(default=None, repr=False)
    """Backend-private state carried from claim to settle (e.g. BullMQ's raw job)."""


class PullSource(ABC):
    """The primitives a pull backend gives :func:`consume`."""

    lease_s: float

    @abstractmethod
    async def claim(self, max_jobs: int) -> list[Claim]:
        """Atomically lease up to ``max_jobs`` ready jobs (none if the queue is paused)."""

    @abstractmethod
    async def settle(self, claim: Claim, outcome: Outcome) -> None:
        """Apply ``outcome`` if ``claim``'s lease is still held, else raise LeaseLostError."""

    @abstractmethod
    async def extend(self, claims: Sequence[Claim]) -> list[Claim]:
        """Push the leases of ``claims`` ``lease_s`` into the future; return those already lost."""

    @abstractmethod
    async def wait_for_work(self, timeout_s: float) -> None:
        """Return when a job may be ready, or after ``timeout_s`` (a hint; may return early)."""

    async def maintain(self) -> None:  # noqa: B027  (optional hook)
        """Periodic housekeeping (stalled jobs, promotions); called about every ``lease_s / 3``."""

    def wake(self) -> None:  # noqa: B027  (optional hook)
        """Interrupt a pending :meth:`wait_for_work` (a job was enqueued in this process)."""


async def consume(
    source: PullSource,
    dispatch: Dispatch,
    *,
    concurrency: int,
    stop: asyncio.Event,
    burst: bool,
    shutdown_grace_s: float,
    idle_wait_s: float = 1.0,
) -> None:
    """Run ``source``'s jobs through ``dispatch`` until ``stop`` (see ``start_consuming``)."""
    ready: asyncio.Queue[Claim | None] = asyncio.Queue()
    held: set[Claim] = set()  # claimed and not yet settled: buffered or running
    running: dict[Claim, asyncio.Task[Any]] = {}
    slot_free = asyncio.Event()
    errors = _ErrorPacer(stop)

    async def settle(claim: Claim, outcome: Outcome) -> None:
        try:
            await source.settle(claim, outcome)
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
            held.discard(claim)
            slot_free.set()

    async def run(claim: Claim, task: asyncio.Task[Any]) -> None:
        if claim.message is None:
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

    async def fetch_loop() -> None:
        stop_wait = asyncio.ensure_future(stop.wait())
        # A stop request also ends the wait for a free slot, which needs no task per wait then.
        stop_wait.add_done_callback(lambda _: slot_free.set())
        # Housekeeping first: leases that expired while no worker ran are taken back now.
        await errors.guard(source.maintain(), "housekeeping")
        try:
            while not stop.is_set():
                free = concurrency - len(held)
                if free <= 0:
                    slot_free.clear()
                    await slot_free.wait()
                    continue
                claims = await errors.guard(source.claim(free), "claiming jobs")
                if stop.is_set():
                    for claim in claims or ():
                        await settle(claim, Released())
                    return
                if claims is not None:
                    errors.ok()  # also after a claim that found jobs, or recovery goes unlogged
                if claims:
                    for claim in claims:
                        held.add(claim)
                        ready.put_nowait(claim)
                    continue
                if burst and not held and claims is not None:
                    return
                slot_free.clear()
                await _first(
                    stop_wait,
                    slot_free.wait(),
                    errors.guard(source.wait_for_work(idle_wait_s), "waiting for jobs"),
                )
        finally:
            stop_wait.cancel()

    async def heartbeat() -> None:
        interval = max(0.05, source.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            if held:
                lost = await errors.guard(source.extend(list(held)), "renewing leases")
                for claim in lost or ():
                    logger.warning(
                        "job %s: lease lost (held longer than lease_s without "
                        "renewal); another worker may run it",
                        claim.job_id,
                    )
            await errors.guard(source.maintain(), "housekeeping")

    slots = [asyncio.create_task(slot_loop(), name=f"corral-slot-{i}") for i in range(concurrency)]
    beat = asyncio.create_task(heartbeat(), name="corral-heartbeat")
    fetcher = asyncio.create_task(fetch_loop(), name="corral-fetch")
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
        # Buffered claims that no slot picked up go back too.
        while not ready.empty():
            claim = ready.get_nowait()
            if claim is not None and claim in held:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(source.settle(claim, Released()), 2.0)
                held.discard(claim)
        beat.cancel()
        await asyncio.gather(*slots, fetcher, beat, return_exceptions=True)


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
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed(doing, exc)
            self.retries += 1
            pause_s = min(0.1 * 2 ** min(self.retries - 1, 6), _MAX_PAUSE_S)
            # Paced, but a stop request during an outage is honoured at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), pause_s)
            return None
