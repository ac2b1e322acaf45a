"""A job's ``opts`` as Node's BullMQ writes and reads them: a child's parent link and failure
policy, deduplication, and what the worker reads back (attempts, backoff, kept jobs, logs and
stack traces)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.backends.bullmq.protocol.replies import as_int, json_list
from corral.dedup import Deduplication
from corral.message import ChildPolicy
from corral.payload import decode_lenient
from corral.retry import Retry

POLICY_FLAGS = {
    ChildPolicy.FAIL: "fpof",
    ChildPolicy.CONTINUE: "cpof",
    ChildPolicy.IGNORE: "idof",
    ChildPolicy.REMOVE: "rdof",
}
"""A child's failure policy as the short option names of its ``opts`` and ``parent`` field
(``failParentOnFailure``, ``continueParentOnFailure``, ``ignoreDependencyOnFailure``,
``removeDependencyOnFailure``)."""


@dataclass(frozen=True, slots=True)
class ParentLink:
    """A child's parent, as the add scripts take it."""

    queue: str
    job_id: str
    policy: ChildPolicy | None


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
    return max(1, as_int(opts.get("attempts")))


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
