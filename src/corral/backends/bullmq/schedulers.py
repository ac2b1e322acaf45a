"""BullMQ's job schedulers: corral's schedules in their Redis layout, kept going by any worker.

A schedule is Node.js BullMQ's *job scheduler*: the member ``<id>`` of the sorted set
``<prefix>:<queue>:repeat`` (score: the slot of its current job), the hash ``repeat:<id>``
(``name``, ``pattern`` or ``every``, ``tz``, ``limit``, ``startDate``, ``endDate``, ``data``,
``opts``, ``ic`` = jobs made) and one job per slot with the id ``repeat:<id>:<slot ms>``, whose
``rjk`` field names the scheduler and whose ``opts.repeat`` says how to compute the next slot.
Writing goes through the package's ``addJobScheduler``/``removeJobScheduler`` scripts; when a
corral worker claims a scheduler's job it runs ``updateJobScheduler`` with the arguments Node's
worker passes, so corral and Node.js workers keep each other's schedulers going, and Node's
``getJobSchedulers()`` (and Bull Board) list corral's. The job shapes below are Node's
(``JobScheduler.getNextJobOpts``); the scripts' keys and arguments are in :mod:`.protocol`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from corral.backends.bullmq.connection import RedisStore
from corral.backends.bullmq.protocol import (
    JOB_OF_SCHEDULER,
    SCHEDULER_ERRORS,
    ScriptCall,
    as_int,
    json_object,
    lenient_backoff,
    max_attempts,
)
from corral.errors import ConfigError, CorralError, ScheduleConflictError
from corral.payload import decode_lenient
from corral.schedules import (
    NewSchedule,
    ScheduleInfo,
    ScheduleRule,
    ms_to_datetime,
    now_ms,
    slot_job_id,
    slot_of,
)
from corral.settings import QueueSettings

logger = logging.getLogger("corral.bullmq")

_legacy_warned: set[str] = set()


class Schedulers:
    """The job schedulers of one queue."""

    def __init__(self, store: RedisStore, settings: QueueSettings) -> None:
        self.store = store
        self.protocol = store.protocol
        self.settings = settings
        self.queue = settings.name
        self.keys = self.protocol.keys.of(self.queue)

    async def upsert(self, schedule: NewSchedule) -> None:
        """Node's ``Queue.upsertJobScheduler``, with corral's template."""
        now = now_ms()
        rule, job = schedule.rule, schedule.job
        next_ms = rule.first_ms(now) if rule.cron is not None else now
        if next_ms is None:
            raise ConfigError(f"schedule {schedule.id!r} has no run left before its end_at")
        template = self.protocol.job_opts(
            job, keep_completed=self.settings.keep_completed, keep_failed=self.settings.keep_failed
        )
        call = self.protocol.add_job_scheduler(
            self.queue,
            schedule.id,
            next_ms=next_ms,
            scheduler=scheduler_fields(job.name, rule),
            data_json=job.data_json,
            template=template,
            first_job=first_job_opts(template, rule, schedule.id, next_ms, now),
            now=now,
        )
        with self.store.errors(f"writing schedule {schedule.id!r}"):
            client = await self.store.ready(self.queue)
            reply = await self.store.run(call)
            if isinstance(reply, int) and reply < 0:
                raise ScheduleConflictError(
                    f"schedule {schedule.id!r} was not written: "
                    f"{SCHEDULER_ERRORS.get(reply, f'code {reply}')}; write it again once that "
                    "job has started the next slot"
                )
            slot = slot_of(str(reply[0]), schedule.id) if isinstance(reply, list) else None
            if rule.every_ms is not None and slot is not None:
                # The script keeps the old phase when it replaces a pending job of another
                # interval; a late job would then be followed by a slot on the old grid.
                await client.hset(
                    f"{self.keys['repeat']}:{schedule.id}", "offset", slot % rule.every_ms
                )

    async def remove(self, schedule_id: str) -> bool:
        """Delete the scheduler, its next job if delayed (the script) or waiting (removeJob,
        once the scheduler is gone: a started job is left to finish)."""
        k = self.keys
        with self.store.errors(f"removing schedule {schedule_id!r}"):
            client = await self.store.ready(self.queue)
            score = await client.zscore(k["repeat"], schedule_id)
            calls = [self.protocol.remove_job_scheduler(self.queue, schedule_id)]
            if score is not None:
                job_id = slot_job_id(schedule_id, int(score))
                processed, name = await client.hmget(k[""] + job_id, "processedOn", "name")
                if name is not None and processed is None:
                    calls.append(self.protocol.remove_job(self.queue, job_id))
            replies = await self.store.run_atomically(calls)
        return bool(replies[0] == 0)

    async def list(self, schedule_id: str | None = None) -> list[ScheduleInfo]:
        """The schedulers (next to run first), read as Node's ``getJobSchedulers`` reads them;
        members without a hash (legacy repeatable jobs) are left out."""
        k = self.keys
        with self.store.errors("listing schedules"):
            client = await self.store.ready(self.queue)
            if schedule_id is None:
                found: list[Any] = await client.zrange(k["repeat"], 0, -1, withscores=True)
                members = [(str(member), int(score)) for member, score in found]
            else:
                score = await client.zscore(k["repeat"], schedule_id)
                members = [] if score is None else [(schedule_id, int(score))]
            async with client.pipeline(transaction=False) as pipe:
                for member, score in members:
                    pipe.hgetall(f"{k['repeat']}:{member}")
                    pipe.hmget(k[""] + slot_job_id(member, score), "processedOn", "name")
                rows = await pipe.execute()
        infos = []
        for index, (member, score) in enumerate(members):
            fields, (processed, name) = rows[2 * index], rows[2 * index + 1]
            if fields:
                pending = name is not None and processed is None
                infos.append(self._info(member, fields, score, pending))
        return infos

    def _info(
        self, schedule_id: str, fields: Mapping[str, str], score: int, pending: bool
    ) -> ScheduleInfo:
        rule = rule_of(fields)
        opts = json_object(fields.get("opts"))
        made = as_int(fields.get("ic"))
        return ScheduleInfo(
            id=schedule_id,
            name=fields.get("name", ""),
            data=decode_lenient(fields.get("data", "{}")),
            queue=self.queue,
            cron=rule.cron if rule else None,
            every_s=rule.every_ms / 1000 if rule and rule.every_ms else None,
            tz=fields.get("tz") or None,
            next_run_at=ms_to_datetime(score) if pending else None,
            runs=max(0, made - 1 if pending else made),
            limit=rule.limit if rule else None,
            start_at=ms_to_datetime(rule.start_ms) if rule else None,
            end_at=ms_to_datetime(rule.end_ms) if rule else None,
            priority=as_int(opts.get("priority")),
            attempts=max_attempts(opts),
            backoff=lenient_backoff(opts.get("backoff")),
        )

    # -- keeping schedules going -----------------------------------------------------------

    def advance_call(self, job_id: str, raw: Mapping[str, str], now: int) -> ScriptCall | None:
        """The ``updateJobScheduler`` call Node's worker makes for a job it just took, or
        ``None``: not a scheduler's job, or its scheduler is done (limit, end date)."""
        scheduler_id = raw.get("rjk")
        if not scheduler_id:
            return None
        if is_legacy_repeat_key(scheduler_id):
            if scheduler_id not in _legacy_warned:
                _legacy_warned.add(scheduler_id)
                logger.warning(
                    "job %s comes from a legacy BullMQ repeatable job (%s), which corral does "
                    "not keep going; migrate it to a job scheduler",
                    job_id,
                    scheduler_id,
                )
            return None
        opts = json_object(raw.get("opts"))
        repeat = opts.get("repeat")
        rule = rule_of(repeat) if isinstance(repeat, dict) else None
        if rule is None:
            logger.warning(
                "job %s of scheduler %r has no repeat options; its next run is not written",
                job_id,
                scheduler_id,
            )
            return None
        assert isinstance(repeat, dict)
        count = as_int(repeat.get("count"))
        slot = slot_of(job_id, scheduler_id)
        if rule.cron is not None:
            prev_ms = as_int(opts.get("prevMillis")) or slot or now
        else:
            prev_ms = slot if slot is not None else now
        next_ms = rule.next_ms(prev_ms, count, now)
        if next_ms is None:
            return None
        cron_next = next_ms if rule.cron is not None else None
        return self.protocol.update_job_scheduler(
            self.queue,
            scheduler_id,
            next_ms=next_ms if cron_next is not None else now,
            data_json=raw.get("data") or "{}",
            next_job=next_job_opts(opts, count + 1, scheduler_id, cron_next, now),
            now=now,
            producer_id=job_id,
        )

    async def advance(self, taken: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        """Write the next jobs of the schedulers whose jobs were just taken. A failure is
        logged and the jobs still run (Node's worker would leave them unprocessed)."""
        now = now_ms()
        calls = [call for job_id, raw in taken if (call := self.advance_call(job_id, raw, now))]
        if not calls:
            return
        try:
            with self.store.errors("writing the next job of a schedule"):
                replies = await self.store.run_many(calls)
        except CorralError as exc:
            replies = [exc] * len(calls)
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, BaseException):
                logger.error(
                    "schedule %r: its next job was not written (%s); it stops until it is "
                    "written again (service.schedule or a worker's restart for @periodic)",
                    call.args[1],
                    reply,
                )

    @staticmethod
    def refused_removal(job_id: str, code: int) -> ScheduleConflictError | None:
        """removeJob's refusal of a scheduler's current job, as corral's error."""
        if code != JOB_OF_SCHEDULER:
            return None
        return ScheduleConflictError(
            f"job {job_id} is the pending job of a schedule; remove the schedule instead"
        )


