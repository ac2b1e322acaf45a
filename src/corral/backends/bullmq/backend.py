"""BullMQ on Redis: corral jobs stored exactly as Node.js BullMQ stores them.

Every state change goes through the Lua scripts shipped with the ``bullmq`` Python package, which
are the scripts Node.js BullMQ runs, so Node producers and workers, Bull Board and Taskforce.sh
handle corral jobs as their own and corral handles theirs. Job name = handler name, job ``data`` =
the payload's JSON verbatim, options in BullMQ's names (``attempts``, ``backoff``, ``delay``,
``priority``, ``jobId``, ``removeOnComplete``/``removeOnFail``).

Layers, each importing only the ones below it: this module (the backend: enqueue and management)
→ :mod:`.source` (the worker side) → :mod:`.flows` (writing and reading flows)
→ :mod:`.connection` (clients, script execution, errors)
→ :mod:`.protocol` (keys, scripts, arguments: the only user of the package's internals)
→ :mod:`.wire` (pipelined writes: the only user of redis-py's private API).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

from corral.backends.base import PullBackend, name_matches
from corral.backends.bullmq import cancel, transfer
from corral.backends.bullmq.connection import Client, RedisStore
from corral.backends.bullmq.events import StreamReader, StreamWatch
from corral.backends.bullmq.flows import read_children, write_flow
from corral.backends.bullmq.protocol import (
    ADD_SCRIPTS,
    CLEAN_SETS,
    COUNT_TYPES,
    DELAY_SCORE_FACTOR,
    STATES,
    as_int,
    json_list,
    json_object,
    max_attempts,
)
from corral.backends.bullmq.schedulers import Schedulers
from corral.backends.bullmq.source import BullMQSource, now_ms, to_datetime
from corral.errors import BackendError, JobActiveError
from corral.message import (
    Child,
    FlowEntry,
    FlowWrite,
    ImportOutcome,
    JobInfo,
    JobRecord,
    JobRef,
    JobSearch,
    JobState,
    NewJob,
)
from corral.metrics import Throughput, series_from_bullmq, window_end
from corral.payload import decode_lenient
from corral.schedules import NewSchedule, ScheduleInfo
from corral.settings import QueueSettings
from corral.workers import WorkerInfo, workers_from_clients


class BullMQBackend(PullBackend):
    """One queue stored in Redis in BullMQ's layout (see the module docstring)."""

    def __init__(self, settings: QueueSettings, *, store: RedisStore | None = None) -> None:
        super().__init__(settings)
        self._owns_store = store is None
        self.store = store or RedisStore(settings)
        self.protocol = self.store.protocol
        self.keys = self.protocol.keys.of(settings.name)
        self.schedulers = Schedulers(self.store, settings)
        self._sources: set[BullMQSource] = set()

    def __repr__(self) -> str:
        return (
            f"<BullMQBackend queue={self.queue_name!r} prefix={self.settings.prefix!r} "
            f"at {self.store.where}>"
        )

    def _sibling(self, settings: QueueSettings) -> BullMQBackend:
        return BullMQBackend(settings, store=self.store)

    def _job_key(self, job_id: str) -> str:
        return self.keys[""] + job_id

    # -- producing -------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[str]:
        if not jobs:
            return []
        queues = sorted({job.queue or self.queue_name for job in jobs})
        timestamp = now_ms()
        calls = [
            self.protocol.add_job(
                job.queue or self.queue_name,
                job,
                self.protocol.job_opts(
                    job,
                    keep_completed=self.settings.keep_completed,
                    keep_failed=self.settings.keep_failed,
                ),
                timestamp,
            )
            for job in jobs
        ]
        with self.store.errors("adding jobs"):
            await self.store.ready(*queues)
            if len(calls) == 1:  # one script call is atomic on its own: save the MULTI
                results = [await self.store.run(calls[0])]
            else:
                results = await self.store.run_atomically(calls)
        ids: list[str] = []
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, int) and result < 0:
                raise BackendError(f"BullMQ refused job {job.name!r} (code {result})")
            ids.append(str(result))
        if self.queue_name in queues:
            self._wake()
        return ids

    async def enqueue_flow(self, entries: Sequence[FlowEntry]) -> FlowWrite:
        written = await write_flow(self.store, self.settings, entries)
        if any((entry.job.queue or self.queue_name) == self.queue_name for entry in entries):
            self._wake()
        return written

    # -- consuming -------------------------------------------------------------------------

    def open_source(self, *, stop: asyncio.Event, burst: bool) -> BullMQSource:
        source = BullMQSource(self.store, self.settings, stop=stop, burst=burst)
        self._sources.add(source)
        return source

    def _wake(self) -> None:
        for source in self._sources:
            source.wake()

    # -- managing --------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        state_call = self.protocol.get_state(self.queue_name, job_id)
        key = self._job_key(job_id)
        with self.store.errors(f"reading job {job_id}"):
            client = self.store.client()  # a read writes nothing
            await self.store.load_scripts(client, state_call.script)
            async with client.pipeline(transaction=True) as pipe:
                pipe.hgetall(key)
                self.store.queue_script(pipe, state_call)
                pipe.lrange(key + ":logs", 0, -1)
                pipe.zscore(self.keys["delayed"], job_id)
                raw, state, logs, delayed_score = await pipe.execute()
        if not raw:
            return None
        return self._info(job_id, raw, str(state), logs, delayed_score)

    async def open_events(self) -> StreamReader:
        return StreamReader(self.store, self.queue_name)

    async def watch_job(self, job_id: str) -> StreamWatch:
        return await StreamWatch.open(self.store, self.queue_name, job_id)

    async def children(self, job_id: str) -> list[Child]:
        return await read_children(self.store, self.queue_name, job_id)

    async def list_jobs(
        self, state: JobState, *, limit: int = 50, offset: int = 0
    ) -> list[JobInfo]:
        if limit <= 0:
            return []
        with self.store.errors(f"listing {state.value} jobs"):
            client = self.store.client()  # a read writes nothing
            ids, scores = await self._state_ids(client, state, max(0, offset), limit)
            return await self._read_jobs(client, state, ids, scores)

    async def _state_ids(
        self, client: Client, state: JobState, offset: int, limit: int
    ) -> tuple[list[str], dict[str, float]]:
        """Ids of the jobs at positions ``offset`` to ``offset + limit - 1`` of ``state``, in
        :meth:`list_jobs` order; for delayed jobs also their scores (when they are due)."""
        k = self.keys
        scores: dict[str, float] = {}
        if state is JobState.WAITING:
            ids = await self._waiting_ids(client, offset, limit)
        elif state is JobState.DELAYED:
            pairs: list[Any] = await client.zrange(
                k["delayed"], offset, offset + limit - 1, withscores=True
            )
            scores = {str(member): float(score) for member, score in pairs}
            ids = list(scores)
        elif state is JobState.WAITING_CHILDREN:  # a sorted set by timestamp
            ids = _strs(await client.zrange(k["waiting-children"], offset, offset + limit - 1))
        elif state is JobState.ACTIVE:
            # The active list grows on the left: read from the right, first started first.
            ids = _strs(await client.lrange(k["active"], -(offset + limit), -(offset + 1)))
            ids.reverse()
        else:
            ids = _strs(await client.zrevrange(k[state.value], offset, offset + limit - 1))
        return ids, scores

    async def _read_jobs(
        self, client: Client, state: JobState, ids: Sequence[str], scores: Mapping[str, float]
    ) -> list[JobInfo]:
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

    async def search_jobs(
        self, state: JobState, *, name: str, offset: int = 0, limit: int = 50, window: int = 10_000
    ) -> JobSearch:
        offset = max(0, offset)
        with self.store.errors(f"searching {state.value} jobs"):
            client = self.store.client()  # a read writes nothing
            ids, scores = (
                await self._state_ids(client, state, offset, window) if window > 0 else ([], {})
            )
            names = await self._job_names(client, ids)
            found: list[str] = []
            next_offset: int | None = offset + len(ids) if len(ids) == window else None
            for position, (job_id, job_name) in enumerate(zip(ids, names, strict=True)):
                if job_name is not None and name_matches(name, str(job_name)):
                    found.append(job_id)
                    if len(found) >= limit:
                        next_offset = offset + position + 1
                        break
            jobs = await self._read_jobs(client, state, found, scores) if found else []
        return JobSearch(jobs, next_offset)

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
        with self.store.errors("counting jobs"):
            found = await self.store.run(self.protocol.get_counts(self.queue_name))
        values = dict(zip(COUNT_TYPES, (int(n) for n in found), strict=True))
        return {
            JobState.WAITING: sum(values[t] for t in ("wait", "paused", "prioritized")),
            JobState.WAITING_CHILDREN: values["waiting-children"],
            JobState.DELAYED: values["delayed"],
            JobState.ACTIVE: values["active"],
            JobState.COMPLETED: values["completed"],
            JobState.FAILED: values["failed"],
        }

    async def throughput(self, *, minutes: int = 60) -> Throughput:
        series: list[list[int]] = []
        now = now_ms()
        with self.store.errors("reading the queue's metrics"):
            client = self.store.client()  # a read writes nothing
            async with client.pipeline(transaction=False) as pipe:
                for target in ("completed", "failed"):
                    meta_key, data_key = self.protocol.metrics_keys(self.queue_name, target)
                    pipe.hmget(meta_key, "count", "prevTS", "prevCount")
                    pipe.lrange(data_key, 0, max(0, minutes - 2))
                replies = await pipe.execute()
        for meta, data in (replies[0:2], replies[2:4]):
            count, prev_ts, prev_count = (None if v is None else as_int(v) for v in meta)
            points = [as_int(point) for point in data]
            series.append(
                series_from_bullmq(count, prev_ts, prev_count, points, minutes=minutes, now_ms=now)
            )
        return Throughput(completed=series[0], failed=series[1], end=window_end(now))

    async def workers(self, *, every_queue: bool = False) -> list[WorkerInfo]:
        with self.store.errors("listing workers"):
            client = self.store.client()
            if isinstance(client, RedisCluster):
                # A worker's named connection is on the node serving its queue's slot.
                replies = await client.client_list(target_nodes=RedisCluster.ALL_NODES)
                clients = [c for reply in _node_replies(replies) for c in reply]
            else:
                clients = await client.client_list()
        found = workers_from_clients(self.settings.prefix, clients)
        return found if every_queue else [w for w in found if self.queue_name in w.queues]

    async def retry_failed(self, *, limit: int | None = None) -> int:
        moved = 0
        remaining = limit
        with self.store.errors("retrying failed jobs"):
            client = await self.store.ready(self.queue_name)
            while remaining is None or remaining > 0:
                batch = 1000 if remaining is None else min(remaining, 1000)
                ids = _strs(await client.zrange(self.keys["failed"], 0, batch - 1))  # oldest first
                if not ids:
                    break
                results = await self.store.run_many(
                    [self.protocol.reprocess_failed(self.queue_name, job_id) for job_id in ids]
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                done = sum(1 for result in results if result == 1)
                moved += done
                if remaining is not None:
                    remaining -= len(ids)
                if done == 0:  # only orphaned ids left; they would come back every time
                    break
        if moved:
            self._wake()
        return moved

    async def retry_job(self, job_id: str) -> bool:
        with self.store.errors(f"retrying job {job_id}"):
            await self.store.ready(self.queue_name)
            result = await self.store.run(self.protocol.reprocess_failed(self.queue_name, job_id))
        if result == 1:
            self._wake()
            return True
        return False  # -1: no such job, -3: it is not failed

    async def clean(self, state: JobState, *, older_than_ms: int = 0, keep: int = 0) -> int:
        # The finished sets are scored by finishedOn, so the oldest come first and a score
        # range gives the age; ranks below ZCARD - keep leave the newest ``keep`` alone.
        key = self.keys[state.value]
        cutoff = now_ms() - max(0, older_than_ms)
        deleted = 0
        with self.store.errors(f"cleaning {state.value} jobs"):
            client = await self.store.ready(self.queue_name)
            while True:
                may_go = await client.zcard(key) - max(0, keep)
                if may_go <= 0:
                    break
                ids = _strs(
                    await client.zrangebyscore(
                        key, "-inf", cutoff, start=0, num=min(may_go, _CLEAN_BATCH)
                    )
                )
                if not ids:
                    break
                results = await self.store.run_many(
                    [self.protocol.remove_job(self.queue_name, job_id) for job_id in ids]
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                removed = sum(1 for result in results if result == 1)
                deleted += removed
                if removed == 0:  # ids without a job hash: nothing more this call can do
                    await client.zrem(key, *ids)
                    break
        return deleted

    async def _job_names(self, client: Client, ids: Sequence[str]) -> list[Any]:
        """The ``name`` field of each job (``None`` where the job is gone), read by a small
        script per thousand jobs: one round trip for the window, each script brief enough not
        to hold Redis up, and no per-command cost in the client."""
        names: list[Any] = []
        async with client.pipeline(transaction=False) as pipe:
            for start in range(0, len(ids), _NAMES_PER_SCRIPT):
                keys = [self._job_key(job_id) for job_id in ids[start : start + _NAMES_PER_SCRIPT]]
                # EVAL, not EVALSHA: the text is short, and Redis caches what it compiles.
                pipe.execute_command("EVAL", _JOB_NAMES_LUA, len(keys), *keys)
            for reply in await pipe.execute():
                names += reply
        return names

    async def list_queues(self) -> list[str]:
        # Every queue that ever had a job added has a meta hash: the add scripts set its
        # ``opts.maxLenEvents``, and Node's Queue and corral write its ``version``.
        prefix = self.settings.prefix + ":"
        names: set[str] = set()
        with self.store.errors("listing the queues"):
            client = self.store.client()
            # Small steps: each SCAN holds Redis up for a moment only, workers come first.
            async for key in client.scan_iter(match=_glob_escape(prefix) + "*:meta", count=1000):
                name = str(key)[len(prefix) : -len(":meta")]
                if name and ":" not in name:
                    names.add(name)
        return sorted(names)

    async def remove(self, job_id: str) -> bool:
        with self.store.errors(f"removing job {job_id}"):
            client = await self.store.ready(self.queue_name)
            if not await client.exists(self._job_key(job_id)):
                return False
            result = int(await self.store.run(self.protocol.remove_job(self.queue_name, job_id)))
        if result == 0:
            raise JobActiveError(
                f"job {job_id} is active (held by a worker); remove it once it finishes"
            )
        refused = Schedulers.refused_removal(job_id, result)
        if refused is not None:
            raise refused
        if result < 0:
            raise BackendError(f"BullMQ refused to remove job {job_id} (code {result})")
        return True

    async def request_cancel(self, job_id: str, reason: str) -> bool:
        return await cancel.request_cancel(
            self.store, self.queue_name, job_id, reason, self.settings.lease_s
        )

    async def promote(self, job_id: str) -> bool:
        with self.store.errors(f"promoting job {job_id}"):
            await self.store.ready(self.queue_name)
            code = await self.store.run(self.protocol.promote(self.queue_name, job_id))
        if code == 0:
            self._wake()
            return True
        return False

    # -- schedules -------------------------------------------------------------------------

    async def upsert_schedule(self, schedule: NewSchedule) -> None:
        await self.schedulers.upsert(schedule)
        self._wake()

    async def remove_schedule(self, schedule_id: str) -> bool:
        return await self.schedulers.remove(schedule_id)

    async def list_schedules(self, schedule_id: str | None = None) -> list[ScheduleInfo]:
        return await self.schedulers.list(schedule_id)

    async def pause(self) -> None:
        with self.store.errors("pausing the queue"):
            await self.store.ready(self.queue_name)
            await self.store.run(self.protocol.pause(self.queue_name, True))

    async def resume(self) -> None:
        with self.store.errors("resuming the queue"):
            await self.store.ready(self.queue_name)
            await self.store.run(self.protocol.pause(self.queue_name, False))
        self._wake()

    async def is_paused(self) -> bool:
        with self.store.errors("reading the queue's state"):
            client = self.store.client()  # a read writes nothing
            return bool(await client.hexists(self.keys["meta"], "paused"))

    async def purge(self) -> int:
        # cleanJobsInSet compares timestamps as 13-digit strings: a cut-off one day ahead stays
        # comparable and also catches jobs stamped by a producer whose clock runs ahead.
        cutoff = now_ms() + 86_400_000
        calls = [self.protocol.clean_set(self.queue_name, name, cutoff) for name in CLEAN_SETS]
        with self.store.errors("purging the queue"):
            await self.store.ready(self.queue_name)
            removed = await self.store.run_atomically(calls)
        return sum(len(ids) for ids in removed)

    # -- moving ----------------------------------------------------------------------------

    async def export_jobs(self, state: JobState, *, limit: int, offset: int = 0) -> list[JobRecord]:
        return await transfer.export_jobs(self, state, limit, offset)

    async def import_jobs(
        self, records: Sequence[JobRecord], *, dry_run: bool = False
    ) -> list[ImportOutcome]:
        return await transfer.import_jobs(self, records, dry_run=dry_run)

    async def remove_exported(self, records: Sequence[JobRecord]) -> list[bool]:
        return await transfer.remove_exported(self, records)

    async def close(self) -> None:
        sources, self._sources = self._sources, set()
        for source in sources:
            await source.aclose()
        if self._owns_store:
            await self.store.close()

    # -- helpers ---------------------------------------------------------------------------

    def _info(
        self,
        job_id: str,
        raw: Mapping[str, str],
        state_name: str,
        logs: Sequence[str],
        delayed_score: float | None,
    ) -> JobInfo:
        opts = json_object(raw.get("opts"))
        state = STATES.get(state_name)
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
            run_at = to_datetime(int(delayed_score) // DELAY_SCORE_FACTOR)
        stack = [str(trace) for trace in json_list(raw.get("stacktrace"))]
        progress = decode_lenient(raw.get("progress"))
        return JobInfo(
            id=job_id,
            name=raw.get("name", ""),
            data=decode_lenient(raw.get("data")),
            queue=self.queue_name,
            state=state,
            attempts_made=as_int(raw.get("atm")),
            max_attempts=max_attempts(opts),
            priority=as_int(raw.get("priority")),
            enqueued_at=to_datetime(as_int(raw.get("timestamp"))),
            run_at=run_at,
            finished_at=to_datetime(as_int(raw["finishedOn"])) if raw.get("finishedOn") else None,
            result=decode_lenient(raw.get("returnvalue")),
            error=raw.get("failedReason") or None,
            traceback=stack[-1] if stack else None,
            tracebacks=stack,
            progress=progress if progress is not None else 0,
            logs=list(logs),
            parent=self._parent(raw),
        )

    def _parent(self, raw: Mapping[str, str]) -> JobRef | None:
        """A child's parent, from its ``parent`` field (``{id, queueKey}``) or ``parentKey``."""
        keys = self.protocol.keys
        field = json_object(raw.get("parent"))
        if isinstance(field.get("id"), str) and isinstance(field.get("queueKey"), str):
            queue, _ = keys.split_job_key(field["queueKey"] + ":" + field["id"])
            return JobRef(queue, field["id"])
        parent_key = raw.get("parentKey")
        if parent_key:
            return JobRef(*keys.split_job_key(parent_key))
        return None


_JOB_NAMES_LUA = """
local names = {}
for i, key in ipairs(KEYS) do
  names[i] = redis.call('HGET', key, 'name')
end
return names
"""
"""corral's own script (not BullMQ's): the names of the jobs whose hashes are its KEYS."""
_NAMES_PER_SCRIPT = 1000

_CLEAN_BATCH = 1000
"""Jobs removed per round trip by ``clean`` (each its own removeJob script)."""


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _strs(values: Any) -> list[str]:
    return [str(value) for value in values]


__all__ = ["ADD_SCRIPTS", "BullMQBackend"]


def _node_replies(replies: Any) -> list[Any]:
    """A cluster command's replies, one per node (a dict by node, or one merged list)."""
    if isinstance(replies, dict):
        return list(replies.values())
    return [replies] if isinstance(replies, list) else []
