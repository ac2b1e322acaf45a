"""BullMQ's protocol: key names, Lua scripts, their KEYS/ARGV, and what their replies mean.

The one module that touches the ``bullmq`` package's internals (its Lua scripts and key table) and
packs its arguments, so a ``bullmq`` upgrade changes this file only; ``tests/test_protocol.py``
checks every call built here against the scripts' declared key counts and the package's own
argument builders. Nothing here does I/O: a call is a :class:`ScriptCall` that
:mod:`corral.backends.bullmq.connection` sends.

Redis layout for prefix ``bull`` and queue ``q`` (all BullMQ's): the job hash ``bull:q:<id>``
(``name``, ``data``, ``opts``, ``timestamp``, ``atm`` = attempts made, ``returnvalue``,
``failedReason``, ``stacktrace``, ...), its ``:lock`` and ``:logs``, the lists ``wait``,
``active`` and (legacy) ``paused``, the sorted sets ``prioritized``, ``delayed``, ``completed``,
``failed``, ``marker`` (wakes blocked workers), the ``meta`` hash (``paused``, ``version``, global
rate limit) and the ``events`` stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

import bullmq
import msgpack  # type: ignore[import-untyped]
from bullmq.queue_keys import QueueKeys
from bullmq.redis_connection import SCRIPT_DEFINITIONS, loadScript

from corral.dedup import Deduplication
from corral.message import ChildPolicy, JobState, NewJob
from corral.payload import decode_lenient
from corral.retry import Retry

LIB_VERSION = f"bullmq:{bullmq.__version__}"
"""What corral records in the queue's ``meta`` hash (``version``), in the ``<lib>:<version>`` form
Node's ``Queue`` writes: the package whose scripts write corral's jobs."""

# The package's scripts, and those it ships without registering them.
SCRIPT_FILES: dict[str, str] = {
    **SCRIPT_DEFINITIONS,
    "moveJobFromActiveToWait": "moveJobFromActiveToWait-9.lua",
    "addLog": "addLog-2.lua",
}

DELAY_SCORE_FACTOR = 0x1000
"""Delayed-set scores are ``timestamp_ms * 0x1000 + counter``."""

FINISH_ERRORS = {
    -1: "the job no longer exists",
    -2: "its lock expired",
    -3: "it is no longer active",
    -6: "another worker holds its lock",
}
"""What the negative codes of moveToFinished, retryJob, moveToDelayed and moveJobFromActiveToWait
mean for a worker settling a job."""

STATES = {
    "waiting": JobState.WAITING,
    "prioritized": JobState.WAITING,
    "waiting-children": JobState.WAITING_CHILDREN,
    "delayed": JobState.DELAYED,
    "active": JobState.ACTIVE,
    "completed": JobState.COMPLETED,
    "failed": JobState.FAILED,
}
"""BullMQ's state names (getStateV2) as corral's."""

DEPENDENCY_SETS = ("dependencies", "processed", "failed", "unsuccessful")

COUNT_TYPES = (
    "wait",
    "paused",
    "prioritized",
    "waiting-children",
    "delayed",
    "active",
    "completed",
    "failed",
)
CLEAN_SETS = (
    "wait",
    "paused",
    "prioritized",
    "delayed",
    "completed",
    "failed",
    "waiting-children",
)
ADD_SCRIPTS = ("addStandardJob", "addDelayedJob", "addPrioritizedJob", "addParentJob")

POLICY_FLAGS = {
    ChildPolicy.FAIL: "fpof",
    ChildPolicy.CONTINUE: "cpof",
    ChildPolicy.IGNORE: "idof",
    ChildPolicy.REMOVE: "rdof",
}
"""A child's failure policy as the short option names of its ``opts`` and ``parent`` field
(``failParentOnFailure``, ``continueParentOnFailure``, ``ignoreDependencyOnFailure``,
``removeDependencyOnFailure``)."""

FLOW_ERRORS = {
    -5: "its parent job does not exist",
    -7: "a job with its id already belongs to another parent",
}
"""What the negative codes of the add scripts mean for a flow's child."""


@dataclass(frozen=True, slots=True)
class ParentLink:
    """A child's parent, as the add scripts take it."""

    queue: str
    job_id: str
    policy: ChildPolicy | None


