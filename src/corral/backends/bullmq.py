"""BullMQ on Redis: corral jobs stored exactly as Node.js BullMQ stores them.

Every state change goes through the Lua scripts shipped with the ``bullmq`` Python package, which
are the scripts Node.js BullMQ runs, so Node producers and workers, Bull Board and Taskforce.sh
handle corral jobs as their own and corral handles theirs. Job name = handler name, job ``data`` =
the payload's JSON verbatim, options in BullMQ's names (``attempts``, ``backoff``, ``delay``,
``priority``, ``jobId``, ``removeOnComplete``/``removeOnFail``).

corral does not run the package's ``Worker``. :class:`_Source` drives the same scripts
(``moveToActive``, ``moveToFinished``, ``moveToDelayed``, ``retryJob``,
``moveJobFromActiveToWait``, ``extendLocks``, ``moveStalledJobsToWait``) from corral's shared
consumer loop, which avoids the package worker's defects: it blocks on the queue's ``marker`` key
with ``BZPOPMIN`` on a dedicated connection like Node does (millisecond pickup, delays and backoffs
to the millisecond), honours the limiter's wait, and names that connection as Node names its
workers so ``Queue.getWorkers()`` (and Bull Board) list corral workers. Like Node's worker it takes
the next job from ``moveToFinished`` (fetch-next) and sends the scripts of slots that finish
together in one round trip (ioredis's auto-pipelining).

With ``QUEUE_REDIS_CLUSTER`` the same runs on a Redis Cluster: the prefix carries a hash tag
(``{bull}``), so every key of a queue and of its dead-letter queue shares one slot, as the scripts
and the MULTI transactions need; the blocking connection goes to the node serving that slot.

Redis layout for prefix ``bull`` and queue ``q`` (all BullMQ's): the job hash ``bull:q:<id>``
(``name``, ``data``, ``opts``, ``timestamp``, ``atm`` = attempts made, ``returnvalue``,
``failedReason``, ``stacktrace``, ...), its ``:lock`` and ``:logs``, the lists ``wait``,
``active`` and (legacy) ``paused``, the sorted sets ``prioritized``, ``delayed``, ``completed``,
``failed``, ``marker`` (wakes blocked workers), the ``meta`` hash (``paused``, ``version``, global
rate limit) and the ``events`` stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import os
import re
import socket
import ssl
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import bullmq
import msgpack  # type: ignore[import-untyped]
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from bullmq.queue_keys import QueueKeys
from bullmq.redis_connection import RedisConnection, loadScript
from bullmq.scripts import Scripts, raw2NextJobData
from bullmq.utils import object_to_flat_array
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff, NoBackoff

from corral._consumer import Claim, PullSource, consume
from corral.backends.base import QueueBackend, dead_letter_id, dead_letter_note
from corral.errors import BackendConnectionError, BackendError, LeaseLostError
from corral.message import (
    JSON,
    Completed,
    Dispatch,
    Failed,
    JobInfo,
    JobState,
    NewJob,
    Outcome,
    QueueMessage,
    Released,
    RetryLater,
)
from corral.payload import decode_json, decode_lenient, encode_payload
from corral.retry import Retry
from corral.settings import QueueSettings

logger = logging.getLogger("corral.bullmq")

LIB_VERSION = f"bullmq:{bullmq.__version__}"
"""What corral records in the queue's ``meta`` hash (``version``), in the ``<lib>:<version>`` form
Node's ``Queue`` writes: the package whose scripts write corral's jobs."""

# Scripts the package ships but does not register on its connection.
_EXTRA_SCRIPTS = {
    "moveJobFromActiveToWait": "moveJobFromActiveToWait-9.lua",
    "addLog": "addLog-2.lua",
}
_MIN_BLOCK_S = 0.001  # BZPOPMIN's timeout 0 means "for ever"; 1 ms is Node's floor too
_MAX_BLOCK_S = 5.0  # keep a blocked connection short-lived, as Node caps it (10 s)
_REDIRECT_PAUSE_S = 0.05  # after a cluster redirect, so a slot stuck migrating cannot spin us
_CLAIM_BATCH_CAP = 100  # moveToActive calls per round trip
_WATCH_TRIES = 5
_CLOSE_TIMEOUT_S = 2.0
_COMMAND_TIMEOUT_S = 30.0  # a reply later than this: the connection is dropped
_DELAY_SCORE_FACTOR = 0x1000  # delayed-set scores are ``timestamp_ms * 0x1000 + counter``
_FINISH_ERRORS = {
    -1: "the job no longer exists",
    -2: "its lock expired",
    -3: "it is no longer active",
    -6: "another worker holds its lock",
}
_STATES = {
    "waiting": JobState.WAITING,
    "prioritized": JobState.WAITING,
    "waiting-children": JobState.WAITING,
    "delayed": JobState.DELAYED,
    "active": JobState.ACTIVE,
    "completed": JobState.COMPLETED,
    "failed": JobState.FAILED,
}
_warned_eviction: set[str] = set()

Client = aioredis.Redis | RedisCluster
"""A client of one Redis server, or of a Redis Cluster (``QUEUE_REDIS_CLUSTER``)."""


class BullMQBackend(QueueBackend):
    """One queue stored in Redis in BullMQ's layout (see the module docstring)."""

    def __init__(self, settings: QueueSettings) -> None:
        super().__init__(settings)
        self._queue_keys = QueueKeys(settings.prefix)
        self.keys: dict[str, str] = self._queue_keys.getKeys(settings.name)
        self.lock_ms = max(1, round(settings.lease_s * 1000))
        self._client: Client | None = None
        self._scripts: Any = None  # bullmq.scripts.Scripts bound to this queue
        self._commands: dict[str, Any] = {}
        self._prepared: set[str] = set()
        self._eviction_checked = False
        self._wire: _Wire | None = None  # the script calls' connection (not on a cluster)
        self._packed_keys: dict[str, bytes] = {}  # queue key names, RESP-encoded once
        self._evalsha_heads: dict[str, bytes] = {}
        self._source: _Source | None = None

    def __repr__(self) -> str:
        return (
            f"<BullMQBackend queue={self.queue_name!r} prefix={self.settings.prefix!r} "
            f"at {self.settings.redis_url_redacted}>"
        )

    # -- connection ------------------------------------------------------------------------

    def _connect(self) -> Client:
        """Create the pooled client (no I/O yet) and register the package's Lua scripts on it."""
        if self._client is None:
            client = _client_from_url(
                self.settings,
                # Bytes that are not UTF-8 (a foreign job) must not fail a whole reply: they come
                # back as lone surrogates, which _claim rejects and writes restore.
                encoding_errors="surrogateescape",
                socket_connect_timeout=5.0,
                socket_timeout=30.0,
                health_check_interval=30,
                # One quick retry for a dropped pooled connection; longer outages are paced by
                # the consumer loop, and a producer should get an error, not a minute of retries.
                retry=RedisRetry(
                    ExponentialBackoff(cap=0.5, base=0.05), 1, (redis_errors.ConnectionError,)
                ),
            )
            connection = RedisConnection(client)
            commands = dict(connection.commands)
            for name, filename in _EXTRA_SCRIPTS.items():
                commands[name] = client.register_script(loadScript(filename))
            self._scripts = Scripts(self.settings.prefix, self.queue_name, connection)
            self._commands = commands
            self._evalsha_heads = {
                name: b"$7\r\nEVALSHA\r\n" + _bulk(command.sha)
                for name, command in commands.items()
            }
            self._pack_keys(self.queue_name)
            if isinstance(client, aioredis.Redis):
                self._wire = _Wire(client)
            self._client = client
        return self._client

    def _pack_keys(self, queue: str) -> None:
        for key in self._keys(queue).values():
            self._packed_keys[key] = _bulk(key)

    async def _ready(self, *queues: str) -> Client:
        """The client, with ``meta.version`` written once for each queue this backend writes."""
        client = self._connect()
        for queue in queues or (self.queue_name,):
            if queue not in self._prepared:
                await client.hset(self._keys(queue)["meta"], "version", LIB_VERSION)
                self._pack_keys(queue)
                self._prepared.add(queue)
        if not self._eviction_checked:
            url = self.settings.redis_url_redacted
            if url not in _warned_eviction:
                await self._check_eviction_policy(client)
                _warned_eviction.add(url)  # once per process and server, after a successful look
            self._eviction_checked = True
        return client

    async def _check_eviction_policy(self, client: Client) -> None:
        try:
            info = await client.info("memory")
        except redis_errors.ResponseError:  # INFO disabled on some managed services
            logger.debug("cannot read Redis's maxmemory-policy", exc_info=True)
            return
        policy = info.get("maxmemory_policy")
        if policy is not None and policy != "noeviction":
            logger.warning(
                "Redis at %s has maxmemory-policy=%s; BullMQ needs 'noeviction' or Redis may "
                "silently delete jobs and locks under memory pressure "
                "(CONFIG SET maxmemory-policy noeviction)",
                self.settings.redis_url_redacted,
                policy,
            )

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Raise Redis driver errors as corral's, naming the server without its password."""
        try:
            yield
        except redis_errors.AuthenticationError as exc:
            raise BackendConnectionError(
                f"Redis at {self.settings.redis_url_redacted} refused the credentials while "
                f"{doing} ({exc}); check the user and password in QUEUE_REDIS_URL"
            ) from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            refused = _certificate_error(exc)
            if refused is not None:
                raise BackendConnectionError(
                    f"TLS certificate verification failed for Redis at "
                    f"{self.settings.redis_url_redacted} while {doing} "
                    f"({refused.verify_message}); check that the server's certificate names the "
                    "host in QUEUE_REDIS_URL and give the CA that signed it in the URL: "
                    "rediss://...?ssl_ca_certs=/path/to/ca.pem"
                ) from exc
            raise BackendConnectionError(
                f"cannot reach Redis at {self.settings.redis_url_redacted} while {doing} "
                f"({exc}); check QUEUE_REDIS_URL and that Redis is running"
            ) from exc
        except redis_errors.RedisError as exc:
            raise BackendError(
                f"Redis error while {doing} on queue {self.queue_name!r}: {exc}"
            ) from exc

    def _keys(self, queue: str) -> dict[str, str]:
        if queue == self.queue_name:
            return self.keys
        keys: dict[str, str] = self._queue_keys.getKeys(queue)
        return keys

    def _job_key(self, job_id: str) -> str:
        return self.keys[""] + job_id

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        (result,) = await self._evalsha_many([(script, keys, args)])
        if isinstance(result, BaseException):
            raise result
        return result

    def _pack_evalsha(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        """One EVALSHA in RESP, as redis-py would send it; the queue's key names are encoded once
        (:meth:`_pack_keys`), so a call packs only its job's keys and its arguments."""
        known = self._packed_keys
        parts = [b"*%d\r\n" % (3 + len(keys) + len(args)), self._evalsha_heads[script]]
        parts.append(b"$%d\r\n%d\r\n" % (len(str(len(keys))), len(keys)))
        for key in keys:
            parts.append(known.get(key) or _bulk(key))
        for arg in args:
            parts.append(_bulk(arg))
        return b"".join(parts)

    async def _evalsha_many(
        self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Run script calls in one round trip, each its own atomic script (no MULTI); a call's
        error is returned in its place. Scripts Redis lost (a restart, SCRIPT FLUSH) are loaded
        and those calls sent again: a NOSCRIPT call did not run."""
        client = self._connect()
        results = await self._send_evalsha(client, calls)
        retry = [i for i, r in enumerate(results) if isinstance(r, redis_errors.NoScriptError)]
        if retry:
            for name in {calls[i][0] for i in retry}:
                await client.script_load(self._commands[name].script)
            again = await self._send_evalsha(client, [calls[i] for i in retry])
            for index, result in zip(retry, again, strict=True):
                results[index] = result
        return results

    async def _send_evalsha(
        self, client: Client, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        if self._wire is not None:
            return await self._wire.execute([self._pack_evalsha(*call) for call in calls])
        # A cluster: redis-py routes each command to the node of its keys.
        async with client.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                self._queue_script(pipe, script, keys, args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _queue_script(
        self, pipe: Any, script: str, keys: Sequence[str], args: Sequence[Any]
    ) -> None:
        """Queue one script call on ``pipe`` as EVALSHA. redis-py's cluster pipelines refuse
        its ``evalsha()`` method, not the command; a plain pipeline loads missing scripts
        before it runs, a cluster one needs :meth:`_load_scripts` first."""
        command = self._commands[script]
        if isinstance(pipe, aioredis.client.Pipeline):
            pipe.scripts.add(command)
        pipe.execute_command("EVALSHA", command.sha, len(keys), *keys, *args)

    async def _load_scripts(self, client: Client, *scripts: str) -> None:
        """On a cluster, load the ``scripts`` a primary lacks (after a restart or a failover)
        before a pipeline runs them: inside MULTI a NOSCRIPT fails that call alone."""
        if not isinstance(client, RedisCluster):
            return
        commands = [self._commands[name] for name in scripts]
        present = await client.script_exists(*(command.sha for command in commands))
        for command, loaded in zip(commands, present, strict=True):
            if not loaded:
                await client.script_load(command.script)

    # -- producing -------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[str]:
        if not jobs:
            return []
        queues = {job.queue or self.queue_name for job in jobs}
        timestamp = _now_ms()
        with self._errors("adding jobs"):
            client = await self._ready(*sorted(queues))
            if len(jobs) == 1:  # one script call is atomic on its own: save the MULTI
                results = [await self._run(*self._add_call(jobs[0], timestamp))]
            elif self._wire is not None:
                results = await self._add_atomically(self._wire, jobs, timestamp)
            else:
                # MULTI/EXEC: nothing is applied unless the whole batch reaches Redis.
                await self._load_scripts(client, *_ADD_SCRIPTS)
                async with client.pipeline(transaction=True) as pipe:
                    for job in jobs:
                        await self._add(pipe, job, timestamp)
                    results = await pipe.execute()
        ids: list[str] = []
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, int) and result < 0:
                raise BackendError(f"BullMQ refused job {job.name!r} (code {result})")
            ids.append(str(result))
        if self._source is not None and self.queue_name in queues:
            self._source.wake()
        return ids

    async def _add_atomically(
        self, wire: _Wire, jobs: Sequence[NewJob], timestamp: int
    ) -> list[Any]:
        """Add ``jobs`` in one MULTI/EXEC, in one round trip: nothing is applied unless the whole
        batch reaches Redis. The scripts are loaded in the same write (cheap when Redis has
        them): inside MULTI a missing script would fail its own call alone."""
        calls = [self._add_call(job, timestamp) for job in jobs]
        commands = [
            _pack_command("SCRIPT", "LOAD", self._commands[name].script)
            for name in sorted({name for name, _, _ in calls})
        ]
        commands.append(_pack_command("MULTI"))
        commands += [self._pack_evalsha(*call) for call in calls]
        commands.append(_pack_command("EXEC"))
        replies = await wire.execute(commands)
        for reply in replies[: -len(calls) - 1]:
            if isinstance(reply, BaseException):
                raise reply
        results = replies[-1]
        if isinstance(results, BaseException):
            raise results  # EXECABORT: a call was refused when queued; nothing was applied
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def _add(self, pipe: Any, job: NewJob, timestamp: int) -> None:
        """Queue one add script on ``pipe`` (see :meth:`_add_call`)."""
        self._queue_script(pipe, *self._add_call(job, timestamp))

    def _add_call(self, job: NewJob, timestamp: int) -> tuple[str, list[str], list[Any]]:
        """The add script for ``job`` and its keys and arguments, chosen as Node's
        ``Job.addJob`` chooses.

        The add scripts return the existing id for a duplicate ``jobId`` and leave that job as
        it is, so duplicates need no extra check.
        """
        keys = self._keys(job.queue or self.queue_name)
        packed_args = msgpack.packb(
            # prefix, custom id, name, timestamp, parent key, parent dependencies key, parent,
            # repeat job key, deduplication key: the argument array of the package's scripts.
            [keys[""], job.job_id or "", job.name, timestamp, None, None, None, None, None],
            use_bin_type=True,
        )
        argv = [packed_args, job.data_json, msgpack.packb(self._job_opts(job), use_bin_type=True)]
        if job.delay_ms > 0:
            script = "addDelayedJob"
            names = ["marker", "meta", "id", "delayed", "completed", "events"]
        elif job.priority:
            script = "addPrioritizedJob"
            names = ["marker", "meta", "id", "prioritized", "delayed", "completed", "active"]
            names += ["events", "pc"]
        else:
            script = "addStandardJob"
            names = ["wait", "paused", "meta", "id", "completed", "delayed", "active", "events"]
            names += ["marker"]
        return script, [keys[n] for n in names], argv

    def _job_opts(self, job: NewJob) -> dict[str, Any]:
        """The ``opts`` a Node producer writes for the same job (omitted options are absent)."""
        opts: dict[str, Any] = {"attempts": job.attempts}
        if job.backoff is not None:
            opts["backoff"] = job.backoff.to_bullmq()
        if job.delay_ms > 0:
            opts["delay"] = job.delay_ms
        if job.priority:
            opts["priority"] = job.priority
        if job.job_id is not None:
            opts["jobId"] = job.job_id
        if self.settings.keep_completed is not None:
            opts["removeOnComplete"] = self.settings.keep_completed
        if self.settings.keep_failed is not None:
            opts["removeOnFail"] = self.settings.keep_failed
        return opts

    # -- consuming -------------------------------------------------------------------------

    async def start_consuming(
        self,
        dispatch: Dispatch,
        *,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool = False,
    ) -> None:
        source = _Source(self, burst=burst, stop=stop)
        self._source = source
        try:
            await consume(
                source,
                dispatch,
                concurrency=concurrency,
                stop=stop,
                burst=burst,
                shutdown_grace_s=self.settings.shutdown_grace_s,
            )
        finally:
            self._source = None
            await source.aclose()

    # -- managing --------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        k = self.keys
        with self._errors(f"reading job {job_id}"):
            client = await self._ready()
            await self._load_scripts(client, "getStateV2")
            async with client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._job_key(job_id))
                self._queue_script(
                    pipe,
                    "getStateV2",
                    [
                        k["completed"],
                        k["failed"],
                        k["delayed"],
                        k["active"],
                        k["wait"],
                        k["paused"],
                        k["waiting-children"],
                        k["prioritized"],
                    ],
                    [job_id],
                )
                pipe.lrange(self._job_key(job_id) + ":logs", 0, -1)
                pipe.zscore(k["delayed"], job_id)
                raw, state, logs, delayed_score = await pipe.execute()
        if not raw:
            return None
        return self._info(job_id, raw, str(state), logs, delayed_score)

    async def list_jobs(
        self, state: JobState, *, limit: int = 50, offset: int = 0
    ) -> list[JobInfo]:
        if limit <= 0:
            return []
        offset = max(0, offset)
        k = self.keys
        with self._errors(f"listing {state.value} jobs"):
            client = await self._ready()
            scores: dict[str, float] = {}
            if state is JobState.WAITING:
                ids = await self._waiting_ids(client, offset, limit)
            elif state is JobState.DELAYED:
                pairs: list[Any] = await client.zrange(
                    k["delayed"], offset, offset + limit - 1, withscores=True
                )
                scores = {str(member): float(score) for member, score in pairs}
                ids = list(scores)
            elif state is JobState.ACTIVE:
                # The active list grows on the left: read from the right, first started first.
                ids = _strs(await client.lrange(k["active"], -(offset + limit), -(offset + 1)))
                ids.reverse()
            else:
                ids = _strs(await client.zrevrange(k[state.value], offset, offset + limit - 1))
            async with client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self._job_key(job_id))
                    pipe.lrange(self._job_key(job_id) + ":logs", 0, -1)
                rows = await pipe.execute()
        infos = []
        for index, job_id in enumerate(ids):
            raw, logs = rows[2 * index], rows[2 * index + 1]
            if raw:  # skip jobs removed between the two reads
                state_name = "waiting" if state is JobState.WAITING else state.value
                infos.append(self._info(job_id, raw, state_name, logs, scores.get(job_id)))
        return infos

    async def _waiting_ids(self, client: Client, offset: int, limit: int) -> list[str]:
        """Waiting job ids in delivery order: ``wait`` (oldest at the right end, where
        ``moveToActive`` pops), then ``prioritized`` by score, then a legacy ``paused`` list."""
        k = self.keys
        async with client.pipeline(transaction=True) as pipe:
            pipe.llen(k["wait"])
            pipe.zcard(k["prioritized"])
            pipe.llen(k["paused"])
            lengths = await pipe.execute()
        ids: list[str] = []
        start, stop = offset, offset + limit - 1
        for segment, length in zip(("wait", "prioritized", "paused"), lengths, strict=True):
            if stop >= 0 and start < length:
                lo, hi = max(0, start), min(stop, length - 1)
                if segment == "prioritized":
                    ids += _strs(await client.zrange(k[segment], lo, hi))
                else:
                    part = _strs(await client.lrange(k[segment], -(hi + 1), -(lo + 1)))
                    ids += reversed(part)
            start, stop = start - length, stop - length
        return ids

    async def counts(self) -> dict[JobState, int]:
        types = ["wait", "paused", "prioritized", "waiting-children", "delayed", "active"]
        types += ["completed", "failed"]
        with self._errors("counting jobs"):
            await self._ready()
            values = dict(zip(types, await self._scripts.getCounts(types), strict=True))
        return {
            JobState.WAITING: sum(
                int(values[t]) for t in ("wait", "paused", "prioritized", "waiting-children")
            ),
            JobState.DELAYED: int(values["delayed"]),
            JobState.ACTIVE: int(values["active"]),
            JobState.COMPLETED: int(values["completed"]),
            JobState.FAILED: int(values["failed"]),
        }

    async def retry_failed(self, *, limit: int | None = None) -> int:
        k = self.keys
        moved = 0
        remaining = limit
        with self._errors("retrying failed jobs"):
            client = await self._ready()
            while remaining is None or remaining > 0:
                batch = 1000 if remaining is None else min(remaining, 1000)
                ids = _strs(await client.zrange(k["failed"], 0, batch - 1))  # oldest first
                if not ids:
                    break
                await self._load_scripts(client, "reprocessJob")
                async with client.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        # Node's Job.retry('failed', {resetAttemptsMade: true}): back to waiting
                        # (or prioritized) with attempts made reset; attemptsStarted is kept.
                        self._queue_script(
                            pipe,
                            "reprocessJob",
                            [
                                self._job_key(job_id),
                                k["events"],
                                k["failed"],
                                k["wait"],
                                k["meta"],
                                k["active"],
                                k["marker"],
                                k["prioritized"],
                                k["pc"],
                            ],
                            [job_id, "LPUSH", "failedReason", "failed", "1", "0"],
                        )
                    results = await pipe.execute()
                done = sum(1 for result in results if result == 1)
                moved += done
                if remaining is not None:
                    remaining -= len(ids)
                if done == 0:  # only orphaned ids left; they would come back every time
                    break
        if moved and self._source is not None:
            self._source.wake()
        return moved

    async def remove(self, job_id: str) -> bool:
        with self._errors(f"removing job {job_id}"):
            client = await self._ready()
            if not await client.exists(self._job_key(job_id)):
                return False
            result = int(await self._scripts.remove(job_id, False))
        if result == 0:
            raise BackendError(
                f"job {job_id} is active (held by a worker); remove it once it finishes"
            )
        if result < 0:
            raise BackendError(f"BullMQ refused to remove job {job_id} (code {result})")
        return True

    async def pause(self) -> None:
        with self._errors("pausing the queue"):
            await self._ready()
            await self._scripts.pause(True)

    async def resume(self) -> None:
        with self._errors("resuming the queue"):
            await self._ready()
            await self._scripts.pause(False)
        if self._source is not None:
            self._source.wake()

    async def is_paused(self) -> bool:
        with self._errors("reading the queue's state"):
            client = await self._ready()
            return bool(await client.hexists(self.keys["meta"], "paused"))

    async def purge(self) -> int:
        k = self.keys
        # cleanJobsInSet compares timestamps as 13-digit strings: a cut-off one day ahead stays
        # comparable and also catches jobs stamped by a producer whose clock runs ahead.
        cutoff = _now_ms() + 86_400_000
        sets = ("wait", "paused", "prioritized", "delayed", "completed", "failed")
        with self._errors("purging the queue"):
            client = await self._ready()
            await self._load_scripts(client, "cleanJobsInSet")
            async with client.pipeline(transaction=True) as pipe:
                for name in sets:
                    self._queue_script(
                        pipe,
                        "cleanJobsInSet",
                        [k[name], k["events"], k["repeat"]],
                        [k[""], cutoff, 0, name],
                    )
                removed = await pipe.execute()
        return sum(len(ids) for ids in removed)

    async def close(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            await source.aclose()
        client, self._client = self._client, None
        self._prepared.clear()
        wire, self._wire = self._wire, None
        if wire is not None:
            await wire.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), _CLOSE_TIMEOUT_S)

    # -- helpers ---------------------------------------------------------------------------

    def _info(
        self,
        job_id: str,
        raw: Mapping[str, str],
        state_name: str,
        logs: Sequence[str],
        delayed_score: float | None,
    ) -> JobInfo:
        opts = _json_object(raw.get("opts"))
        state = _STATES.get(state_name)
        if state is None:  # 'unknown': the hash exists outside every set (mid-cleanup)
            state = (
                JobState.FAILED
                if raw.get("failedReason") and raw.get("finishedOn")
                else JobState.COMPLETED
                if raw.get("finishedOn")
                else JobState.WAITING
            )
        run_at = None
        if state is JobState.DELAYED and delayed_score is not None:
            run_at = _datetime(int(delayed_score) // _DELAY_SCORE_FACTOR)
        stack = _json_list(raw.get("stacktrace"))
        return JobInfo(
            id=job_id,
            name=raw.get("name", ""),
            data=decode_lenient(raw.get("data")),
            queue=self.queue_name,
            state=state,
            attempts_made=_int(raw.get("atm")),
            max_attempts=_max_attempts(opts),
            priority=_int(raw.get("priority")),
            enqueued_at=_datetime(_int(raw.get("timestamp"))),
            run_at=run_at,
            finished_at=_datetime(_int(raw["finishedOn"])) if raw.get("finishedOn") else None,
            result=decode_lenient(raw.get("returnvalue")),
            error=raw.get("failedReason") or None,
            traceback=str(stack[-1]) if stack else None,
            progress=decode_lenient(raw.get("progress")),
            logs=list(logs),
        )

    async def _update_progress(self, job_id: str, value: JSON) -> None:
        text = encode_payload(value, max_bytes=self.settings.max_payload_bytes, what="progress")
        k = self.keys
        with self._errors(f"recording progress of job {job_id}"):
            await self._run(
                "updateProgress", [self._job_key(job_id), k["events"], k["meta"]], [job_id, text]
            )

    async def _add_log(self, job_id: str, text: str, keep_logs: int | None) -> None:
        key = self._job_key(job_id)
        with self._errors(f"adding a log line to job {job_id}"):
            await self._run("addLog", [key, key + ":logs"], [job_id, text, keep_logs or ""])


@dataclass(slots=True)
class _Delivery:
    """What settle needs from the job as ``moveToActive`` returned it."""

    raw: dict[str, str]
    opts: dict[str, Any]
    deferred_failure: str | None = None

    @property
    def attempts_made(self) -> int:
        return _int(self.raw.get("atm"))


@dataclass(slots=True)
class _Wait:
    """The blocking side: one ``BZPOPMIN`` on the marker key, kept across waits so a wake-up
    or a cancelled wait does not tear down the connection."""

    client: aioredis.Redis | None = None  # made on first use: see _Source._wait_client
    pop: asyncio.Task[Any] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class _Wire:
    """Pre-packed commands over one dedicated connection, as ioredis carries Node's: a call is
    written at once, one reader task takes the replies in order. No connection pool, no
    per-command encoding, no round trip waited out before the next call is sent.

    A lost connection fails every call in flight with ConnectionError; :meth:`execute` sends a
    call again once on a new connection, as redis-py retries a command on a dropped connection.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        # No socket timeout on the connection: the reader times each batch of replies instead.
        self._options = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection_class = pool.connection_class
        self._connection: AbstractConnection | None = None
        self._connecting = asyncio.Lock()
        self._waiting: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
        self._more: asyncio.Future[None] | None = None  # the idle reader waits on it
        self._reader: asyncio.Task[None] | None = None

    def submit(self, commands: list[bytes]) -> asyncio.Future[list[Any]] | None:
        """Write ``commands`` now; the future gets their replies (an error reply in its place).
        ``None`` when not connected: use :meth:`execute`."""
        connection = self._connection
        writer = connection._writer if connection is not None else None
        if connection is None or writer is None or writer.is_closing():
            return None
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        writer.writelines(commands)
        self._waiting.append((len(commands), future))
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read(connection))
        elif self._more is not None and not self._more.done():
            self._more.set_result(None)
        return future

    async def execute(self, commands: list[bytes], *, retry: bool = True) -> list[Any]:
        """Send ``commands`` (connecting if needed) and wait for their replies."""
        for attempt in range(2 if retry else 1):
            future = self.submit(commands)
            if future is None:
                await self._connect()
                future = self.submit(commands)
                if future is None:
                    raise redis_errors.ConnectionError("the connection to Redis closed")
            writer = self._connection._writer if self._connection is not None else None
            if writer is not None and writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()  # Redis reads slower than we write: wait
            try:
                return await future
            except redis_errors.ConnectionError:
                if attempt or not retry:
                    raise
        raise AssertionError("unreachable")

    async def _read(self, connection: AbstractConnection) -> None:
        waiting = self._waiting
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not waiting:
                    self._more = loop.create_future()
                    await self._more
                    continue
                count, future = waiting[0]
                replies: list[Any] = []
                async with asyncio.timeout(_COMMAND_TIMEOUT_S):
                    for _ in range(count):
                        try:
                            replies.append(await connection.read_response(timeout=math.inf))
                        except redis_errors.ResponseError as exc:
                            replies.append(exc)
                waiting.popleft()
                if not future.done():  # not cancelled by its caller
                    future.set_result(replies)
        except BaseException as exc:
            # The stream is gone or out of step: no later reply on it can be trusted.
            if isinstance(exc, TimeoutError):
                failure: Exception = redis_errors.TimeoutError(
                    f"Redis did not answer within {_COMMAND_TIMEOUT_S:g} s"
                )
            elif isinstance(exc, redis_errors.ConnectionError):
                failure = exc
            else:
                failure = redis_errors.ConnectionError(f"connection to Redis lost: {exc!r}")
            self._drop(connection, failure)
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _drop(self, connection: AbstractConnection, failure: Exception) -> None:
        if self._connection is not connection:
            return
        self._connection = None
        self._reader = None
        self._more = None
        waiting, self._waiting = self._waiting, deque()
        for _, future in waiting:
            if not future.done():
                future.set_exception(failure)

    async def _connect(self) -> None:
        async with self._connecting:
            if self._connection is None or self._connection._writer is None:
                connection = self._connection_class(**self._options)
                await connection.connect()  # type: ignore[no-untyped-call]
                self._connection = connection

    async def aclose(self) -> None:
        connection, reader = self._connection, self._reader
        if connection is not None:
            self._drop(connection, redis_errors.ConnectionError("the backend was closed"))
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()


_FLUSH_AT = 16
"""Calls gathered before they are written without waiting for the end of the loop turn: Redis
starts on the first while the worker still finishes the jobs of the others."""


class _AutoPipeline:
    """Send the script calls made during one event-loop turn together (what ioredis's
    auto-pipelining does for Node's workers): many slots finishing at once cost one write.

    Each call is still its own atomic script; only the transport is shared.
    """

    def __init__(self, backend: BullMQBackend) -> None:
        self.backend = backend
        self._pending: list[tuple[str, list[str], list[Any], asyncio.Future[Any]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pending = self._pending
        pending.append((script, keys, args, future))
        if len(pending) == 1:
            loop.call_soon(self._flush)
        elif len(pending) >= _FLUSH_AT:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        backend = self.backend
        wire = backend._wire
        sent = None
        if wire is not None:
            sent = wire.submit([backend._pack_evalsha(s, k, a) for s, k, a, _ in batch])
        if sent is None:
            self._resend(batch)
        else:
            sent.add_done_callback(functools.partial(self._deliver, batch))

    def _deliver(self, batch: list[Any], sent: asyncio.Future[list[Any]]) -> None:
        if sent.cancelled() or sent.exception() is not None:
            self._resend(batch)  # on a new connection, with redis-py's single retry
            return
        again = []
        for item, result in zip(batch, sent.result(), strict=True):
            future = item[3]
            if future.done():
                continue
            if isinstance(result, redis_errors.NoScriptError):
                again.append(item)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if again:
            self._resend(again)

    def _resend(self, batch: list[Any]) -> None:
        task = asyncio.ensure_future(self._send(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[Any]) -> None:
        try:
            results = await self.backend._evalsha_many(
                [(script, keys, args) for script, keys, args, _ in batch]
            )
        except BaseException as exc:  # handed to the callers, who wrap it
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class _Source(PullSource):
    """The worker side of a BullMQBackend, over the package's Lua scripts."""

    def __init__(
        self, backend: BullMQBackend, *, burst: bool, stop: asyncio.Event | None = None
    ) -> None:
        self.backend = backend
        self.stop = stop if stop is not None else asyncio.Event()
        self.settings = backend.settings
        self.keys = backend.keys
        self.lease_s = self.settings.lease_s
        self.lock_ms = backend.lock_ms
        self.burst = burst
        self.worker_name = _worker_client_name(self.settings)
        self._token_prefix = uuid.uuid4().hex
        self._tokens = 0
        self._limit_until_ms = 0  # the rate limiter's window ends then
        self._block_until_ms = 0  # the next delayed job is due then (0: none known)
        self._started = False
        self._drained = True  # the last claim found no more jobs: claim one at a time
        # Jobs moveToFinished handed over with the previous job's result (Node's fetch-next):
        # leased already, given out by the next claim().
        self._prefetched: list[Claim] = []
        self._pipeline = _AutoPipeline(backend)
        rate = self.settings.rate_limit_max
        self._limiter = (
            {"max": rate, "duration": max(1, round(self.settings.rate_limit_duration_s * 1000))}
            if rate
            else None
        )
        self._wait = _Wait()
        self._move_to_active_keys = [self.keys[n] for n in _MOVE_TO_ACTIVE_KEYS]
        self._move_opts = {"lockDuration": self.lock_ms, "limiter": self._limiter}

    async def _start(self) -> None:
        """Connect both clients; a failure here is paced and logged by the consumer loop."""
        if self._started:
            return
        await self.backend._ready()
        await self._ping_wait()  # connects, which runs CLIENT SETNAME
        self._started = True
        logger.info(
            "consuming queue %r at %s as Redis client %r (BullMQ layout %s, lock %d ms)",
            self.settings.name,
            self.settings.redis_url_redacted,
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
            cluster = self.backend._connect()
            if isinstance(cluster, RedisCluster):
                await cluster.initialize()
                node = cluster.get_node_from_key(self.keys["marker"])
                if node is None:
                    raise redis_errors.ConnectionError("no cluster node serves the queue's slot")
                url = _node_url(url, node.host, int(node.port))
            self._wait.client = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                single_connection_client=True,
                socket_connect_timeout=5.0,
                socket_timeout=_MAX_BLOCK_S + 5.0,
                client_name=self.worker_name,
                retry=RedisRetry(NoBackoff(), 0),
            )
        return self._wait.client

    async def _drop_wait_client(self) -> None:
        """After an error: a failover or a resharding may have moved the marker key's slot, so
        a cluster's node is looked up again (the cluster client follows MOVED replies)."""
        if not self.settings.redis_cluster:
            return  # one server: the single connection reconnects by itself
        client, self._wait.client = self._wait.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), _CLOSE_TIMEOUT_S)

    async def _ping_wait(self) -> None:
        try:
            await (await self._wait_client()).ping()
        except Exception:
            await self._drop_wait_client()
            raise

    def _next_token(self) -> str:
        self._tokens += 1
        return f"{self._token_prefix}:{self._tokens}"

    # -- PullSource ------------------------------------------------------------------------

    async def claim(self, max_jobs: int) -> list[Claim]:
        """Lease jobs with moveToActive. After an idle spell one call, so the job starts after
        a single round trip; while jobs keep coming, up to ``max_jobs`` calls in one round
        trip."""
        if self._prefetched:
            claims, self._prefetched = self._prefetched[:max_jobs], self._prefetched[max_jobs:]
            return claims
        claims = []
        with self.backend._errors("claiming jobs"):
            await self._start()
            while True:
                limited_ms = self._limit_until_ms - _now_ms()
                if limited_ms > 0:
                    if not self.burst:
                        return []
                    # Burst mode drains the queue: the limiter only postpones the jobs.
                    await asyncio.sleep(limited_ms / 1000)
                count = 1 if self._drained else max(1, min(max_jobs, _CLAIM_BATCH_CAP))
                for token, (raw, job_id, limit_ms, delay_until) in await self._move_to_active(
                    count
                ):
                    if raw:
                        claims.append(self._claim(str(job_id), token, raw))
                    elif limit_ms and int(limit_ms) > 0:
                        self._limit_until_ms = _now_ms() + int(limit_ms)
                    else:
                        self._block_until_ms = int(float(delay_until or 0))
                self._drained = len(claims) < count
                if claims or self._limit_until_ms <= _now_ms() or not self.burst:
                    return claims

    async def _move_to_active(self, count: int) -> list[tuple[str, list[Any]]]:
        """``count`` moveToActive calls (Node's arguments) with fresh tokens, in one round trip."""
        keys = self._move_to_active_keys
        prefix = self.keys[""]
        calls = []
        tokens = [self._next_token() for _ in range(count)]
        for token in tokens:
            packed = msgpack.packb({"token": token, **self._move_opts}, use_bin_type=True)
            calls.append(("moveToActive", keys, [prefix, _now_ms(), packed]))
        results = await self.backend._evalsha_many(calls)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [(t, raw2NextJobData(r)) for t, r in zip(tokens, results, strict=True)]

    def _claim(self, job_id: str, token: str, raw: dict[str, str]) -> Claim:
        options = _job_options(raw.get("opts"))
        delivery = _Delivery(raw, options.opts)
        if raw.get("defa"):  # stalled too often: BullMQ fails it when next picked up
            delivery.deferred_failure = raw["defa"]
            return Claim(job_id, token, None, unreadable=raw["defa"], extra=delivery)
        name = raw.get("name")
        if not name:
            return Claim(job_id, token, None, unreadable="it has no name", extra=delivery)
        if not _is_text(name) or not _is_text(raw.get("data") or ""):
            return Claim(
                job_id, token, None, unreadable="its name or data is not UTF-8 text", extra=delivery
            )
        if not options.is_object:
            return Claim(
                job_id, token, None, unreadable="its opts are not a JSON object", extra=delivery
            )
        try:
            # Node reads a missing data field as {} (Job.fromJSON).
            data = decode_json(raw.get("data") or "{}")
        except (ValueError, UnicodeDecodeError) as exc:
            return Claim(
                job_id, token, None, unreadable=f"its data is not JSON ({exc})", extra=delivery
            )
        keep_logs = options.keep_logs
        backend = self.backend

        async def progress(value: JSON) -> None:
            await backend._update_progress(job_id, value)

        async def log(text: str) -> None:
            await backend._add_log(job_id, text, keep_logs)

        message = QueueMessage(
            id=job_id,
            name=name,
            data=data,
            queue=self.settings.name,
            attempt=delivery.attempts_made + 1,
            max_attempts=options.max_attempts,
            priority=_int(raw.get("priority")),
            enqueued_at=_datetime(_int(raw.get("timestamp"))),
            backoff=options.backoff,
            _progress=progress,
            _log=log,
        )
        return Claim(job_id, token, message, extra=delivery)

    async def settle(self, claim: Claim, outcome: Outcome) -> None:
        delivery: _Delivery = claim.extra
        now = _now_ms()
        with self.backend._errors(f"recording the outcome of job {claim.job_id}"):
            if isinstance(outcome, Completed):
                code = await self._finish(
                    claim, delivery, "completed", outcome.result_json, now, fields=None
                )
                code = self._take_next(claim.token, code)
            elif isinstance(outcome, RetryLater):
                code = await self._retry(claim, delivery, outcome, now)
            elif isinstance(outcome, Failed):
                reason = delivery.deferred_failure or outcome.error
                fields = {
                    "failedReason": reason,
                    "stacktrace": _stacktrace(delivery, outcome.traceback),
                }
                if self.settings.dead_letter:
                    code = await self._fail_with_dead_letter(claim, delivery, reason, fields, now)
                else:
                    code = await self._finish(claim, delivery, "failed", reason, now, fields)
                    code = self._take_next(claim.token, code)
            else:
                assert isinstance(outcome, Released)
                code = await self._pipeline.call(
                    "moveJobFromActiveToWait",
                    [self.keys[n] for n in _RELEASE_KEYS],
                    [claim.job_id, claim.token, self.backend._job_key(claim.job_id)],
                )
        if isinstance(code, int) and code < 0:
            why = _FINISH_ERRORS.get(code)
            if why is None:
                raise BackendError(f"BullMQ refused to settle job {claim.job_id} (code {code})")
            raise LeaseLostError(
                f"could not record {type(outcome).__name__} for job {claim.job_id}: {why}; "
                "the job was left as it is"
            )
        if isinstance(outcome, RetryLater | Released):
            self.wake()

    async def _finish(
        self,
        claim: Claim,
        delivery: _Delivery,
        target: str,
        value: str,
        now: int,
        fields: dict[str, str] | None,
    ) -> Any:
        """moveToFinished with the arguments Node's worker passes. Like Node it asks for the
        next job in the same call (fetch-next) unless the worker is stopping."""
        fetch_next = not self.stop.is_set() and self._limit_until_ms <= now
        keys, args = self._finish_call(claim, delivery, target, value, now, fields, fetch_next)
        return await self._pipeline.call("moveToFinished", keys, args)

    def _take_next(self, token: str, result: Any) -> Any:
        """Keep the job a fetch-next moveToFinished leased (under ``token``); return the code."""
        if not isinstance(result, list):
            return result
        raw, job_id, limit_ms, delay_until = raw2NextJobData(result)
        if raw:
            self._prefetched.append(self._claim(str(job_id), token, raw))
        elif limit_ms and int(limit_ms) > 0:
            self._limit_until_ms = _now_ms() + int(limit_ms)
        elif delay_until:
            self._block_until_ms = int(float(delay_until))
        return 0

    def _finish_call(
        self,
        claim: Claim,
        delivery: _Delivery,
        target: str,
        value: str,
        now: int,
        fields: dict[str, str] | None,
        fetch_next: bool = False,
    ) -> tuple[list[str], list[Any]]:
        k = self.keys
        opts = delivery.opts
        job_option = "removeOnComplete" if target == "completed" else "removeOnFail"
        default_keep = (
            self.settings.keep_completed if target == "completed" else self.settings.keep_failed
        )
        keys = [k[n] for n in _FINISH_KEYS] + [
            k[target],
            self.backend._job_key(claim.job_id),
            k[""] + "metrics:" + target,
            k["marker"],
        ]
        packed_opts = msgpack.packb(
            {
                "token": claim.token,
                "keepJobs": _keep_jobs(opts.get(job_option), default_keep),
                "limiter": self._limiter,
                "lockDuration": self.lock_ms,
                "attempts": _int(opts.get("attempts")),
                "maxMetricsSize": "",
                "fpof": bool(opts.get("fpof")),
                "cpof": bool(opts.get("cpof")),
                "idof": bool(opts.get("idof")),
                "rdof": bool(opts.get("rdof")),
            },
            use_bin_type=True,
        )
        prop = "returnvalue" if target == "completed" else "failedReason"
        next_flag = "1" if fetch_next else "0"
        args: list[Any] = [claim.job_id, now, prop, value, target, next_flag, k[""], packed_opts]
        if fields:
            args.append(msgpack.packb(object_to_flat_array(fields), use_bin_type=True))
        return keys, args

    async def _retry(self, claim: Claim, delivery: _Delivery, outcome: RetryLater, now: int) -> Any:
        """As Node's Job.moveToFailed when attempts remain: record the error, count the attempt,
        then delay the job by exactly ``delay_ms`` (moveToDelayed) or requeue it (retryJob)."""
        fields = {
            "failedReason": outcome.error,
            "stacktrace": _stacktrace(delivery, outcome.traceback),
        }
        scripts = self.backend._scripts
        if outcome.delay_ms > 0:
            keys, args = scripts.moveToDelayedArgs(
                claim.job_id, now, claim.token, outcome.delay_ms, {"fieldsToUpdate": fields}
            )
            return await self._pipeline.call("moveToDelayed", keys, args)
        keys, args = scripts.retryJobArgs(
            claim.job_id, bool(delivery.opts.get("lifo")), claim.token, {"fieldsToUpdate": fields}
        )
        return await self._pipeline.call("retryJob", keys, args)

    async def _fail_with_dead_letter(
        self,
        claim: Claim,
        delivery: _Delivery,
        reason: str,
        fields: dict[str, str],
        now: int,
    ) -> Any:
        """Fail the job and copy it to the dead-letter queue in one MULTI, guarded by WATCH on
        the job's lock: a worker that lost the lock writes neither."""
        backend = self.backend
        target = self.settings.dead_letter
        assert target is not None
        copy = NewJob(
            name=delivery.raw.get("name", ""),
            data_json=delivery.raw.get("data") or "{}",
            job_id=dead_letter_id(self.settings.name, claim.job_id),
            attempts=_max_attempts(delivery.opts),
            backoff=_lenient_backoff(delivery.opts.get("backoff")),
            queue=target,
        )
        note = dead_letter_note(
            self.settings.name, claim.job_id, delivery.attempts_made + 1, reason
        )
        copy_key = backend._keys(target)[""] + (copy.job_id or "")
        keys, args = self._finish_call(claim, delivery, "failed", reason, now, fields)
        lock_key = backend._job_key(claim.job_id) + ":lock"
        client = await backend._ready(target)
        await backend._load_scripts(client, "moveToFinished", "addLog", *_ADD_SCRIPTS)
        pipe: Any
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_TRIES):
                try:
                    await pipe.watch(lock_key)
                    if await pipe.get(lock_key) != claim.token:
                        await pipe.reset()
                        return -2
                    pipe.multi()
                    backend._queue_script(pipe, "moveToFinished", keys, args)
                    await backend._add(pipe, copy, now)
                    backend._queue_script(
                        pipe, "addLog", [copy_key, copy_key + ":logs"], [copy.job_id, note, ""]
                    )
                    code, _, _ = await pipe.execute()
                    return code
                except redis_errors.WatchError:
                    continue  # our own heartbeat renewed the lock meanwhile; try again
        raise BackendError(
            f"could not fail job {claim.job_id}: its lock kept changing during {_WATCH_TRIES} tries"
        )

    async def extend(self, claims: Sequence[Claim]) -> list[Claim]:
        renew = [*claims, *self._prefetched]
        if not renew:
            return []
        with self.backend._errors("renewing locks"):
            failed = await self.backend._scripts.extendJobLocks(
                [c.job_id for c in renew], [c.token for c in renew], self.lock_ms
            )
        lost = set(failed or ())
        return [c for c in claims if c.job_id in lost]

    async def maintain(self) -> None:
        with self.backend._errors("checking for stalled jobs"):
            if not self._started:
                return
            stalled = await self.backend._scripts.moveStalledJobsToWait(
                self.settings.max_stalls, self.lock_ms
            )
            if stalled:
                logger.warning(
                    "queue %r: %d job(s) stalled (their worker stopped renewing the lock): %s; "
                    "moved back to waiting, or failed after %d stall(s)",
                    self.settings.name,
                    len(stalled),
                    ", ".join(stalled[:20]),
                    self.settings.max_stalls,
                )
            if self._wait.pop is None:
                # Keeps the named connection up, so getWorkers() lists a busy worker too.
                await self._ping_wait()

    async def wait_for_work(self, timeout_s: float) -> None:
        wait = self._wait
        deadline = time.monotonic() + max(0.0, timeout_s)
        if wait.wake.is_set():
            wait.wake.clear()
            return
        limited_s = (self._limit_until_ms - _now_ms()) / 1000
        if limited_s > 0:
            # New jobs cannot start before the limiter's window ends: markers are no use now.
            await asyncio.sleep(min(limited_s, max(0.0, timeout_s)))
            return
        while True:
            remaining = deadline - time.monotonic()
            if self._block_until_ms:
                due_s = (self._block_until_ms - _now_ms()) / 1000
                if due_s <= 0:
                    return
                remaining = min(remaining, due_s)
            if remaining <= 0:
                return
            if wait.pop is None:
                block_s = min(max(remaining, _MIN_BLOCK_S), _MAX_BLOCK_S)
                with self.backend._errors("waiting for jobs"):
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
                    logger.debug("queue %r: its cluster slot moved (%s)", self.settings.name, error)
                    await asyncio.sleep(_REDIRECT_PAUSE_S)
                    return
            with self.backend._errors("waiting for jobs"):
                marker = pop.result()
            if marker:
                # A member "0" (score 0) says a job is ready; "1" carries the timestamp of the
                # next delayed job, which no later marker will announce: remember it.
                _key, _member, score = marker
                due_ms = int(float(score))
                if due_ms <= _now_ms():
                    return
                self._block_until_ms = (
                    min(self._block_until_ms, due_ms) if self._block_until_ms else due_ms
                )

    def wake(self) -> None:
        self._wait.wake.set()

    async def aclose(self) -> None:
        """Release prefetched jobs, stop the blocking pop and close the named connection (the
        worker leaves getWorkers())."""
        prefetched, self._prefetched = self._prefetched, []
        for claim in prefetched:
            try:
                await asyncio.wait_for(self.settle(claim, Released()), _CLOSE_TIMEOUT_S)
            except Exception as exc:  # the lock expires and the job is delivered again
                logger.warning("job %s: could not release it at shutdown: %s", claim.job_id, exc)
        pop, self._wait.pop = self._wait.pop, None
        if pop is not None:
            pop.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(pop, _CLOSE_TIMEOUT_S)
        client, self._wait.client = self._wait.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), _CLOSE_TIMEOUT_S)


