"""The script calls of the queues under one prefix: for each operation, the script Node's BullMQ
runs for it, with the KEYS and ARGV Node's ``Scripts`` would pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from corral.backends.bullmq.protocol.keys import COUNT_TYPES, DEPENDENCY_SETS, Keys
from corral.backends.bullmq.protocol.options import POLICY_FLAGS, ParentLink, dedup_opts
from corral.backends.bullmq.protocol.replies import as_int
from corral.backends.bullmq.protocol.scripts import ScriptCall, flat_fields, pack
from corral.message import NewJob


@cache  # a handful of constant lists, split once rather than on every call
def _names(text: str) -> tuple[str, ...]:
    """Key names of a script's KEYS, in its order, from a space-separated list."""
    return tuple(text.split())


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
                "attempts": as_int(job_opts.get("attempts")),
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
