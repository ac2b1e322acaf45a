"""``corral bench``: a load test of corral itself, on SQLite and on BullMQ (Redis), as
redis-benchmark and pgbench ship with their servers.

It measures enqueue rates (one by one and in bulk), jobs processed per second at concurrency
1, 10 and 50, the idle pickup latency and the worker's memory, and checks the figures against
corral's targets. The same machinery measures other queues side by side with corral: a
:class:`System` says whether a queue can run and how to start its runners, a :class:`Suite`
lists the systems and checks of one command (``bench/compare.py`` in a corral checkout adds the
``bullmq`` package's Worker, Node.js BullMQ and Huey).

Method, the same for every system:

- Every measurement runs in separate processes ("runners"): a long-lived *producer* process per
  system and a fresh *worker* process per worker run. This process only orchestrates, so what
  is timed never shares an interpreter (and its GIL) with the progress bar and the bookkeeping.
  corral's runners are ``python -m corral.tools.bench SYSTEM ROLE``; every runner, in any
  language, takes the same roles and answers with the same JSON lines.
- Every phase gets a fresh queue (a fresh SQLite file, or a fresh queue name on Redis whose keys
  are deleted afterwards).
- Enqueue: the producer adds N jobs one by one (awaiting each), then N more in bulk (batches);
  the rate is N over the producer's wall time.
- Processed: the queue is filled first (untimed), then a worker process at concurrency C runs
  no-op jobs; the time is from the first handler call to the N-th, taken in the worker, so
  process start-up and shutdown are not in it.
- Idle pickup: a worker (concurrency 1) waits on an empty queue; the producer reads the clock and
  enqueues one job carrying that time; the handler subtracts it from its own clock
  (CLOCK_MONOTONIC, shared by every process of the machine). Across processes: producer and
  worker are two processes. In process: one process runs both. Random pauses between samples let
  the worker go back to idle; the first sample is a warm-up and is dropped.
- Worker RSS: the worker process reads its own ``VmRSS`` at start, after a warm-up count of jobs
  and after the last job of the concurrency-50 run (100,000 jobs in the full run).
- Flows (systems that have them): the producer adds F flows of one parent and N no-op children
  each (timed: jobs added per second); a worker process at concurrency C runs them. Children
  per second: from the first child's handler call to the last one's. Parent release: the time
  from a flow's last child's handler call to its parent's handler call (its result recorded,
  the parent released, claimed and started), one sample per flow; the parent checks it got
  all N results.

Layers, imported one way, down: :mod:`.run` (one run end to end and the ``corral bench``
command) -> :mod:`.orchestrator` (each system's runner processes and phases) -> :mod:`.systems`
(what is measured, the Redis it uses); :mod:`.run` -> :mod:`.report` (targets, ratios, tables,
Markdown); all of them -> :mod:`.model` (plans, results: the JSON report's shapes). The runner
processes run :mod:`.runner` (through ``__main__``), which imports only :mod:`.model`.
"""

from __future__ import annotations

from corral.tools.bench.model import (
    BACKEND_LABELS,
    BUSY_LOAD,
    DEFAULT_REDIS_URL,
    FLOW_CHILD,
    FLOW_PARENT,
    FULL,
    JOB_NAME,
    QUICK,
    RUNNER_MODULE,
    SCHEMA,
    Check,
    Data,
    Memory,
    OnJob,
    Pickup,
    Plan,
    SystemResult,
    now_us,
    percentile,
)
from corral.tools.bench.orchestrator import (
    Bench,
    pickup_of,
)
from corral.tools.bench.report import (
    SQLITE_SHARE_GOALS,
    at_least,
    at_most_ms,
    available,
    best_processed,
    corral_checks,
    markdown_report,
    of_limit,
    one_figure,
    print_report,
    ratio,
    report_from_json,
)
from corral.tools.bench.run import (
    CORRAL,
    bench_and_report,
    bench_command,
    check_loopback,
    run_bench,
)
from corral.tools.bench.runner import (
    CORRAL_CLIENTS,
    Client,
    ClientFactory,
    CorralClient,
    runner_main,
)
from corral.tools.bench.systems import (
    CorralSystem,
    Environment,
    Suite,
    System,
    ensure_redis,
    package_version,
)

__all__ = [
    "BACKEND_LABELS",
    "BUSY_LOAD",
    "CORRAL",
    "CORRAL_CLIENTS",
    "DEFAULT_REDIS_URL",
    "FLOW_CHILD",
    "FLOW_PARENT",
    "FULL",
    "JOB_NAME",
    "QUICK",
    "RUNNER_MODULE",
    "SCHEMA",
    "SQLITE_SHARE_GOALS",
    "Bench",
    "Check",
    "Client",
    "ClientFactory",
    "CorralClient",
    "CorralSystem",
    "Data",
    "Environment",
    "Memory",
    "OnJob",
    "Pickup",
    "Plan",
    "Suite",
    "System",
    "SystemResult",
    "at_least",
    "at_most_ms",
    "available",
    "bench_and_report",
    "bench_command",
    "best_processed",
    "check_loopback",
    "corral_checks",
    "ensure_redis",
    "markdown_report",
    "now_us",
    "of_limit",
    "one_figure",
    "package_version",
    "percentile",
    "pickup_of",
    "print_report",
    "ratio",
    "report_from_json",
    "run_bench",
    "runner_main",
]