_ADD_SCRIPTS = ("addStandardJob", "addDelayedJob", "addPrioritizedJob")
_MOVE_TO_ACTIVE_KEYS = (
    "wait",
    "active",
    "prioritized",
    "events",
    "stalled",
    "limiter",
    "delayed",
    "paused",
    "meta",
    "pc",
    "marker",
)
_FINISH_KEYS = (
    "wait",
    "active",
    "prioritized",
    "events",
    "stalled",
    "limiter",
    "delayed",
    "paused",
    "meta",
    "pc",
)
_RELEASE_KEYS = (
    "active",
    "wait",
    "stalled",
    "paused",
    "meta",
    "limiter",
    "prioritized",
    "marker",
    "events",
)


def _client_from_url(settings: QueueSettings, **options: Any) -> Client:
    """A pooled client for ``settings.redis_url``; with ``redis_cluster``, a cluster client,
    which follows the slots (and MOVED replies) to the right node."""
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, decode_responses=True, **options)
    return aioredis.Redis.from_url(settings.redis_url, decode_responses=True, **options)


def _node_url(url: str, host: str, port: int) -> str:
    """``url`` (credentials, TLS options and all) pointed at one node of a cluster."""
    parts = urlsplit(url)
    credentials, at, _ = parts.netloc.rpartition("@")
    address = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{credentials}{at}{address}:{port}"))