class ScriptCall(NamedTuple):
    """One script invocation: the script's name, its KEYS and its ARGV."""

    script: str
    keys: list[str]
    args: list[Any]


@cache
def script_source(name: str) -> str:
    """The Lua text of the script ``name``."""
    source: str = loadScript(SCRIPT_FILES[name])
    return source


def declared_key_count(name: str) -> int:
    """How many KEYS the script ``name`` takes (the ``-N`` of its file name)."""
    match = re.search(r"-(\d+)\.lua$", SCRIPT_FILES[name])
    assert match is not None
    return int(match.group(1))


@cache  # a handful of constant lists, split once rather than on every call
def _names(text: str) -> tuple[str, ...]:
    """Key names of a script's KEYS, in its order, from a space-separated list."""
    return tuple(text.split())


def pack(value: Any) -> bytes:
    """An argument the scripts unpack with ``cmsgpack.unpack``."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def flat_fields(fields: Mapping[str, str]) -> bytes:
    """Fields to set on a job hash, as the ``fieldsToUpdate`` argument: a packed flat array."""
    flat: list[str] = []
    for key, value in fields.items():
        flat += (key, value)
    return pack(flat)


@dataclass(frozen=True, slots=True)
class NextJob:
    """What moveToActive (and a fetch-next moveToFinished) returned."""

    raw: dict[str, str] | None
    """The job's hash, if a job was leased."""
    job_id: str | None
    limit_ms: int
    """> 0: the rate limiter is saturated for this long."""
    delay_until_ms: int
    """> 0: no job is ready; the next delayed one is due then."""


def parse_next_job(reply: Any) -> NextJob:
    """Read moveToActive's reply: ``[job fields, job id, rate-limit ms, next delay ms]``."""
    if not isinstance(reply, list) or not reply:
        return NextJob(None, None, 0, 0)
    fields = reply[0]
    raw = (
        {str(fields[i]): fields[i + 1] for i in range(0, len(fields) - 1, 2)}
        if isinstance(fields, list) and fields
        else None
    )
    job_id = reply[1] if len(reply) > 1 and reply[1] else None
    limit_ms = _int(reply[2]) if len(reply) > 2 else 0
    delay_until = _int(reply[3]) if len(reply) > 3 else 0
    return NextJob(raw, str(job_id) if job_id is not None else None, limit_ms, delay_until)


