"""What a job may be: the checks every enqueue passes before anything is written.

One place, above the backends, so SQLite and BullMQ accept and refuse exactly the same jobs.
"""

from __future__ import annotations

import math
from typing import Any

from corral.errors import ConfigError, PayloadError
from corral.message import NewJob
from corral.payload import encode_payload
from corral.retry import MAX_DELAY_MS, Retry

PRIORITY_LIMIT = 2**21 - 1  # BullMQ's limit, so a job is valid on either backend
MAX_NAME_LENGTH = 200
MAX_JOB_ID_LENGTH = 256
MAX_ATTEMPTS = 1_000_000  # as QUEUE_ATTEMPTS; counters must fit SQLite's integers
MAX_DELAY_S = MAX_DELAY_MS / 1000


def new_job(
    name: str,
    data: Any,
    *,
    delay_s: float,
    priority: int,
    attempts: int,
    backoff: Retry,
    job_id: str | None,
    queue: str | None,
    max_payload_bytes: int,
    safe_integers: bool,
) -> NewJob:
    """Validate a job and encode its payload; raise PayloadError before anything is written."""
    check_name(name, error=PayloadError)
    # Fast paths first: the defaults (0) are by far the most common values.
    if (delay_s != 0 or type(delay_s) is not int) and (
        isinstance(delay_s, bool)
        or not isinstance(delay_s, int | float)
        or not (math.isfinite(delay_s) and 0 <= delay_s <= MAX_DELAY_S)
    ):
        raise PayloadError(
            f"delay_s must be a finite number from 0 to {MAX_DELAY_S:.0f} (a year), got {delay_s!r}"
        )
    if type(priority) is not int or not (0 <= priority <= PRIORITY_LIMIT):
        raise PayloadError(
            f"priority must be a whole number from 0 (first) to {PRIORITY_LIMIT}, got {priority!r}"
        )
    check_attempts(attempts, error=PayloadError)
    if not isinstance(backoff, Retry):
        raise PayloadError(f"backoff must be a Retry (Retry.fixed/exponential), got {backoff!r}")
    if job_id is not None:
        check_job_id(job_id)
    data_json = encode_payload(data, max_bytes=max_payload_bytes, safe_integers=safe_integers)
    return NewJob(
        name=name,
        data_json=data_json,
        job_id=job_id,
        delay_ms=round(delay_s * 1000),
        priority=priority,
        attempts=attempts,
        backoff=backoff,
        queue=queue,
    )


def check_name(name: Any, *, error: type[Exception] = ConfigError) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise error(
            f"job name must be a non-empty string of at most {MAX_NAME_LENGTH} "
            f"characters, got {name!r}"
        )


def check_attempts(attempts: Any, *, error: type[Exception] = ConfigError) -> None:
    if type(attempts) is int and 1 <= attempts <= MAX_ATTEMPTS:
        return  # the common case, without the isinstance chain
    if (
        isinstance(attempts, bool)
        or not isinstance(attempts, int)
        or not 1 <= attempts <= MAX_ATTEMPTS
    ):
        raise error(f"attempts must be a whole number >= 1 and <= {MAX_ATTEMPTS}, got {attempts!r}")


def check_job_id(job_id: Any) -> None:
    # The rules of Node BullMQ's Job.validateOptions, applied on both backends alike.
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
        raise PayloadError(
            f"job_id must be a non-empty string of at most {MAX_JOB_ID_LENGTH} "
            f"characters, got {job_id!r}"
        )
    if ":" in job_id:
        raise PayloadError(f"job_id may not contain ':' (BullMQ's key separator): {job_id!r}")
    try:
        is_integer = job_id.isascii() and str(int(job_id)) == job_id
    except ValueError:
        is_integer = False
    if is_integer:
        raise PayloadError(
            f"job_id may not be an integer ({job_id!r}); integers are the ids "
            "the queue assigns itself. Use e.g. 'order-42'"
        )
    if any(ch.isspace() or ord(ch) < 32 for ch in job_id):
        raise PayloadError(f"job_id may not contain spaces or control characters: {job_id!r}")
    if not job_id.isascii():
        try:
            job_id.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError(
                f"job_id is not valid Unicode (a lone surrogate): {job_id!r}"
            ) from None
