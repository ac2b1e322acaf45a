"""Cancel requests on BullMQ (see :mod:`corral.cancel`).

BullMQ has no cancel request other processes can write: Node's ``worker.cancelJob()`` aborts a
job of that worker's own process, and its Relay carries whatever topics an application defines.
corral stores the request next to the job, ``<prefix>:<queue>:<id>:cancel`` (the lock token of
the attempt asked to stop, and why, as JSON; it expires on its own), and its workers read it
when they renew their locks. Node workers do not read it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from corral.backends.base import Claim
from corral.backends.bullmq.connection import RedisStore

MIN_KEEP_MS = 60_000


def cancel_key(store: RedisStore, queue: str, job_id: str) -> str:
    return store.protocol.keys.job(queue, job_id) + ":cancel"


async def request_cancel(
    store: RedisStore, queue: str, job_id: str, reason: str, lease_s: float
) -> bool:
    """Ask the worker holding the job's lock to stop this attempt; ``False`` if no worker
    holds it."""
    job_key = store.protocol.keys.job(queue, job_id)
    with store.errors(f"asking the worker of job {job_id} to cancel it"):
        client = store.client()
        token = await client.get(job_key + ":lock")
        if not token:
            return False
        keep_ms = max(MIN_KEEP_MS, round(lease_s * 4000))
        await client.set(
            job_key + ":cancel", json.dumps({"token": _text(token), "reason": reason}), px=keep_ms
        )
    return True


async def cancel_requests(
    store: RedisStore, queue: str, claims: Sequence[Claim[Any]]
) -> dict[Claim[Any], str]:
    """The claims whose attempt was asked to stop, with the reason."""
    if not claims:
        return {}
    with store.errors("reading cancel requests"):
        client = store.client()
        async with client.pipeline(transaction=False) as pipe:
            for claim in claims:
                pipe.get(cancel_key(store, queue, claim.job_id))
            replies = await pipe.execute()
    found: dict[Claim[Any], str] = {}
    for claim, reply in zip(claims, replies, strict=True):
        if not reply:
            continue
        try:
            request = json.loads(_text(reply))
        except ValueError:
            continue
        if isinstance(request, dict) and request.get("token") == claim.token:
            found[claim] = str(request.get("reason") or "cancelled")
    return found


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
