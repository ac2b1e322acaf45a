"""The worker side of one BullMQ queue, over the package's Lua scripts.

corral does not run the package's ``Worker``. :class:`BullMQSource` drives the same scripts
(``moveToActive``, ``moveToFinished``, ``moveToDelayed``, ``retryJob``,
``moveJobFromActiveToWait``, ``extendLocks``, ``moveStalledJobsToWait``) from corral's shared
worker loop, which avoids the package worker's defects: it blocks on the queue's ``marker`` key
with ``BZPOPMIN`` on a dedicated connection like Node does (millisecond pickup, delays and backoffs
to the millisecond), honours the limiter's wait, and names that connection as Node names its
workers so ``Queue.getWorkers()`` (and Bull Board) list corral workers. Like Node's worker it takes
the next job from ``moveToFinished`` (fetch-next) and sends the scripts of slots that finish
together in one round trip.

On a Redis Cluster the prefix carries a hash tag (``{bull}``), so every key of a queue and of its
dead-letter queue shares one slot, as the scripts and the MULTI transactions need; the blocking
connection goes to the node serving that slot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from corral.backends.base import Claim, PullSource, dead_letter_id, dead_letter_note
from corral.backends.bullmq.cancel import cancel_requests
from corral.backends.bullmq.connection import (
    CLOSE_TIMEOUT_S,
    RedisStore,
    dedicated_client,
    node_url,
)
from corral.backends.bullmq.flows import CHILDREN_REFUSALS, read_children
from corral.backends.bullmq.protocol import (
    FINISH_ERRORS,
    LIB_VERSION,
    NextJob,
    ScriptCall,
    as_int,
    job_options,
    keep_jobs,
    lenient_backoff,
    max_attempts,
    parse_next_job,
    stacktrace,
)
from corral.backends.bullmq.schedulers import Schedulers
from corral.errors import BackendError, ChildrenPendingError, LeaseLostError
from corral.message import (
    Child,
    Completed,
    Failed,
    NewJob,
    Outcome,
    QueueMessage,
    Released,
    RetryLater,
)
from corral.payload import decode_json
from corral.settings import QueueSettings

logger = logging.getLogger("corral.bullmq")

_MIN_BLOCK_S = 0.001  # BZPOPMIN's timeout 0 means "for ever"; 1 ms is Node's floor too
_MAX_BLOCK_S = 5.0  # keep a blocked connection short-lived, as Node caps it (10 s)
_REDIRECT_PAUSE_S = 0.05  # after a cluster redirect, so a slot stuck migrating cannot spin us
_CLAIM_BATCH_CAP = 100  # moveToActive calls per round trip
_WATCH_TRIES = 5


def now_ms() -> int:
    return round(time.time() * 1000)


def to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(slots=True)
class Delivery:
    """What settle needs from the job as ``moveToActive`` returned it."""

    raw: dict[str, str]
    opts: dict[str, Any]
    deferred_failure: str | None = None

    @property
    def attempts_made(self) -> int:
        return as_int(self.raw.get("atm"))


@dataclass(slots=True)
class _Wait:
    """The blocking side: one ``BZPOPMIN`` on the marker key, kept across waits so a wake-up
    or a cancelled wait does not tear down the connection."""

    client: aioredis.Redis | None = None  # made on first use: see BullMQSource._wait_client
    pop: asyncio.Task[Any] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def worker_client_name(settings: QueueSettings) -> str:
    """``<prefix>:<base64(queue)>:w:<name>``: how Node names a worker's blocking connection."""
    queue_b64 = base64.b64encode(settings.name.encode("utf-8")).decode("ascii")
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
    return f"{settings.prefix}:{queue_b64}:w:corral-{host}-{os.getpid()}"


