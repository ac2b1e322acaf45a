"""Fault injection: run real workers, SIGKILL them at random, and check that no job was lost.

``corral chaos`` (or :func:`run_chaos`) starts ``workers`` worker processes
(``python -m corral.worker corral.tools._chaos_tasks``) on a fresh queue and, once they are all
up, enqueues ``jobs`` jobs
spread over ``duration_s`` while it kills a random worker with SIGKILL every ``kill_every_s`` and
starts a new one in its place, then lets the queue drain (within ``drain_timeout_s``) and checks
the outcome the way Jepsen's total-queue checker does, against two records:

- the queue's own state: which jobs it says are completed, failed, still active;
- a ledger outside the queue: an append-only file in which the handler writes a ``start`` line
  before its work and a ``done`` line after it (see :mod:`corral.tools._chaos_tasks`).

A job is *lost* if it was enqueued and is not completed at the end; *duplicated* if the ledger
shows it done more than once. At-least-once delivery allows duplicates only for jobs a kill
caught in flight (started and not yet settled), so the run passes when nothing is lost, nothing
is stuck active, and the extra completions do not outnumber the jobs in flight at the kills.

The run is bounded in time and size and only talks to 127.0.0.1: it is a test tool, not
something to point at a production Redis.

Layers, imported one way, down: :mod:`.run` (the run, its checker, the command) ->
:mod:`.fleet` (the worker processes), :mod:`.ledger` (reading the ledger) -> :mod:`.model`
(the options, their bounds and the report).
"""

from __future__ import annotations

from corral.tools.chaos.fleet import (
    Fleet,
    settings_env,
)
from corral.tools.chaos.ledger import (
    Ledger,
)
from corral.tools.chaos.model import (
    EXIT_VIOLATION,
    JOB_NAME,
    MAX_CONCURRENCY,
    MAX_DURATION_S,
    MAX_JOBS,
    MAX_WORKERS,
    MIN_KILL_EVERY_S,
    TASK_MODULE,
    ChaosConfig,
    ChaosReport,
    Kill,
    check_local_redis,
)
from corral.tools.chaos.run import (
    chaos_command,
    chaos_settings,
    report_table,
    run_chaos,
)

__all__ = [
    "EXIT_VIOLATION",
    "JOB_NAME",
    "MAX_CONCURRENCY",
    "MAX_DURATION_S",
    "MAX_JOBS",
    "MAX_WORKERS",
    "MIN_KILL_EVERY_S",
    "TASK_MODULE",
    "ChaosConfig",
    "ChaosReport",
    "Fleet",
    "Kill",
    "Ledger",
    "chaos_command",
    "chaos_settings",
    "check_local_redis",
    "report_table",
    "run_chaos",
    "settings_env",
]