class Keys:
    """The key names of the queues under one prefix (BullMQ's ``QueueKeys``), computed once."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._table = QueueKeys(prefix)
        self._queues: dict[str, dict[str, str]] = {}

    def of(self, queue: str) -> dict[str, str]:
        """Every key of ``queue``; ``""`` is the job key prefix ``<prefix>:<queue>:``."""
        keys = self._queues.get(queue)
        if keys is None:
            keys = self._queues[queue] = self._table.getKeys(queue)
        return keys

    def job(self, queue: str, job_id: str) -> str:
        return self.of(queue)[""] + job_id

    def qualified(self, queue: str) -> str:
        """``<prefix>:<queue>``: Node's ``queue.qualifiedName``, a child's ``parent.queueKey``."""
        return self.of(queue)[""][:-1]

    def split_job_key(self, key: str) -> tuple[str, str]:
        """``(queue, id)`` of a job key ``<prefix>:<queue>:<id>``, as Node's ``parseNodeKey``
        (the last two colons) when the key is not under this prefix."""
        head = self.prefix + ":"
        if key.startswith(head):
            queue, _, job_id = key[len(head) :].rpartition(":")
            if queue:
                return queue, job_id
        parts = key.rsplit(":", 2)
        if len(parts) == 3:
            return parts[1], parts[2]
        return "", key


class Protocol:
    """The script calls of the queues under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.keys = Keys(prefix)

    # -- producing -------------------------------------------------------------------------

    def add_job(
        self,
        queue: str,
        job: NewJob,
        opts: Mapping[str, Any],
        timestamp: int,
        *,
        job_id: str | None = None,
        parent: ParentLink | None = None,
        waiting_children: bool = False,
    ) -> ScriptCall:
        """The add script for ``job``, chosen as Node's ``Job.addJob`` chooses: ``addParentJob``
        for a job with children (``waiting_children``), whatever its delay or priority.

        ``job_id`` overrides ``job.job_id`` (a flow's ids are chosen before it is written).
        ``parent`` makes the job a child: the scripts store the ``parentKey`` and ``parent``
        fields (``{id, queueKey}`` and the policy flag) and add it to the parent's dependencies.
        The add scripts return the existing id for a duplicate ``jobId`` and leave that job as
        it is (attaching it to ``parent`` if it has none), so duplicates need no extra check.
        """
        k = self.keys.of(queue)
        parent_key: str | None = None
        dependencies_key: str | None = None
        parent_field: dict[str, Any] | None = None
        if parent is not None:
            parent_key = self.keys.job(parent.queue, parent.job_id)
            dependencies_key = parent_key + ":dependencies"
            # Node's Job: {id, queueKey} plus the policy flag (opts.parent is {id, queue}).
            parent_field = {"id": parent.job_id, "queueKey": self.keys.qualified(parent.queue)}
            if parent.policy is not None:
                parent_field[POLICY_FLAGS[parent.policy]] = True
        packed_args = pack(
            # prefix, custom id, name, timestamp, parent key, parent dependencies key, parent,
            # repeat job key, deduplication key: the argument array of the add scripts.
            [
                k[""],
                job_id or job.job_id or "",
                job.name,
                timestamp,
                parent_key,
                dependencies_key,
                parent_field,
                None,
                k[""] + "de:" + job.deduplication.id if job.deduplication else None,
            ]
        )
        argv = [packed_args, job.data_json, pack(dict(opts))]
        if waiting_children:
            names = _names("meta id delayed waiting-children completed events")
            return ScriptCall("addParentJob", [k[n] for n in names], argv)
        if job.delay_ms > 0:
            names = _names("marker meta id delayed completed events")
            return ScriptCall("addDelayedJob", [k[n] for n in names], argv)
        if job.priority:
            names = _names("marker meta id prioritized delayed completed active events pc")
            return ScriptCall("addPrioritizedJob", [k[n] for n in names], argv)
        names = _names("wait paused meta id completed delayed active events marker")
        return ScriptCall("addStandardJob", [k[n] for n in names], argv)

    def child_opts(self, opts: Mapping[str, Any], parent: ParentLink) -> dict[str, Any]:
        """A child's ``opts`` as Node's ``FlowProducer`` writes them: ``parent: {id, queue}``
        (how Bull Board finds a flow's root) and the failure policy's short name."""
        child = dict(opts)
        child["parent"] = {"id": parent.job_id, "queue": self.keys.qualified(parent.queue)}
        if parent.policy is not None:
            child[POLICY_FLAGS[parent.policy]] = True
        return child

    @staticmethod
    def job_opts(
        job: NewJob, *, keep_completed: int | None, keep_failed: int | None
    ) -> dict[str, Any]:
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
        if keep_completed is not None:
            opts["removeOnComplete"] = keep_completed
        if keep_failed is not None:
            opts["removeOnFail"] = keep_failed
        if job.deduplication is not None:
            opts["de"] = dedup_opts(job.deduplication)
        if job.trace_context is not None:
            opts["tm"] = job.trace_context  # Node's telemetry.metadata
        return opts

    # -- consuming -------------------------------------------------------------------------

    def move_to_active(
        self, queue: str, token: str, now: int, lock_ms: int, limiter: Mapping[str, int] | None
    ) -> ScriptCall:
        k = self.keys.of(queue)
        names = _names(
            "wait active prioritized events stalled limiter delayed paused meta pc marker"
        )
        opts = pack({"token": token, "lockDuration": lock_ms, "limiter": limiter})
        return ScriptCall("moveToActive", [k[n] for n in names], [k[""], now, opts])

    def move_to_finished(
        self,
        queue: str,
        job_id: str,
        token: str,
        *,
        target: str,
        value: str,
        now: int,
        job_opts: Mapping[str, Any],
        keep: Mapping[str, Any],
        limiter: Mapping[str, int] | None,
        lock_ms: int,
        fetch_next: bool,
        fields: Mapping[str, str] | None = None,
        metrics_points: int = 0,
    ) -> ScriptCall:
        """moveToFinished with the arguments Node's worker passes; ``target`` is ``completed``
        or ``failed``, ``value`` the return value's JSON or the failure reason.
        ``metrics_points`` > 0 counts the job in the ``metrics:<target>`` keys, keeping that
        many minute points (Node's worker option ``metrics: {maxDataPoints}``)."""
        k = self.keys.of(queue)
        names = _names("wait active prioritized events stalled limiter delayed paused meta pc")
        keys = [k[n] for n in names]
        keys += [k[target], k[""] + job_id, k[""] + "metrics:" + target, k["marker"]]
        packed_opts = pack(
            {
                "token": token,
                "keepJobs": dict(keep),
                "limiter": limiter,
                "lockDuration": lock_ms,
                "attempts": _int(job_opts.get("attempts")),
                "maxMetricsSize": metrics_points or "",
                "fpof": bool(job_opts.get("fpof")),
                "cpof": bool(job_opts.get("cpof")),
                "idof": bool(job_opts.get("idof")),
                "rdof": bool(job_opts.get("rdof")),
            }
        )
        prop = "returnvalue" if target == "completed" else "failedReason"
        args: list[Any] = [
            job_id,
            now,
            prop,
            value,
            target,
            "1" if fetch_next else "0",
            k[""],
            packed_opts,
        ]
        if fields:
            args.append(flat_fields(fields))
        return ScriptCall("moveToFinished", keys, args)

    def metrics_keys(self, queue: str, target: str) -> tuple[str, str]:
        """The hash (``count``, ``prevTS``, ``prevCount``) and the list of minute points
        (newest first) of ``target`` (``completed`` or ``failed``), as Queue.getMetrics reads."""
        key = self.keys.of(queue)[""] + "metrics:" + target
        return key, key + ":data"

    def move_to_delayed(
        self,
        queue: str,
        job_id: str,
        token: str,
        *,
        now: int,
        delay_ms: int,
        fields: Mapping[str, str],
    ) -> ScriptCall:
        """A failed attempt's job, delayed by exactly ``delay_ms`` (its attempt counted)."""
        k = self.keys.of(queue)
        names = _names("marker active prioritized delayed")
        keys = [k[n] for n in names] + [k[""] + job_id]
        keys += [k[n] for n in ("events", "meta", "stalled", "wait", "limiter", "pc")]
        args = [k[""], str(now), job_id, token, delay_ms, "0", flat_fields(fields), "0"]
        return ScriptCall("moveToDelayed", keys, args)

    def retry_job(
        self,
        queue: str,
        job_id: str,
        token: str,
        *,
        now: int,
        lifo: bool,
        fields: Mapping[str, str],
    ) -> ScriptCall:
        """A failed attempt's job, back to waiting at once (its attempt counted)."""
        k = self.keys.of(queue)
        keys = [k[n] for n in ("active", "wait", "paused")] + [k[""] + job_id]
        keys += [k[n] for n in ("meta", "events", "delayed", "prioritized", "pc", "marker")]
        keys.append(k["stalled"])
        args = [k[""], now, "RPUSH" if lifo else "LPUSH", job_id, token, flat_fields(fields)]
        return ScriptCall("retryJob", keys, args)

    def release(self, queue: str, job_id: str, token: str) -> ScriptCall:
        """An active job back to waiting without using an attempt (a worker shutting down)."""
        k = self.keys.of(queue)
        names = _names("active wait stalled paused meta limiter prioritized marker events")
        return ScriptCall(
            "moveJobFromActiveToWait", [k[n] for n in names], [job_id, token, k[""] + job_id]
        )

    def extend_locks(
        self, queue: str, job_ids: Sequence[str], tokens: Sequence[str], lock_ms: int
    ) -> ScriptCall:
        """Renew many locks at once; the reply lists the ids whose lock was not renewed."""
        k = self.keys.of(queue)
        return ScriptCall(
            "extendLocks", [k["stalled"]], [k[""], pack(list(tokens)), pack(list(job_ids)), lock_ms]
        )

    def move_stalled(self, queue: str, max_stalls: int, lock_ms: int, now: int) -> ScriptCall:
        """Requeue (or fail, past ``max_stalls``) jobs whose lock expired; reply: their ids."""
        k = self.keys.of(queue)
        names = _names("stalled wait active stalled-check meta paused marker events repeat")
        return ScriptCall(
            "moveStalledJobsToWait", [k[n] for n in names], [max_stalls, k[""], now, lock_ms]
        )

    def update_progress(self, queue: str, job_id: str, progress_json: str) -> ScriptCall:
        k = self.keys.of(queue)
        return ScriptCall(
            "updateProgress", [k[""] + job_id, k["events"], k["meta"]], [job_id, progress_json]
        )

    def add_log(self, queue: str, job_id: str, text: str, keep_logs: int | None) -> ScriptCall:
        key = self.keys.job(queue, job_id)
        return ScriptCall("addLog", [key, key + ":logs"], [job_id, text, keep_logs or ""])

    # -- managing --------------------------------------------------------------------------

    def get_state(self, queue: str, job_id: str) -> ScriptCall:
        k = self.keys.of(queue)
        names = _names("completed failed delayed active wait paused waiting-children prioritized")
        return ScriptCall("getStateV2", [k[n] for n in names], [job_id])

    def get_counts(self, queue: str) -> ScriptCall:
        """Counts of :data:`COUNT_TYPES`, in that order."""
        return ScriptCall("getCounts", [self.keys.of(queue)[""]], list(COUNT_TYPES))

    def reprocess_failed(self, queue: str, job_id: str) -> ScriptCall:
        """Node's ``Job.retry('failed', {resetAttemptsMade: true})``: back to waiting (or
        prioritized) with attempts made reset; ``attemptsStarted`` is kept."""
        k = self.keys.of(queue)
        names = _names("events failed wait meta active marker prioritized pc")
        keys = [k[""] + job_id] + [k[n] for n in names]
        return ScriptCall(
            "reprocessJob", keys, [job_id, "LPUSH", "failedReason", "failed", "1", "0"]
        )

    def remove_job(self, queue: str, job_id: str) -> ScriptCall:
        """Reply: 1 removed, 0 the job is locked (active)."""
        k = self.keys.of(queue)
        return ScriptCall("removeJob", [k[""] + job_id, k["repeat"]], [job_id, 0, k[""]])

    def promote(self, queue: str, job_id: str) -> ScriptCall:
        """A delayed job to waiting now; reply 0, or -3 if it is not delayed."""
        k = self.keys.of(queue)
        names = _names("delayed wait paused meta prioritized active pc events marker")
        return ScriptCall("promote", [k[n] for n in names], [k[""], job_id])

    def dependency_keys(self, queue: str, job_id: str) -> dict[str, str]:
        """A parent's view of its children: ``dependencies`` (a set of pending child keys),
        ``processed`` (child key -> result JSON), ``failed`` (child key -> reason: failures
        ignored by ``idof``/``cpof``) and ``unsuccessful`` (a sorted set: ``fpof`` failures)."""
        key = self.keys.job(queue, job_id)
        return {name: f"{key}:{name}" for name in DEPENDENCY_SETS}

    def pause(self, queue: str, paused: bool) -> ScriptCall:
        k = self.keys.of(queue)
        source, target = ("wait", "paused") if paused else ("paused", "wait")
        names = (source, target, "meta", "prioritized", "events", "delayed", "marker")
        return ScriptCall("pause", [k[n] for n in names], ["paused" if paused else "resumed"])

    def clean_set(self, queue: str, name: str, cutoff_ms: int) -> ScriptCall:
        """Remove every job of the set ``name`` stamped before ``cutoff_ms``; reply: their ids."""
        k = self.keys.of(queue)
        return ScriptCall(
            "cleanJobsInSet", [k[name], k["events"], k["repeat"]], [k[""], cutoff_ms, 0, name]
        )

    # -- job schedulers --------------------------------------------------------------------

    def add_job_scheduler(
        self,
        queue: str,
        scheduler_id: str,
        *,
        next_ms: int,
        scheduler: Mapping[str, Any],
        data_json: str,
        template: Mapping[str, Any],
        first_job: Mapping[str, Any],
        now: int,
    ) -> ScriptCall:
        """Node's ``upsertJobScheduler`` (override): the scheduler hash and its first job.
        Reply ``[job id, delay]``, or :data:`SCHEDULER_ERRORS`."""
        k = self.keys.of(queue)
        names = _names("repeat delayed wait paused meta prioritized marker id events pc active")
        args = [next_ms, pack(dict(scheduler)), scheduler_id, data_json, pack(dict(template))]
        args += [pack(dict(first_job)), now, k[""], ""]
        return ScriptCall("addJobScheduler", [k[n] for n in names], args)

    def update_job_scheduler(
        self,
        queue: str,
        scheduler_id: str,
        *,
        next_ms: int,
        data_json: str,
        next_job: Mapping[str, Any],
        now: int,
        producer_id: str,
    ) -> ScriptCall:
        """What Node's worker runs when a scheduler's job becomes active: the next job, if
        ``producer_id`` is the scheduler's current job. Reply: its id, or nil."""
        k = self.keys.of(queue)
        names = _names("repeat delayed wait paused meta prioritized marker id events pc")
        keys = [k[n] for n in names] + [k[""] + producer_id, k["active"]]
        args = [next_ms, scheduler_id, data_json, pack(dict(next_job)), now, k[""], producer_id]
        return ScriptCall("updateJobScheduler", keys, args)

    def remove_job_scheduler(self, queue: str, scheduler_id: str) -> ScriptCall:
        """Delete a scheduler and its next job if delayed; reply 0, or 1 if there was none."""
        k = self.keys.of(queue)
        keys = [k["repeat"], k["delayed"], k["events"]]
        return ScriptCall("removeJobScheduler", keys, [scheduler_id, k[""]])


