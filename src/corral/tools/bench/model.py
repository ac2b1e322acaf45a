"""The figures of ``corral bench``: its plans (how much each phase does), what is measured of
one system and the checks computed from it, as the JSON report (schema ``corral-bench/1``)
holds them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.errors import BenchError

SCHEMA = "corral-bench/1"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
JOB_NAME = "noop"
FLOW_CHILD = "flow_child"
FLOW_PARENT = "flow_parent"
BUSY_LOAD = 0.5
RUNNER_MODULE = "corral.tools.bench"
BACKEND_LABELS = {"sqlite": "SQLite", "bullmq": "BullMQ"}


# -- plans --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """How much each phase does; bounded in count and, per phase, in time."""

    mode: str
    enqueue_one: int
    enqueue_bulk: int
    bulk_batch: int
    processed: dict[int, int]
    """Jobs per worker run, by concurrency."""
    rss_concurrency: int
    warm_jobs: int
    idle_samples: int
    idle_in_process_samples: int
    idle_gap_ms: tuple[int, int]
    max_phase_s: float
    under_load_jobs: int = 2_000
    """Jobs enqueued one by one by ``under_load_tasks`` tasks while a worker drains them."""
    under_load_tasks: int = 8
    flows: int = 2
    flow_children: int = 500
    """Children per flow (one parent each)."""
    flow_concurrency: int = 10
    limit_s: float = 1.0
    """How long each of the machine's limits is measured (corral.tools.limits)."""


FULL = Plan(
    mode="full",
    enqueue_one=10_000,
    enqueue_bulk=50_000,
    bulk_batch=1_000,
    processed={1: 5_000, 10: 20_000, 50: 100_000},
    rss_concurrency=50,
    warm_jobs=2_000,
    idle_samples=100,
    idle_in_process_samples=50,
    idle_gap_ms=(20, 100),
    max_phase_s=120.0,
    under_load_jobs=10_000,
    flows=5,
    flow_children=5_000,
    flow_concurrency=10,
)

QUICK = Plan(
    mode="quick",
    enqueue_one=300,
    enqueue_bulk=2_000,
    bulk_batch=500,
    processed={1: 300, 10: 1_000, 50: 1_000},
    rss_concurrency=50,
    warm_jobs=100,
    idle_samples=8,
    idle_in_process_samples=8,
    idle_gap_ms=(10, 40),
    max_phase_s=20.0,
    under_load_jobs=500,
    flows=2,
    flow_children=500,
    flow_concurrency=10,
    limit_s=0.25,
)


# -- results ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Pickup:
    """Idle pickup latencies of one way of measuring, in milliseconds."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass(slots=True)
class Memory:
    """Worker process RSS (kB) at start, after the warm-up jobs and after the last job."""

    jobs: int
    start_kb: int
    warm_kb: int
    end_kb: int
    peak_kb: int


@dataclass(slots=True)
class SystemResult:
    """Everything measured for one system; ``None`` where a phase did not run or failed."""

    system: str
    label: str
    available: bool
    reason: str | None = None
    version: str | None = None
    enqueue_one_per_s: float | None = None
    enqueue_bulk_per_s: float | None = None
    processed_per_s: dict[str, float] = field(default_factory=dict)
    """By concurrency, as a string key ("1", "10", "50") so the JSON reads the same."""
    pickup: dict[str, Pickup] = field(default_factory=dict)
    """``cross_process`` and ``in_process``."""
    rss: Memory | None = None
    enqueue_under_load_per_s: float | None = None
    """Enqueues one by one from several tasks of one event loop while a worker drains them."""
    loop_lag: Pickup | None = None
    """How late the producer's event loop ran a 1 ms timer meanwhile (ms): what a web app
    enqueueing from its request handlers loses."""
    flow_enqueue_per_s: float | None = None
    """Jobs of flows added per second (each flow one atomic write)."""
    flow_children_per_s: float | None = None
    flow_release: Pickup | None = None
    """From a flow's last child's handler call to its parent's, in milliseconds."""
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    phase_s: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase, set-up and clean-up included (to plan a run's length)."""


@dataclass(slots=True)
class Check:
    """A target or a reference ratio computed from one run's figures."""

    check: str
    measured: str
    target: str
    met: bool | None
    values: dict[str, float] = field(default_factory=dict)


Data = dict[str, Any]
OnJob = Callable[[Data], None]


def now_us() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock every process (and Node's hrtime) shares."""
    return time.monotonic_ns() // 1000


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile by linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no samples")
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
