"""Deduplication: add a job at most once per id while the id stands (BullMQ's ``deduplication``).

Three modes, as BullMQ has them:

- *simple* (``Deduplication(id)``): the id stands until the job it names finishes (completes or
  fails for good) or is removed; adding another job with it meanwhile adds nothing.
- *throttle* (``ttl_s``): the id stands for ``ttl_s`` from the first job, however that job fares;
  ``extend=True`` restarts those ``ttl_s`` on every attempt to add another.
- *debounce* (``ttl_s``, ``extend=True``, ``replace=True`` and a ``delay_s``): an attempt to add
  another replaces the standing job while it is still delayed, so the last payload wins and runs
  ``delay_s`` after the last call. A standing job that already waits or runs is kept.

``enqueue`` returns the id of the job that stands: the new one, or the one that kept it out. The
check and the write are one atomic step on both backends. On BullMQ it is BullMQ's own
(``<prefix>:<queue>:de:<id>`` with its ``PX`` expiry, the job's ``deid`` field, the
``deduplicated`` event), so corral and Node producers deduplicate against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from corral.errors import PayloadError

MAX_ID_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class Deduplication:
    """The ``deduplication=`` option of ``enqueue``; checked when it is made."""

    id: str
    ttl_s: float | None = None
    extend: bool = False
    replace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or len(self.id) > MAX_ID_LENGTH:
            raise PayloadError(
                f"a deduplication id must be a non-empty string of at most {MAX_ID_LENGTH} "
                f"characters, got {self.id!r}"
            )
        ttl_s = self.ttl_s
        if ttl_s is not None and (
            isinstance(ttl_s, bool)
            or not isinstance(ttl_s, int | float)
            or not (math.isfinite(ttl_s) and ttl_s >= 0.001)
        ):
            raise PayloadError(f"deduplication ttl_s must be a number >= 0.001, got {ttl_s!r}")
        for flag in ("extend", "replace"):
            if not isinstance(getattr(self, flag), bool):
                raise PayloadError(f"deduplication {flag} must be True or False")
        if self.extend and ttl_s is None:
            raise PayloadError("deduplication extend=True restarts ttl_s: give ttl_s too")

    @property
    def ttl_ms(self) -> int | None:
        """``ttl_s`` in milliseconds, BullMQ's unit."""
        return None if self.ttl_s is None else max(1, round(self.ttl_s * 1000))


def check_deduplication(value: object) -> Deduplication:
    """``value`` if it is a :class:`Deduplication`, else PayloadError."""
    if not isinstance(value, Deduplication):
        raise PayloadError(
            f"deduplication must be a corral.Deduplication(id, ttl_s=...), got {value!r}"
        )
    return value