# -- job schedulers ----------------------------------------------------------------------------

SCHEDULER_ERRORS = {
    -10: "its slot already has a job (running or finished)",
    -11: "the next 32 slots already have jobs",
}
"""What addJobScheduler's negative replies mean."""

JOB_OF_SCHEDULER = -8
"""removeJob's reply for the current job of a scheduler."""


# -- moving jobs between queues ----------------------------------------------------------------
#
# BullMQ has no script that writes a job in a given state with its attempts and error, so a moved
# job is added by the package's own add scripts (waiting, prioritized, delayed: they keep markers,
# counters and paused queues right) and its history set on its hash in the same MULTI; a failed
# job is written as moveToFinished leaves one (its hash, and its id in the ``failed`` set scored by
# ``finishedOn``). The small scripts below are corral's own and only read, or raise a counter.

READ_JOBS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local v = redis.call('HMGET', key, 'name', 'data')
    out[i] = {1, v[1] or '', v[2] or ''}
  else
    out[i] = {0, '', ''}
  end
end
return out
"""
"""For each job key: ``[exists, name, data]``."""

EXPORT_JOBS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = {redis.call('HGETALL', key), redis.call('LRANGE', key .. ':logs', 0, -1)}
end
return out
"""
"""For each job key: ``[flat hash fields, log lines]`` (one round trip for a batch)."""

