"""Moving jobs out of and into a BullMQ queue: the backend's ``export_jobs``, ``import_jobs`` and
``remove_exported`` (see :class:`~corral.backends.base.QueueBackend` for the contract).

A moved job is a valid BullMQ job: added by the package's add scripts (so markers, the priority
counter, delayed scores and paused queues are handled as for any job), then given its attempts,
error, stack traces, progress and logs; a failed one is written as ``moveToFinished`` leaves it.
Existence is checked under WATCH on the job keys and the writes go in one MULTI, so a job created
concurrently under the same id is never overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis.exceptions as redis_errors

from corral.backends.bullmq.protocol import (
    DELAY_SCORE_FACTOR,
    EXPORT_JOBS_LUA,
    IN_STATE_LUA,
    MOVABLE_SETS,
    RAISE_ID_LUA,
    READ_JOBS_LUA,
    as_int,
    failed_job_fields,
    history_fields,
    is_generated_id,
    job_options,
    json_list,
)
from corral.backends.bullmq.source import now_ms
from corral.errors import BackendError
from corral.message import ImportOutcome, JobRecord, JobState, NewJob
from corral.payload import same_json

if TYPE_CHECKING:
    from corral.backends.bullmq.backend import BullMQBackend

_WATCH_TRIES = 8
_MOVABLE = (JobState.WAITING, JobState.DELAYED, JobState.FAILED)


def _check_movable(state: JobState) -> None:
    if state not in _MOVABLE:
        raise ValueError(f"only waiting, delayed and failed jobs are moved, not {state.value}")


async def export_jobs(
    backend: BullMQBackend, state: JobState, limit: int, offset: int
) -> list[JobRecord]:
    _check_movable(state)
    if limit <= 0:
        return []
    offset = max(0, offset)
    store, k = backend.store, backend.keys
    with store.errors(f"reading {state.value} jobs to move"):
        client = await store.ready(backend.queue_name)
        due: dict[str, int] = {}
        if state is JobState.WAITING:
            ids = await backend._waiting_ids(client, offset, limit)
        elif state is JobState.DELAYED:
            pairs: list[Any] = await client.zrange(
                k["delayed"], offset, offset + limit - 1, withscores=True
            )
            due = {str(member): int(score) // DELAY_SCORE_FACTOR for member, score in pairs}
            ids = list(due)
        else:
            ids = [str(i) for i in await client.zrange(k["failed"], offset, offset + limit - 1)]
        keys = [k[""] + job_id for job_id in ids]
        rows = await client.eval(EXPORT_JOBS_LUA, len(keys), *keys) if keys else []
        # A parent's view of its children (pending or settled) lives in keys of its own.
        parents: list[Any] = []
        if keys:
            async with client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.exists(
                        *backend.protocol.dependency_keys(backend.queue_name, job_id).values()
                    )
                parents = await pipe.execute()
    records = []
    for job_id, (flat, logs), children in zip(ids, rows, parents, strict=True):
        if flat:  # removed between the two reads
            raw = {str(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
            record = _record(job_id, raw, [str(line) for line in logs], state, due)
            record.in_flow = bool(raw.get("parentKey")) or bool(children)
            records.append(record)
    return records


def _record(
    job_id: str, raw: dict[str, str], logs: list[str], state: JobState, due: dict[str, int]
) -> JobRecord:
    options = job_options(raw.get("opts"))
    timestamp = as_int(raw.get("timestamp"))
    return JobRecord(
        id=job_id,
        name=raw.get("name", ""),
        data_json=raw.get("data") or "{}",  # Node reads a missing data field as {}
        state=state,
        priority=as_int(raw.get("priority")),
        max_attempts=options.max_attempts,
        attempts_made=as_int(raw.get("atm")),
        backoff=options.backoff,
        enqueued_at_ms=timestamp,
        run_at_ms=due.get(job_id) if state is JobState.DELAYED else None,
        finished_at_ms=as_int(raw.get("finishedOn")) if state is JobState.FAILED else None,
        error=raw.get("failedReason") or None,
        tracebacks=[str(trace) for trace in json_list(raw.get("stacktrace"))],
        progress_json=raw.get("progress"),
        logs=logs,
    )


async def import_jobs(
    backend: BullMQBackend, records: Sequence[JobRecord], *, dry_run: bool
) -> list[ImportOutcome]:
    for record in records:
        _check_movable(record.state)
    if not records:
        return []
    store, protocol, queue = backend.store, backend.protocol, backend.queue_name
    keys = [protocol.keys.job(queue, record.id) for record in records]
    with store.errors("writing moved jobs"):
        client = await store.ready(queue)
        if dry_run:
            found = await client.eval(READ_JOBS_LUA, len(keys), *keys)
            return _outcomes(records, found)
        await store.load_scripts(client, "addStandardJob", "addDelayedJob", "addPrioritizedJob")
        pipe: Any
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_TRIES):
                try:
                    await pipe.watch(*keys)
                    found = await pipe.execute_command("EVAL", READ_JOBS_LUA, len(keys), *keys)
                    outcomes = _outcomes(records, found)
                    created = [
                        record
                        for record, outcome in zip(records, outcomes, strict=True)
                        if outcome is ImportOutcome.CREATED
                    ]
                    if not created:
                        await pipe.reset()
                        return outcomes
                    pipe.multi()
                    adds = _queue_writes(backend, pipe, created)
                    results = await pipe.execute()
                    for index in adds:
                        if isinstance(results[index], int) and results[index] < 0:
                            raise BackendError(
                                f"BullMQ refused a moved job (code {results[index]})"
                            )
                    backend._wake()
                    return outcomes
                except redis_errors.WatchError:
                    continue  # one of these ids was written meanwhile: look again
    raise BackendError(
        f"could not write {len(records)} moved jobs: their keys kept changing during "
        f"{_WATCH_TRIES} tries; stop the producers and workers of queue {queue!r} and retry"
    )


def _outcomes(records: Sequence[JobRecord], found: Sequence[Any]) -> list[ImportOutcome]:
    outcomes = []
    for record, (exists, name, data) in zip(records, found, strict=True):
        if not int(exists):
            outcomes.append(ImportOutcome.CREATED)
        elif name == record.name and same_json(data, record.data_json):
            outcomes.append(ImportOutcome.PRESENT)
        else:
            outcomes.append(ImportOutcome.CONFLICT)
    return outcomes


def _queue_writes(backend: BullMQBackend, pipe: Any, records: Sequence[JobRecord]) -> list[int]:
    """Queue the writes of ``records`` on ``pipe`` (in MULTI); return the indexes of the add
    scripts' replies."""
    store, protocol, queue = backend.store, backend.protocol, backend.queue_name
    keys = backend.keys
    settings = backend.settings
    adds: list[int] = []
    position = 0
    highest = 0
    for record in records:
        key = keys[""] + record.id
        generated = is_generated_id(record.id)
        if generated:
            highest = max(highest, int(record.id))
        job = NewJob(
            name=record.name,
            data_json=record.data_json,
            job_id=record.id,
            priority=record.priority,
            attempts=record.max_attempts,
            backoff=record.backoff,
        )
        if record.state is JobState.DELAYED:
            due = record.run_at_ms if record.run_at_ms is not None else now_ms()
            # The add script schedules the job at timestamp + delay: exactly its due time.
            job.delay_ms = max(1, due - record.enqueued_at_ms)
        opts = protocol.job_opts(
            job, keep_completed=settings.keep_completed, keep_failed=settings.keep_failed
        )
        if generated:
            del opts["jobId"]  # Node writes jobId only for ids given by the producer
        history = history_fields(
            attempts_made=record.attempts_made,
            error=record.error,
            tracebacks=record.tracebacks,
            progress_json=record.progress_json,
        )
        if record.state is JobState.FAILED:
            finished = record.finished_at_ms or now_ms()
            fields = failed_job_fields(
                name=record.name,
                data_json=record.data_json,
                opts=opts,
                timestamp=record.enqueued_at_ms,
                priority=record.priority,
                finished_at=finished,
            )
            pipe.hset(key, mapping={**fields, **history})
            pipe.zadd(keys["failed"], {record.id: finished})
            position += 2
        else:
            store.queue_script(pipe, protocol.add_job(queue, job, opts, record.enqueued_at_ms))
            adds.append(position)
            position += 1
            if history:
                pipe.hset(key, mapping=history)
                position += 1
        if record.logs:
            pipe.rpush(key + ":logs", *record.logs)
            position += 1
    if highest:
        pipe.execute_command("EVAL", RAISE_ID_LUA, 1, keys["id"], highest)
    return adds