def _worker_client_name(settings: QueueSettings) -> str:
    """``<prefix>:<base64(queue)>:w:<name>``: how Node names a worker's blocking connection."""
    queue_b64 = base64.b64encode(settings.name.encode("utf-8")).decode("ascii")
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
    return f"{settings.prefix}:{queue_b64}:w:corral-{host}-{os.getpid()}"


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed under a driver error (redis-py re-raises it as a
    ConnectionError), if one did."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain, not a cycle
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _keep_jobs(option: Any, default: int | None) -> dict[str, Any]:
    """BullMQ's ``keepJobs`` from a job's removeOn* option, else the worker's default
    (Node's ``getKeepJobs``): ``true`` keeps none, a number keeps the last N, absent keeps all."""
    if option is None:
        return {"count": -1 if default is None else default}
    if isinstance(option, bool):
        return {"count": 0 if option else -1}
    if isinstance(option, int | float):
        return {"count": int(option)}
    if isinstance(option, dict):
        return option
    return {"count": -1}


def _stacktrace(delivery: _Delivery, trace: str) -> str:
    """The job's stack traces with this attempt's appended, as Node's ``updateStacktrace``."""
    stack = _json_list(delivery.raw.get("stacktrace"))
    if trace:
        stack.append(trace)
    limit = delivery.opts.get("stackTraceLimit")
    if limit == 0:
        stack = []
    elif isinstance(limit, int) and limit > 0:
        stack = stack[-limit:]
    return json.dumps(stack, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class _JobOptions:
    """What a job's ``opts`` JSON says to the worker, parsed once per distinct text."""

    opts: dict[str, Any]  # shared between jobs: read, never changed
    is_object: bool
    max_attempts: int
    backoff: Retry | None
    keep_logs: int | None


_job_options_cache: dict[str | None, _JobOptions] = {}
_JOB_OPTIONS_CACHE_SIZE = 256  # distinct opts texts kept; jobs of one producer mostly share one


def _job_options(text: str | None) -> _JobOptions:
    cached = _job_options_cache.get(text)
    if cached is not None:
        return cached
    value = decode_lenient(text)
    opts = value if isinstance(value, dict) else {}
    keep_logs = opts.get("kl", opts.get("keepLogs"))
    parsed = _JobOptions(
        opts=opts,
        is_object=text is None or isinstance(value, dict),
        max_attempts=_max_attempts(opts),
        backoff=_lenient_backoff(opts.get("backoff")),
        keep_logs=keep_logs if isinstance(keep_logs, int) else None,
    )
    if len(_job_options_cache) >= _JOB_OPTIONS_CACHE_SIZE:
        _job_options_cache.clear()
    _job_options_cache[text] = parsed
    return parsed


def _max_attempts(opts: Mapping[str, Any]) -> int:
    # Node stores attempts: 0 when none was given, which means a single attempt.
    return max(1, _int(opts.get("attempts")))


def _lenient_backoff(value: Any) -> Retry | None:
    try:
        return Retry.from_bullmq(value)
    except (ValueError, TypeError):
        return None


def _int(value: Any) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return 0


def _is_text(value: str) -> bool:
    """Whether ``value`` came from UTF-8 bytes (no byte was surrogate-escaped)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _strs(values: Any) -> list[str]:
    return [str(value) for value in values]


def _bulk(value: Any) -> bytes:
    """``value`` as a RESP bulk string, encoded as the client's redis-py encoder does (UTF-8 with
    ``surrogateescape``: a foreign job's bytes are written back as they were read)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogateescape")
    elif isinstance(value, int) and not isinstance(value, bool):
        data = b"%d" % value
    elif isinstance(value, float):
        data = repr(value).encode()
    else:
        raise redis_errors.DataError(f"cannot send {type(value).__name__} {value!r} to Redis")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _pack_command(*args: Any) -> bytes:
    """A command in RESP."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


def _now_ms() -> int:
    return round(time.time() * 1000)


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _json_object(text: str | None) -> dict[str, Any]:
    value = decode_lenient(text)
    return value if isinstance(value, dict) else {}


def _json_list(text: str | None) -> list[Any]:
    value = decode_lenient(text)
    return value if isinstance(value, list) else []


__all__ = ["LIB_VERSION", "BullMQBackend", "dead_letter_id"]