IN_STATE_LUA = """
local out = {}
local n = 0
for i = 2, #ARGV, 2 do
  local id, state = ARGV[i], ARGV[i + 1]
  local there = 0
  if redis.call('EXISTS', ARGV[1] .. id .. ':lock') == 0 then
    if state == 'waiting' then
      if redis.call('ZSCORE', KEYS[3], id) or redis.call('LPOS', KEYS[1], id, 'RANK', -1)
          or redis.call('LPOS', KEYS[2], id, 'RANK', -1) then
        there = 1
      end
    elseif state == 'delayed' then
      if redis.call('ZSCORE', KEYS[4], id) then there = 1 end
    elseif state == 'failed' then
      if redis.call('ZSCORE', KEYS[5], id) then there = 1 end
    end
  end
  n = n + 1
  out[n] = there
end
return out
"""
"""KEYS: wait, paused, prioritized, delayed, failed; ARGV: the job key prefix, then pairs of job
id and corral state. For each pair 1 if the job is unlocked and in that state, else 0. A moved
job is searched from the tail of the wait list, where the oldest (the first exported) are."""

RAISE_ID_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return current
"""
"""Raise the queue's ``id`` counter to at least ARGV[1]: the add scripts do not check that a
generated id is free, so a moved job keeping a queue-assigned number must stay below it."""

MOVABLE_SETS = ("wait", "paused", "prioritized", "delayed", "failed")


def history_fields(
    *,
    attempts_made: int,
    error: str | None,
    tracebacks: Sequence[str],
    progress_json: str | None,
) -> dict[str, str]:
    """The fields a job's past attempts leave on its hash (set on a moved job after its add)."""
    fields: dict[str, str] = {}
    if attempts_made:
        fields["atm"] = str(attempts_made)
        fields["ats"] = str(attempts_made)
    if error is not None:
        fields["failedReason"] = error
    if tracebacks:
        fields["stacktrace"] = json.dumps(list(tracebacks), ensure_ascii=False)
    if progress_json is not None:
        fields["progress"] = progress_json
    return fields


