"""What ``corral chaos`` runs and what it finds: the bounds of its options, :class:`ChaosConfig`,
and the checker's verdict (:class:`ChaosReport`, its kills, the JSON of ``--json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import ConfigError
from corral.settings import is_loopback_url, redact_url

JOB_NAME = "corral.chaos"
TASK_MODULE = "corral.tools._chaos_tasks"

MAX_JOBS = 1_000_000
MAX_WORKERS = 64
MAX_CONCURRENCY = 1_000
MAX_DURATION_S = 3_600.0
MIN_KILL_EVERY_S = 0.1
WARM_UP_LIMIT_S = 60.0  # how long the run waits for its workers to be up
ENQUEUE_TICK_S = 0.1
SAMPLE_SIZE = 10
EXIT_VIOLATION = 1


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """What to run: the queue, the workers, the faults and the bounds."""

    backend: str = "sqlite"
    jobs: int = 10_000
    workers: int = 4
    concurrency: int = 16
    """Jobs each worker process runs at once."""
    kill_every_s: float = 2.0
    duration_s: float = 60.0
    """How long jobs keep arriving and workers keep being killed."""
    job_ms: int = 500
    """Each job works for a random time from 0 to this many milliseconds."""
    lease_s: float = 2.0
    """Short, so the jobs of a killed worker come back quickly."""
    max_stalls: int = 1_000
    """High, so a job caught by several kills is delivered again rather than failed."""
    shutdown_grace_s: float = 5.0
    drain_timeout_s: float = 120.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    workdir: Path | None = None
    """Where the ledger, the SQLite file and the worker logs go; kept. ``None``: a temporary
    directory, removed at the end unless ``keep``."""
    keep: bool = False
    """Keep the work directory and the Redis keys of the queue after the run."""
    seed: int | None = None

    def validate(self) -> None:
        """Raise ConfigError, naming the option, for a value the harness will not run with."""
        if self.backend not in ("sqlite", "bullmq"):
            raise ConfigError(f"--backend must be 'sqlite' or 'bullmq', got {self.backend!r}")
        _check_range("--jobs", self.jobs, 1, MAX_JOBS)
        _check_range("--workers", self.workers, 1, MAX_WORKERS)
        _check_range("--concurrency", self.concurrency, 1, MAX_CONCURRENCY)
        _check_range("--kill-every-s", self.kill_every_s, MIN_KILL_EVERY_S, MAX_DURATION_S)
        _check_range("--duration-s", self.duration_s, 0.0, MAX_DURATION_S)
        _check_range("--job-ms", self.job_ms, 0, 600_000)
        _check_range("--lease-s", self.lease_s, 0.1, 600.0)
        _check_range("--max-stalls", self.max_stalls, 0, 1_000_000)
        _check_range("--shutdown-grace-s", self.shutdown_grace_s, 0.0, 600.0)
        _check_range("--drain-timeout-s", self.drain_timeout_s, 1.0, MAX_DURATION_S)
        if self.backend == "bullmq":
            check_local_redis(self.redis_url)


def _check_range(option: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, int | float) and math.isfinite(value) and low <= value <= high
    ):
        raise ConfigError(f"{option} must be from {low:g} to {high:g}, got {value!r}")


def check_local_redis(url: str) -> None:
    """Refuse a Redis that is not on this machine: the harness floods and deletes its queue."""
    if not is_loopback_url(url):
        raise ConfigError(
            f"corral chaos only runs against a Redis on this machine (127.0.0.1), not "
            f"{redact_url(url)}; start one with: redis-server --port 6379"
        )


# -- the report --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kill:
    """One SIGKILL: when, which worker process, how many of its jobs were in flight."""

    at_s: float
    pid: int
    in_flight: int


@dataclass(slots=True)
class ChaosReport:
    """The checker's verdict, in the terms of Jepsen's total-queue checker."""

    backend: str
    enqueued: int
    completed: int
    """Jobs the queue says are completed."""
    executed: int
    """Distinct jobs the ledger shows done at least once."""
    executions: int
    """``done`` lines in the ledger."""
    lost: int
    """Enqueued and not completed at the end."""
    duplicated: int
    """Jobs done more than once per the ledger."""
    extra_completions: int
    """Completions beyond the first, summed over the duplicated jobs."""
    extra_after_kills: int
    """Extra completions whose earlier run was on a worker that was then killed (or crashed);
    the others come from leases lost by live workers (a lease too short for the load)."""
    stuck_active: int
    failed: int
    unexpected: int
    """Job ids in the ledger that were never enqueued."""
    completed_not_executed: int
    """Jobs the queue says are completed that the ledger never saw done."""
    kills: list[Kill]
    worker_crashes: int
    """Worker processes that died without being killed by the harness."""
    in_flight_at_kills: int
    duration_s: float
    drained: bool
    samples: dict[str, list[str]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def violations(self) -> list[str]:
        """What broke the guarantees; empty when the run passed."""
        found = []
        if self.lost:
            found.append(f"{self.lost} job(s) lost")
        if self.stuck_active:
            found.append(f"{self.stuck_active} job(s) stuck active")
        if self.extra_completions > self.in_flight_at_kills:
            found.append(
                f"{self.extra_completions} extra completion(s), more than the "
                f"{self.in_flight_at_kills} job(s) in flight at the kills"
            )
        if self.unexpected:
            found.append(f"{self.unexpected} job(s) in the ledger were never enqueued")
        if self.completed_not_executed:
            found.append(f"{self.completed_not_executed} completed job(s) never ran")
        if self.worker_crashes:
            found.append(f"{self.worker_crashes} worker process(es) died on their own")
        return found

    @property
    def ok(self) -> bool:
        """No lost or stuck job, no unexplained duplicate, no phantom job."""
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON (``corral chaos --json``)."""
        body = asdict(self)
        body["kills"] = len(self.kills)
        body["kill_log"] = [asdict(kill) for kill in self.kills]
        body["ok"] = self.ok
        body["violations"] = self.violations
        return body