def scheduler_fields(name: str, rule: ScheduleRule) -> dict[str, Any]:
    """addJobScheduler's scheduler options: what its hash ``repeat:<id>`` keeps. Integers stay
    integers: the script compares a stored ``every`` with ``tonumber``, and a float would also
    put ``.0`` into job ids."""
    fields: dict[str, Any] = {"name": name}
    for key, value in (
        ("tz", rule.tz),
        ("pattern", rule.cron),
        ("every", rule.every_ms),
        ("limit", rule.limit),
        ("startDate", rule.start_ms),
        ("endDate", rule.end_ms),
    ):
        if value is not None:
            fields[key] = value
    return fields


def first_job_opts(
    template: Mapping[str, Any], rule: ScheduleRule, scheduler_id: str, next_ms: int, now: int
) -> dict[str, Any]:
    """The first job's ``opts``, as Node's ``getNextJobOpts`` makes them. Its ``repeat`` is
    complete: Node's worker computes the next run from it, and jams on a job without it."""
    repeat = {key: value for key, value in scheduler_fields("", rule).items() if key != "name"}
    opts = {
        **template,
        "repeat": {**repeat, "count": 1},
        "jobId": f"repeat:{scheduler_id}:{next_ms}",
    }
    opts.update(delay=max(0, next_ms - now), timestamp=now, repeatJobKey=scheduler_id)
    if rule.cron is not None:
        opts["prevMillis"] = next_ms
    return opts