def failed_job_fields(
    *,
    name: str,
    data_json: str,
    opts: Mapping[str, Any],
    timestamp: int,
    priority: int,
    finished_at: int,
) -> dict[str, str]:
    """The hash of a failed job as moveToFinished leaves it (without its history fields)."""
    return {
        "name": name,
        "data": data_json,
        "opts": json.dumps(dict(opts), separators=(",", ":")),
        "timestamp": str(timestamp),
        "delay": "0",
        "priority": str(priority),
        "processedOn": str(finished_at),
        "finishedOn": str(finished_at),
    }


def is_generated_id(job_id: str) -> bool:
    """Whether ``job_id`` is one the queue assigns itself (a decimal integer)."""
    return job_id.isascii() and job_id.isdigit() and str(int(job_id)) == job_id


# -- reading jobs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What a job's ``opts`` JSON says to the worker, parsed once per distinct text."""

    opts: dict[str, Any]  # shared between jobs: read, never changed
    is_object: bool
    max_attempts: int
    backoff: Retry | None
    keep_logs: int | None


_job_options_cache: dict[str | None, JobOptions] = {}
_JOB_OPTIONS_CACHE_SIZE = 256  # distinct opts texts kept; jobs of one producer mostly share one


def dedup_opts(dedup: Deduplication) -> dict[str, Any]:
    """``opts.de`` as Node's ``deduplication`` option encodes: only the options given."""
    opts: dict[str, Any] = {"id": dedup.id}
    if dedup.ttl_ms is not None:
        opts["ttl"] = dedup.ttl_ms
    if dedup.extend:
        opts["extend"] = True
    if dedup.replace:
        opts["replace"] = True
    return opts