async def remove_exported(backend: BullMQBackend, records: Sequence[JobRecord]) -> list[bool]:
    if not records:
        return []
    store, protocol, queue = backend.store, backend.protocol, backend.queue_name
    k = backend.keys
    keys = [protocol.keys.job(queue, record.id) for record in records]
    pairs: list[str] = []
    for record in records:
        pairs += (record.id, record.state.value)
    with store.errors("removing moved jobs"):
        client = await store.ready(queue)
        await store.load_scripts(client, "removeJob")
        pipe: Any
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_TRIES):
                try:
                    await pipe.watch(*keys)
                    there = await pipe.execute_command(
                        "EVAL",
                        IN_STATE_LUA,
                        len(MOVABLE_SETS),
                        *(k[name] for name in MOVABLE_SETS),
                        k[""],
                        *pairs,
                    )
                    chosen = [i for i, flag in enumerate(there) if int(flag)]
                    if not chosen:
                        await pipe.reset()
                        return [False] * len(records)
                    pipe.multi()
                    for index in chosen:
                        store.queue_script(pipe, protocol.remove_job(queue, records[index].id))
                    results = await pipe.execute()
                    removed = [False] * len(records)
                    for index, result in zip(chosen, results, strict=True):
                        removed[index] = result == 1
                    return removed
                except redis_errors.WatchError:
                    continue
    raise BackendError(
        f"could not remove {len(records)} moved jobs from queue {queue!r}: their keys kept "
        f"changing during {_WATCH_TRIES} tries; stop the queue's workers and retry"
    )