def next_job_opts(
    opts: Mapping[str, Any], count: int, scheduler_id: str, next_ms: int | None, now: int
) -> dict[str, Any]:
    """The next job's ``opts``: the current job's (unknown keys kept as they are), with its
    ``repeat.count`` one higher, as Node's worker makes them. ``next_ms`` is ``None`` for an
    interval, whose next slot the script computes."""
    repeat = {key: value for key, value in dict(opts.get("repeat") or {}).items()}
    repeat.pop("immediately", None)
    repeat["count"] = count
    following = {**opts, "repeat": repeat, "timestamp": now, "repeatJobKey": scheduler_id}
    if next_ms is not None:
        following.update(
            jobId=f"repeat:{scheduler_id}:{next_ms}",
            delay=max(0, next_ms - now),
            prevMillis=next_ms,
        )
    return following


def rule_of(repeat: Mapping[str, Any]) -> ScheduleRule | None:
    """The rule in a scheduler job's ``opts.repeat`` (or a scheduler hash), if it has one."""
    pattern = repeat.get("pattern")
    every = as_int(repeat.get("every")) or None
    if not (isinstance(pattern, str) and pattern) and every is None:
        return None
    tz = repeat.get("tz")
    return ScheduleRule(
        cron=pattern if isinstance(pattern, str) and pattern else None,
        every_ms=None if isinstance(pattern, str) and pattern else every,
        tz=tz if isinstance(tz, str) and tz else None,
        limit=as_int(repeat.get("limit")) or None,
        start_ms=as_int(repeat.get("startDate")) or None,
        end_ms=as_int(repeat.get("endDate")) or None,
    )


def is_legacy_repeat_key(key: str) -> bool:
    """Node's ``hasLegacyRepeatableKeyShape``: ``name:id:endDate:tz:<cron or every>`` keys of
    BullMQ's repeatable jobs before job schedulers, which corral does not advance."""
    parts = key.split(":", 4)
    if len(parts) < 5 or not parts[4]:
        return False
    if parts[2] and not parts[2].isdigit():
        return False
    return " " in parts[4] or parts[4].isdigit()