class BullMQSource(PullSource[Delivery]):
    """Claims, settles and lock renewal of one queue; a claim's handle is its Delivery."""

    def __init__(
        self, store: RedisStore, settings: QueueSettings, *, stop: asyncio.Event, burst: bool
    ) -> None:
        self.store = store
        self.protocol = store.protocol
        self.settings = settings
        self.queue = settings.name
        self.stop = stop
        self.burst = burst
        self.keys = self.protocol.keys.of(self.queue)
        self.lease_s = settings.lease_s
        self.lock_ms = max(1, round(settings.lease_s * 1000))
        self.worker_name = worker_client_name(settings)
        self._token_prefix = uuid.uuid4().hex
        self._tokens = 0
        self._limit_until_ms = 0  # the rate limiter's window ends then
        self._block_until_ms = 0  # the next delayed job is due then (0: none known)
        self._started = False
        self._drained = True  # the last claim found no more jobs: claim one at a time
        rate = settings.rate_limit_max
        self._limiter = (
            {"max": rate, "duration": max(1, round(settings.rate_limit_duration_s * 1000))}
            if rate
            else None
        )
        self._wait = _Wait()
        self.schedulers = Schedulers(store, settings)

    async def _start(self) -> None:
        """Connect both clients; a failure here is paced and logged by the consumer loop."""
        if self._started:
            return
        await self.store.ready(self.queue)
        await self._ping_wait()  # connects, which runs CLIENT SETNAME
        await self.store.check_eviction_policy()
        self._started = True
        logger.info(
            "consuming queue %r at %s as Redis client %r (BullMQ layout %s, lock %d ms)",
            self.queue,
            self.store.where,
            self.worker_name,
            LIB_VERSION,
            self.lock_ms,
        )

    async def _wait_client(self) -> aioredis.Redis:
        """The blocking connection, named as Node names its workers' (Queue.getWorkers() and
        Bull Board list it). On a cluster, a plain connection to the node serving the marker
        key: a cluster client also names the connections it asks for the slots with, and
        getWorkers() counts a cluster's clients node by node."""
        if self._wait.client is None:
            url = self.settings.redis_url
            cluster = self.store.client()
            if isinstance(cluster, RedisCluster):
                await cluster.initialize()
                node = cluster.get_node_from_key(self.keys["marker"])
                if node is None:
                    raise redis_errors.ConnectionError("no cluster node serves the queue's slot")
                url = node_url(url, node.host, int(node.port))
            self._wait.client = dedicated_client(
                url,
                socket_connect_timeout=5.0,
                socket_timeout=_MAX_BLOCK_S + 5.0,
                client_name=self.worker_name,
                retry=RedisRetry(NoBackoff(), 0),
            )
        return self._wait.client

    async def _drop_wait_client(self) -> None:
        """After an error: a failover or a resharding may have moved the marker key's slot, so
        a cluster's node is looked up again (the cluster client follows MOVED replies); through
        Sentinel the primary is asked for again (redis-py reconnects a single connection to
        the address it had)."""
        if not (self.store.cluster or self.store.sentinel):
            return  # one server: the single connection reconnects by itself
        client, self._wait.client = self._wait.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT_S)

    async def _ping_wait(self) -> None:
        try:
            await (await self._wait_client()).ping()
        except Exception:
            await self._drop_wait_client()
            raise

    def _next_token(self) -> str:
        self._tokens += 1
        return f"{self._token_prefix}:{self._tokens}"

    # -- claiming --------------------------------------------------------------------------

    async def claim(self, max_jobs: int) -> list[Claim[Delivery]]:
        """Lease jobs with moveToActive. After an idle spell one call, so the job starts after
        a single round trip; while jobs keep coming, up to ``max_jobs`` calls in one round
        trip."""
        claims: list[Claim[Delivery]] = []
        with self.store.errors("claiming jobs"):
            await self._start()
            while True:
                limited_ms = self._limit_until_ms - now_ms()
                if limited_ms > 0:
                    if not self.burst:
                        return []
                    # Burst mode drains the queue: the limiter only postpones the jobs.
                    await asyncio.sleep(limited_ms / 1000)
                count = 1 if self._drained else max(1, min(max_jobs, _CLAIM_BATCH_CAP))
                tokens = [self._next_token() for _ in range(count)]
                calls = [
                    self.protocol.move_to_active(
                        self.queue, token, now_ms(), self.lock_ms, self._limiter
                    )
                    for token in tokens
                ]
                replies = await self.store.run_many(calls)
                for token, reply in zip(tokens, replies, strict=True):
                    if isinstance(reply, BaseException):
                        raise reply
                    claim = self._take(token, parse_next_job(reply))
                    if claim is not None:
                        claims.append(claim)
                self._drained = len(claims) < count
                if claims or self._limit_until_ms <= now_ms() or not self.burst:
                    await self._advance(claims)
                    return claims

    def _take(self, token: str, found: NextJob) -> Claim[Delivery] | None:
        """The claim of a job moveToActive leased, or ``None``, noting the limiter's wait or
        the next delayed job's time."""
        if found.raw and found.job_id is not None:
            return self._claim(found.job_id, token, found.raw)
        if found.limit_ms > 0:
            self._limit_until_ms = now_ms() + found.limit_ms
        elif found.delay_until_ms:
            self._block_until_ms = found.delay_until_ms
        return None

    def _claim(self, job_id: str, token: str, raw: dict[str, str]) -> Claim[Delivery]:
        options = job_options(raw.get("opts"))
        delivery = Delivery(raw, options.opts)

        def unreadable(why: str) -> Claim[Delivery]:
            return Claim(job_id, token, None, delivery, unreadable=why)

        if raw.get("defa"):  # a child failed it, or it stalled too often: it fails unrun
            delivery.deferred_failure = raw["defa"]
            return Claim(job_id, token, None, delivery, deferred_failure=raw["defa"])
        name = raw.get("name")
        if not name:
            return unreadable("it has no name")
        if not _is_text(name) or not _is_text(raw.get("data") or ""):
            return unreadable("its name or data is not UTF-8 text")
        if not options.is_object:
            return unreadable("its opts are not a JSON object")
        try:
            # Node reads a missing data field as {} (Job.fromJSON).
            data = decode_json(raw.get("data") or "{}")
        except (ValueError, UnicodeDecodeError) as exc:
            return unreadable(f"its data is not JSON ({exc})")
        keep_logs = options.keep_logs
        store, protocol, queue = self.store, self.protocol, self.queue

        async def progress(text: str) -> None:
            with store.errors(f"recording progress of job {job_id}"):
                await store.run(protocol.update_progress(queue, job_id, text))

        async def log(text: str) -> None:
            with store.errors(f"adding a log line to job {job_id}"):
                await store.run(protocol.add_log(queue, job_id, text, keep_logs))

        async def children() -> list[Child]:
            return await read_children(store, queue, job_id)

        message = QueueMessage(
            id=job_id,
            name=name,
            data=data,
            queue=queue,
            attempt=delivery.attempts_made + 1,
            max_attempts=options.max_attempts,
            priority=as_int(raw.get("priority")),
            enqueued_at=to_datetime(as_int(raw.get("timestamp"))),
            backoff=options.backoff,
            trace_context=_text_or_none(options.opts.get("tm")),
            _progress=progress,
            _log=log,
            _max_bytes=self.settings.max_payload_bytes,
            _children=children,
        )
        return Claim(job_id, token, message, delivery)

    # -- settling --------------------------------------------------------------------------

    async def settle(
        self, claim: Claim[Delivery], outcome: Outcome, *, fetch_next: bool = False
    ) -> list[Claim[Delivery]]:
        delivery = claim.handle
        now = now_ms()
        fetched: list[Claim[Delivery]] = []
        with self.store.errors(f"recording the outcome of job {claim.job_id}"):
            if isinstance(outcome, Completed):
                reply = await self.store.call(
                    self._finish(claim, "completed", outcome.result_json, now, fetch_next)
                )
                code = self._fetched(claim.token, reply, fetched)
                if code in CHILDREN_REFUSALS:  # checked before the lock is touched: still ours
                    raise ChildrenPendingError(
                        f"job {claim.job_id} cannot complete: {CHILDREN_REFUSALS[code]}"
                    )
            elif isinstance(outcome, RetryLater):
                code = await self.store.call(self._retry(claim, outcome, now))
            elif isinstance(outcome, Failed):
                reason = delivery.deferred_failure or outcome.error
                fields = {
                    "failedReason": reason,
                    "stacktrace": stacktrace(delivery.raw, delivery.opts, outcome.traceback),
                }
                if self.settings.dead_letter:
                    code = await self._fail_with_dead_letter(claim, reason, fields, now)
                else:
                    reply = await self.store.call(
                        self._finish(claim, "failed", reason, now, fetch_next, fields)
                    )
                    code = self._fetched(claim.token, reply, fetched)
            else:
                assert isinstance(outcome, Released)
                code = await self.store.call(
                    self.protocol.release(self.queue, claim.job_id, claim.token)
                )
        if isinstance(code, int) and code < 0:
            why = FINISH_ERRORS.get(code)
            if why is None:
                raise BackendError(f"BullMQ refused to settle job {claim.job_id} (code {code})")
            raise LeaseLostError(
                f"could not record {type(outcome).__name__} for job {claim.job_id}: {why}; "
                "the job was left as it is"
            )
        if isinstance(outcome, RetryLater | Released):
            self.wake()
        await self._advance(fetched)
        return fetched

    async def _advance(self, claims: Sequence[Claim[Delivery]]) -> None:
        """Write the next jobs of the schedulers whose jobs were just taken, before they run
        (as Node's worker does when a job becomes active)."""
        taken = [(claim.job_id, claim.handle.raw) for claim in claims if "rjk" in claim.handle.raw]
        if taken:
            await self.schedulers.advance(taken)

    def _finish(
        self,
        claim: Claim[Delivery],
        target: str,
        value: str,
        now: int,
        fetch_next: bool,
        fields: Mapping[str, str] | None = None,
    ) -> ScriptCall:
        """moveToFinished with the arguments Node's worker passes; like Node it asks for the
        next job in the same call (fetch-next) unless the worker is stopping or rate-limited."""
        opts = claim.handle.opts
        completed = target == "completed"
        return self.protocol.move_to_finished(
            self.queue,
            claim.job_id,
            claim.token,
            target=target,
            value=value,
            now=now,
            job_opts=opts,
            keep=keep_jobs(
                opts.get("removeOnComplete" if completed else "removeOnFail"),
                self.settings.keep_completed if completed else self.settings.keep_failed,
            ),
            limiter=self._limiter,
            lock_ms=self.lock_ms,
            fetch_next=fetch_next and not self.stop.is_set() and self._limit_until_ms <= now,
            fields=fields,
            metrics_points=self.settings.metrics_minutes,
        )

    def _fetched(self, token: str, reply: Any, into: list[Claim[Delivery]]) -> Any:
        """Keep the job a fetch-next moveToFinished leased (under ``token``); return the code."""
        if not isinstance(reply, list):
            return reply
        claim = self._take(token, parse_next_job(reply))
        if claim is not None:
            into.append(claim)
        return 0

    def _retry(self, claim: Claim[Delivery], outcome: RetryLater, now: int) -> ScriptCall:
        """As Node's Job.moveToFailed when attempts remain: record the error, count the attempt,
        then delay the job by exactly ``delay_ms`` (moveToDelayed) or requeue it (retryJob)."""
        delivery = claim.handle
        fields = {
            "failedReason": outcome.error,
            "stacktrace": stacktrace(delivery.raw, delivery.opts, outcome.traceback),
        }
        if outcome.delay_ms > 0:
            return self.protocol.move_to_delayed(
                self.queue,
                claim.job_id,
                claim.token,
                now=now,
                delay_ms=outcome.delay_ms,
                fields=fields,
            )
        return self.protocol.retry_job(
            self.queue,
            claim.job_id,
            claim.token,
            now=now,
            lifo=bool(delivery.opts.get("lifo")),
            fields=fields,
        )

    async def _fail_with_dead_letter(
        self, claim: Claim[Delivery], reason: str, fields: dict[str, str], now: int
    ) -> Any:
        """Fail the job and copy it to the dead-letter queue in one MULTI, guarded by WATCH on
        the job's lock: a worker that lost the lock writes neither."""
        delivery = claim.handle
        store, protocol = self.store, self.protocol
        target = self.settings.dead_letter
        assert target is not None
        copy = NewJob(
            name=delivery.raw.get("name", ""),
            data_json=delivery.raw.get("data") or "{}",
            job_id=dead_letter_id(self.queue, claim.job_id),
            attempts=max_attempts(delivery.opts),
            backoff=lenient_backoff(delivery.opts.get("backoff")),
            queue=target,
        )
        note = dead_letter_note(self.queue, claim.job_id, delivery.attempts_made + 1, reason)
        copy_id = copy.job_id or ""
        finish = self._finish(claim, "failed", reason, now, False, fields)
        add = protocol.add_job(
            target,
            copy,
            protocol.job_opts(
                copy,
                keep_completed=self.settings.keep_completed,
                keep_failed=self.settings.keep_failed,
            ),
            now,
        )
        add_note = protocol.add_log(target, copy_id, note, None)
        lock_key = protocol.keys.job(self.queue, claim.job_id) + ":lock"
        client = await store.ready(target)
        await store.load_scripts(client, finish.script, add.script, add_note.script)
        pipe: Any
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_TRIES):
                try:
                    await pipe.watch(lock_key)
                    if await pipe.get(lock_key) != claim.token:
                        await pipe.reset()
                        return -2
                    pipe.multi()
                    for call in (finish, add, add_note):
                        store.queue_script(pipe, call)
                    code, _, _ = await pipe.execute()
                    return code
                except redis_errors.WatchError:
                    continue  # our own heartbeat renewed the lock meanwhile; try again
        raise BackendError(
            f"could not fail job {claim.job_id}: its lock kept changing during {_WATCH_TRIES} tries"
        )

    async def cancel_requests(
        self, claims: Sequence[Claim[Delivery]]
    ) -> dict[Claim[Delivery], str]:
        return await cancel_requests(self.store, self.queue, claims)

    async def extend(self, claims: Sequence[Claim[Delivery]]) -> list[Claim[Delivery]]:
        if not claims:
            return []
        with self.store.errors("renewing locks"):
            failed = await self.store.run(
                self.protocol.extend_locks(
                    self.queue, [c.job_id for c in claims], [c.token for c in claims], self.lock_ms
                )
            )
        lost = set(failed or ())
        return [c for c in claims if c.job_id in lost]

    async def maintain(self) -> None:
        with self.store.errors("checking for stalled jobs"):
            if not self._started:
                return
            stalled = await self.store.run(
                self.protocol.move_stalled(
                    self.queue, self.settings.max_stalls, self.lock_ms, now_ms()
                )
            )
            if stalled:
                logger.warning(
                    "queue %r: %d job(s) stalled (their worker stopped renewing the lock): %s; "
                    "moved back to waiting, or failed after %d stall(s)",
                    self.queue,
                    len(stalled),
                    ", ".join(stalled[:20]),
                    self.settings.max_stalls,
                )
            if self._wait.pop is None:
                # Keeps the named connection up, so getWorkers() lists a busy worker too.
                await self._ping_wait()

    # -- waiting ---------------------------------------------------------------------------

    async def wait_for_work(self, timeout_s: float) -> None:
        wait = self._wait
        deadline = time.monotonic() + max(0.0, timeout_s)
        if wait.wake.is_set():
            wait.wake.clear()
            return
        limited_s = (self._limit_until_ms - now_ms()) / 1000
        if limited_s > 0:
            # New jobs cannot start before the limiter's window ends: markers are no use now.
            await asyncio.sleep(min(limited_s, max(0.0, timeout_s)))
            return
        while True:
            remaining = deadline - time.monotonic()
            if self._block_until_ms:
                due_s = (self._block_until_ms - now_ms()) / 1000
                if due_s <= 0:
                    return
                remaining = min(remaining, due_s)
            if remaining <= 0:
                return
            if wait.pop is None:
                block_s = min(max(remaining, _MIN_BLOCK_S), _MAX_BLOCK_S)
                with self.store.errors("waiting for jobs"):
                    client = await self._wait_client()
                wait.pop = asyncio.ensure_future(client.bzpopmin(self.keys["marker"], block_s))
            pop = wait.pop
            woken = asyncio.ensure_future(wait.wake.wait())
            try:
                await asyncio.wait({pop, woken}, timeout=remaining, return_when="FIRST_COMPLETED")
            finally:
                woken.cancel()
            if wait.wake.is_set():
                wait.wake.clear()
                return
            if not pop.done():
                return
            wait.pop = None
            error = None if pop.cancelled() else pop.exception()
            if error is not None:
                await self._drop_wait_client()
                if isinstance(error, redis_errors.AskError):  # MOVED is one too
                    # Resharding or a failover moved the queue's slot: not an outage. The next
                    # wait goes to the node serving it, once a claim has refreshed the slots.
                    logger.debug("queue %r: its cluster slot moved (%s)", self.queue, error)
                    await asyncio.sleep(_REDIRECT_PAUSE_S)
                    return
            with self.store.errors("waiting for jobs"):
                marker = pop.result()
            if marker:
                # A member "0" (score 0) says a job is ready; "1" carries the timestamp of the
                # next delayed job, which no later marker will announce: remember it.
                _key, _member, score = marker
                due_ms = int(float(score))
                if due_ms <= now_ms():
                    return
                self._block_until_ms = (
                    min(self._block_until_ms, due_ms) if self._block_until_ms else due_ms
                )

    def wake(self) -> None:
        self._wait.wake.set()

    async def aclose(self) -> None:
        """Stop the blocking pop and close the named connection (the worker leaves
        getWorkers())."""
        pop, self._wait.pop = self._wait.pop, None
        if pop is not None:
            pop.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(pop, CLOSE_TIMEOUT_S)
        client, self._wait.client = self._wait.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT_S)


def _is_text(value: str) -> bool:
    """Whether ``value`` came from UTF-8 bytes (no byte was surrogate-escaped)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