def job_options(text: str | None) -> JobOptions:
    cached = _job_options_cache.get(text)
    if cached is not None:
        return cached
    value = decode_lenient(text)
    opts = value if isinstance(value, dict) else {}
    keep_logs = opts.get("kl", opts.get("keepLogs"))
    parsed = JobOptions(
        opts=opts,
        is_object=text is None or isinstance(value, dict),
        max_attempts=max_attempts(opts),
        backoff=lenient_backoff(opts.get("backoff")),
        keep_logs=keep_logs if isinstance(keep_logs, int) else None,
    )
    if len(_job_options_cache) >= _JOB_OPTIONS_CACHE_SIZE:
        _job_options_cache.clear()
    _job_options_cache[text] = parsed
    return parsed


def max_attempts(opts: Mapping[str, Any]) -> int:
    # Node stores attempts: 0 when none was given, which means a single attempt.
    return max(1, _int(opts.get("attempts")))


def lenient_backoff(value: Any) -> Retry | None:
    try:
        return Retry.from_bullmq(value)
    except (ValueError, TypeError):
        return None


def keep_jobs(option: Any, default: int | None) -> dict[str, Any]:
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


def stacktrace(raw: Mapping[str, str], opts: Mapping[str, Any], trace: str) -> str:
    """The job's stack traces with this attempt's appended, as Node's ``updateStacktrace``."""
    stack = json_list(raw.get("stacktrace"))
    if trace:
        stack.append(trace)
    limit = opts.get("stackTraceLimit")
    if limit == 0:
        stack = []
    elif isinstance(limit, int) and limit > 0:
        stack = stack[-limit:]
    return json.dumps(stack, ensure_ascii=False, separators=(",", ":"))


def json_object(text: str | None) -> dict[str, Any]:
    value = decode_lenient(text)
    return value if isinstance(value, dict) else {}


def json_list(text: str | None) -> list[Any]:
    value = decode_lenient(text)
    return value if isinstance(value, list) else []


def _int(value: Any) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return 0


as_int = _int
