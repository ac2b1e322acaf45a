"""Backoff policies shared by every backend, with BullMQ's arithmetic so both backends agree."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from corral.errors import PayloadError

BackoffType = Literal["fixed", "exponential"]

MAX_DELAY_MS = 365 * 86_400_000
"""The longest backoff (and job delay) corral accepts: a year. Past it, times no longer fit
SQLite's 64-bit milliseconds or stay exact in BullMQ's delayed-set scores."""


@dataclass(frozen=True, slots=True)
class Retry:
    """How long to wait before the next attempt of a failed job.

    Build one with :meth:`fixed` or :meth:`exponential`. The delays are those of BullMQ's
    built-in strategies (``backoff: {type, delay, jitter}``), so a job retried by a corral worker
    and one retried by a Node.js BullMQ worker wait the same time.
    """

    type: BackoffType
    delay_ms: int
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.type not in ("fixed", "exponential"):
            raise PayloadError(f"backoff type must be 'fixed' or 'exponential', got {self.type!r}")
        if isinstance(self.delay_ms, bool) or not isinstance(self.delay_ms, int):
            raise PayloadError(f"backoff delay must be a whole number of ms, got {self.delay_ms!r}")
        if not 0 <= self.delay_ms <= MAX_DELAY_MS:
            raise PayloadError(
                f"backoff delay must be from 0 to {MAX_DELAY_MS} ms (a year), got {self.delay_ms}"
            )
        if not (isinstance(self.jitter, int | float) and 0.0 <= self.jitter <= 1.0):
            raise PayloadError(f"backoff jitter must be between 0 and 1, got {self.jitter!r}")

    @classmethod
    def fixed(cls, delay_s: float, jitter: float = 0.0) -> Retry:
        """Wait ``delay_s`` before every retry (less up to ``jitter`` of it, at random)."""
        return cls("fixed", _seconds_to_ms(delay_s), _jitter(jitter))

    @classmethod
    def exponential(cls, delay_s: float, jitter: float = 0.0) -> Retry:
        """Wait ``delay_s * 2 ** (attempt - 1)`` after failed attempt ``attempt``.

        With ``jitter`` (0..1), the wait is drawn uniformly from the top ``jitter`` share of that
        delay: ``[delay * (1 - jitter), delay)``, as BullMQ defines it.
        """
        return cls("exponential", _seconds_to_ms(delay_s), _jitter(jitter))

    def delay_for(self, attempts_made: int, *, rng: random.Random | None = None) -> int:
        """The wait in milliseconds after ``attempts_made`` attempts have failed (1-based)."""
        if attempts_made < 1:
            raise ValueError(f"attempts_made is 1-based, got {attempts_made}")
        if self.type == "fixed":
            base = self.delay_ms
        else:
            # JavaScript's Math.round rounds halves up; Python's round() would round to even.
            base = math.floor(2 ** (attempts_made - 1) * self.delay_ms + 0.5)
        if self.jitter <= 0:
            return int(base)
        draw = (rng or random).random()
        return math.floor(draw * base * self.jitter + base * (1 - self.jitter))

    def to_bullmq(self) -> dict[str, Any]:
        """The ``backoff`` job option a Node.js BullMQ producer would write for this policy."""
        opts: dict[str, Any] = {"type": self.type, "delay": self.delay_ms}
        if self.jitter:
            opts["jitter"] = self.jitter
        return opts

    @classmethod
    def from_bullmq(cls, opts: Any) -> Retry | None:
        """Read a BullMQ ``backoff`` option (a number of ms or ``{type, delay, jitter}``)."""
        if opts is None:
            return None
        try:
            if isinstance(opts, int | float) and not isinstance(opts, bool):
                return cls("fixed", int(opts))
            if isinstance(opts, dict) and opts.get("type") in ("fixed", "exponential"):
                delay_ms, jitter = int(opts.get("delay") or 0), float(opts.get("jitter") or 0.0)
                return cls(opts["type"], delay_ms, jitter)
        except OverflowError:  # an infinite delay
            raise PayloadError(f"backoff delay is not a finite number: {opts!r}"[:200]) from None
        return None


def _seconds_to_ms(delay_s: float) -> int:
    if (
        isinstance(delay_s, bool)
        or not isinstance(delay_s, int | float)
        or not math.isfinite(delay_s)
    ):
        raise PayloadError(f"backoff delay_s must be a finite number of seconds, got {delay_s!r}")
    if not 0 <= delay_s <= MAX_DELAY_MS / 1000:
        raise PayloadError(
            f"backoff delay_s must be from 0 to {MAX_DELAY_MS // 1000} (a year), got {delay_s}"
        )
    return round(delay_s * 1000)


def _jitter(jitter: float) -> float:
    if isinstance(jitter, bool) or not isinstance(jitter, int | float):
        raise PayloadError(f"backoff jitter must be a number between 0 and 1, got {jitter!r}")
    return float(jitter)
