"""What the scripts reply, and what a job hash's fields hold, read as corral's values: reply codes,
states, the next leased job, and lenient readers of JSON and integer fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.message import JobState
from corral.payload import decode_lenient

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

FLOW_ERRORS = {
    -5: "its parent job does not exist",
    -7: "a job with its id already belongs to another parent",
}
"""What the negative codes of the add scripts mean for a flow's child."""

SCHEDULER_ERRORS = {
    -10: "its slot already has a job (running or finished)",
    -11: "the next 32 slots already have jobs",
}
"""What addJobScheduler's negative replies mean."""

JOB_OF_SCHEDULER = -8
"""removeJob's reply for the current job of a scheduler."""


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
    limit_ms = as_int(reply[2]) if len(reply) > 2 else 0
    delay_until = as_int(reply[3]) if len(reply) > 3 else 0
    return NextJob(raw, str(job_id) if job_id is not None else None, limit_ms, delay_until)


def json_object(text: str | None) -> dict[str, Any]:
    value = decode_lenient(text)
    return value if isinstance(value, dict) else {}


def json_list(text: str | None) -> list[Any]:
    value = decode_lenient(text)
    return value if isinstance(value, list) else []


def as_int(value: Any) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return 0
