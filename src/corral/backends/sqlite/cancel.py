"""Cancel requests on SQLite (see :mod:`corral.cancel`): two columns of the job's row, the
lease token of the attempt asked to stop and why; the worker reads them with its lease
renewals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corral.backends.base import Claim
from corral.backends.sqlite.database import Database


async def request_cancel(db: Database, where: str, params: Sequence[Any], reason: str) -> bool:
    """Ask the worker running the job (``where``) to stop its current attempt; ``False`` if
    the job is not active."""
    rows = await db.statement(
        "UPDATE jobs SET cancel_token = lease_token, cancel_reason = ? "
        f"WHERE {where} AND state = 'active' RETURNING 1",
        (reason, *params),
    )
    return bool(rows)


def cancel_requests(db: Database, claims: Sequence[Claim[int]]) -> dict[Claim[int], str]:
    """The claims whose attempt was asked to stop, with the reason."""
    if not claims:
        return {}
    marks = ", ".join("?" * len(claims))
    asked = {
        seq: (token, reason)
        for seq, token, reason in db.read(
            f"SELECT seq, cancel_token, cancel_reason FROM jobs WHERE seq IN ({marks}) "
            "AND cancel_token IS NOT NULL",
            [claim.handle for claim in claims],
        )
    }
    found: dict[Claim[int], str] = {}
    for claim in claims:
        token, reason = asked.get(claim.handle, (None, None))
        if token == claim.token:
            found[claim] = reason or "cancelled"
    return found
