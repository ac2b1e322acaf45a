"""The SQLite schema: its version, the steps that migrate a file forward, the shared SQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from corral.errors import BackendError

SCHEMA_VERSION = 12

_JOB_ID = "coalesce(NEW.custom_id, NEW.seq)"

# Two triggers of the events (migration 10), written again by migration 12 to change the order
# SQLite runs them in.
_EVENT_STATE = f"""
        CREATE TRIGGER jobs_event_state AFTER UPDATE OF state ON jobs
        WHEN NEW.state IS NOT OLD.state BEGIN
            INSERT INTO events (queue, name, job_id, prev, value)
                VALUES (NEW.queue, NEW.state, {_JOB_ID}, OLD.state, CASE NEW.state
                    WHEN 'completed' THEN NEW.result WHEN 'failed' THEN NEW.error
                    WHEN 'delayed' THEN NEW.run_at END);
        END
        """
_EVENT_STALLED = f"""
        CREATE TRIGGER jobs_event_stalled AFTER UPDATE OF stalls ON jobs
        WHEN NEW.stalls > OLD.stalls BEGIN
            INSERT INTO events (queue, name, job_id) VALUES (NEW.queue, 'stalled', {_JOB_ID});
        END
        """

MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        """
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            custom_id TEXT,
            name TEXT NOT NULL,
            data TEXT NOT NULL,
            state TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            run_at INTEGER NOT NULL,
            enqueued_at INTEGER NOT NULL,
            attempts_made INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 1,
            backoff TEXT,
            lease_token TEXT,
            lease_expires_at INTEGER,
            started_at INTEGER,
            finished_at INTEGER,
            stalls INTEGER NOT NULL DEFAULT 0,
            result TEXT,
            error TEXT,
            traceback TEXT,
            progress TEXT,
            logs TEXT
        )
        """,
        "CREATE UNIQUE INDEX jobs_custom_id ON jobs (queue, custom_id) WHERE custom_id IS NOT NULL",
        "CREATE INDEX jobs_waiting ON jobs (queue, priority, run_at, seq) WHERE state = 'waiting'",
        "CREATE INDEX jobs_delayed ON jobs (queue, run_at) WHERE state = 'delayed'",
        "CREATE INDEX jobs_active ON jobs (queue, lease_expires_at) WHERE state = 'active'",
        "CREATE INDEX jobs_state ON jobs (queue, state, finished_at)",
        "CREATE TABLE queues (name TEXT PRIMARY KEY, paused INTEGER NOT NULL DEFAULT 0)",
    ),
    # Every enqueue and claim paid for an index over all states; finished jobs are the only
    # ones that need (state, finished_at), so the index now covers just them.
    2: (
        "DROP INDEX jobs_state",
        "CREATE INDEX jobs_completed ON jobs (queue, finished_at) WHERE state = 'completed'",
        "CREATE INDEX jobs_failed ON jobs (queue, finished_at) WHERE state = 'failed'",
    ),
    # Every failed attempt's traceback (a JSON list), as BullMQ keeps its ``stacktrace`` list.
    3: (
        "ALTER TABLE jobs ADD COLUMN tracebacks TEXT",
        "UPDATE jobs SET tracebacks = json_array(traceback) WHERE traceback IS NOT NULL "
        "AND traceback != ''",
    ),
    # Job schedules (corral.schedules): one row per schedule, and the schedule a job was made
    # by. A schedule's jobs have the ids repeat:<id>:<slot ms>, unique like every custom id.
    4: (
        """
        CREATE TABLE schedulers (
            queue TEXT NOT NULL,
            id TEXT NOT NULL,
            name TEXT NOT NULL,
            data TEXT NOT NULL,
            cron TEXT,
            every_ms INTEGER,
            tz TEXT,
            max_runs INTEGER,
            start_ms INTEGER,
            end_ms INTEGER,
            offset_ms INTEGER NOT NULL DEFAULT 0,
            priority INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 1,
            backoff TEXT,
            current_ms INTEGER NOT NULL,
            count INTEGER NOT NULL DEFAULT 1,
            iterations INTEGER NOT NULL DEFAULT 1,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (queue, id)
        )
        """,
        "ALTER TABLE jobs ADD COLUMN scheduler TEXT",
    ),
    # Flows. A child row names its parent (``parent_seq``) and what its failure does to it
    # (``parent_policy``); the parent's view of each child is a ``dependencies`` row, which keeps
    # a child's result after the child itself is trimmed (BullMQ's ``processed`` hash). A parent
    # waits in state 'waiting-children'; ``deferred_failure`` fails a job without running it.
    5: (
        "ALTER TABLE jobs ADD COLUMN parent_seq INTEGER",
        "ALTER TABLE jobs ADD COLUMN parent_policy TEXT",
        "ALTER TABLE jobs ADD COLUMN deferred_failure TEXT",
        """
        CREATE TABLE dependencies (
            parent_seq INTEGER NOT NULL,
            child_seq INTEGER NOT NULL,
            child_queue TEXT NOT NULL,
            child_id TEXT NOT NULL,
            status TEXT NOT NULL,
            value TEXT,
            PRIMARY KEY (parent_seq, child_seq)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX dependencies_status ON dependencies (parent_seq, status)",
        "CREATE INDEX jobs_waiting_children ON jobs (queue, enqueued_at, seq) "
        "WHERE state = 'waiting-children'",
        # However a parent goes (removed, trimmed, purged), its view of its children goes too.
        "CREATE TRIGGER jobs_drop_dependencies AFTER DELETE ON jobs BEGIN "
        "DELETE FROM dependencies WHERE parent_seq = OLD.seq; END",
    ),
    # Deduplication ids (corral.dedup): the job that stands for an id, until ``expires_at``
    # (throttle), or while that job is unfinished (simple mode: ``expires_at`` is NULL). An
    # unfinished job removed (remove, purge, a debounce's replacement) frees its id at once;
    # trimming finished jobs leaves a throttle's window as it is, as in BullMQ.
    6: (
        """
        CREATE TABLE deduplication (
            queue TEXT NOT NULL,
            id TEXT NOT NULL,
            job_seq INTEGER NOT NULL,
            expires_at INTEGER,
            PRIMARY KEY (queue, id)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX deduplication_job ON deduplication (job_seq)",
        "CREATE TRIGGER jobs_drop_deduplication AFTER DELETE ON jobs "
        "WHEN OLD.state NOT IN ('completed', 'failed') BEGIN "
        "DELETE FROM deduplication WHERE job_seq = OLD.seq; END",
    ),
    # Per-minute throughput (corral.metrics): jobs completed and failed per queue and minute
    # (minutes since the epoch), as BullMQ's metrics keys hold it.
    7: (
        """
        CREATE TABLE metrics (
            queue TEXT NOT NULL,
            minute INTEGER NOT NULL,
            completed INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (queue, minute)
        ) WITHOUT ROWID
        """,
    ),
    # Live workers (corral.workers): a row per worker loop, renewed by its lease heartbeat;
    # ``queues`` is a JSON list, a row past ``expires_at`` is stale.
    8: (
        """
        CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            queues TEXT NOT NULL,
            started_at INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            running INTEGER NOT NULL DEFAULT 0,
            done INTEGER NOT NULL DEFAULT 0
        )
        """,
    ),
    # The producer's trace context (corral.telemetry), as BullMQ keeps it in a job's ``tm``.
    9: ("ALTER TABLE jobs ADD COLUMN trace_context TEXT",),
    # Events (corral.events): BullMQ's event names, written by triggers in the very transaction
    # that changes a job or a queue, so no change goes without its event and no code path can
    # forget one. One row per change, with its own columns rather than JSON (the cheapest rows
    # to write): a job added waiting is one row ('added+waiting') that readers give as BullMQ's
    # two events. ``seq`` only grows: trimming (Database: the newest ``events_max_len`` rows
    # are kept) never deletes the newest row.
    10: (
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            queue TEXT NOT NULL,
            name TEXT NOT NULL,
            job_id TEXT,
            prev TEXT,
            value TEXT
        )
        """,
        f"""
        CREATE TRIGGER jobs_event_added_later AFTER INSERT ON jobs
        WHEN NEW.state IN ('delayed', 'waiting-children') BEGIN
            INSERT INTO events (queue, name, job_id, value)
                VALUES (NEW.queue, NEW.state, {_JOB_ID}, NEW.run_at);
        END
        """,
        f"""
        CREATE TRIGGER jobs_event_added AFTER INSERT ON jobs BEGIN
            INSERT INTO events (queue, name, job_id, value) VALUES (NEW.queue,
                CASE NEW.state WHEN 'waiting' THEN 'added+waiting' ELSE 'added' END,
                {_JOB_ID}, NEW.name);
        END
        """,
        # SQLite runs the triggers of one change newest first: 'retries-exhausted' is created
        # before 'failed' so that it comes after it ('stalled': see migration 12). Separate
        # triggers with WHEN clauses cost a plain change nothing but the WHEN.
        f"""
        CREATE TRIGGER jobs_event_exhausted AFTER UPDATE OF state ON jobs
        WHEN NEW.state = 'failed' AND OLD.state = 'active'
            AND NEW.attempts_made >= NEW.max_attempts BEGIN
            INSERT INTO events (queue, name, job_id, value)
                VALUES (NEW.queue, 'retries-exhausted', {_JOB_ID}, NEW.attempts_made);
        END
        """,
        _EVENT_STATE,
        _EVENT_STALLED,
        f"""
        CREATE TRIGGER jobs_event_progress AFTER UPDATE OF progress ON jobs
        WHEN NEW.state = 'active' AND NEW.progress IS NOT NULL BEGIN
            INSERT INTO events (queue, name, job_id, value)
                VALUES (NEW.queue, 'progress', {_JOB_ID}, NEW.progress);
        END
        """,
        """
        CREATE TRIGGER jobs_event_removed AFTER DELETE ON jobs
        WHEN OLD.state NOT IN ('completed', 'failed') BEGIN
            INSERT INTO events (queue, name, job_id, prev)
                VALUES (OLD.queue, 'removed', coalesce(OLD.custom_id, OLD.seq), OLD.state);
        END
        """,
        """
        CREATE TRIGGER queues_event_paused AFTER INSERT ON queues WHEN NEW.paused BEGIN
            INSERT INTO events (queue, name) VALUES (NEW.name, 'paused');
        END
        """,
        """
        CREATE TRIGGER queues_event_pause AFTER UPDATE OF paused ON queues
        WHEN NEW.paused IS NOT OLD.paused BEGIN
            INSERT INTO events (queue, name)
                VALUES (NEW.name, CASE WHEN NEW.paused THEN 'paused' ELSE 'resumed' END);
        END
        """,
    ),
    # Cancel requests (corral.cancel): the lease token of the attempt asked to stop, and why.
    11: (
        "ALTER TABLE jobs ADD COLUMN cancel_token TEXT",
        "ALTER TABLE jobs ADD COLUMN cancel_reason TEXT",
    ),
    # SQLite runs the triggers of one change newest first: 'stalled' is created again before
    # the state's trigger, so that a stalled job's 'waiting' comes before its 'stalled', as
    # BullMQ's stalled-job check writes them.
    12: (
        "DROP TRIGGER jobs_event_state",
        "DROP TRIGGER jobs_event_stalled",
        _EVENT_STALLED,
        _EVENT_STATE,
    ),
}

JOB_COLUMNS = (
    "seq, queue, custom_id, name, data, state, priority, run_at, enqueued_at, attempts_made, "
    "max_attempts, backoff, started_at, finished_at, result, error, traceback, progress, logs, "
    "tracebacks, parent_seq"
)

INSERT = (
    "INSERT INTO jobs (queue, custom_id, name, data, state, priority, run_at, enqueued_at, "
    "max_attempts, backoff, logs, trace_context) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

FINISHED_STATES = ("completed", "failed")


def schema_version(conn: sqlite3.Connection) -> int:
    """The file's schema version (0 for a new file)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_not_newer(version: int, path: str) -> None:
    """Refuse a file written by a newer corral."""
    if version > SCHEMA_VERSION:
        raise BackendError(
            f"SQLite database {path!r} has schema version {version}, newer than this "
            f"corral understands ({SCHEMA_VERSION}); upgrade corral"
        )


def upgrade(conn: sqlite3.Connection) -> None:
    """Migrate to SCHEMA_VERSION in one transaction (the caller retries while it is locked)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have migrated while we waited for the lock.
        current = schema_version(conn)
        for step in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {step}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


TRIM_EVENTS = "DELETE FROM events WHERE seq <= (SELECT max(seq) FROM events) - ?"
"""Keep the newest ``?`` events (never the newest: ids keep growing)."""


def trim_finished(conn: sqlite3.Connection, queue: str, state: str, keep: int) -> None:
    """Delete the oldest finished jobs in ``state`` beyond the newest ``keep``."""
    if state not in FINISHED_STATES:
        raise ValueError(f"only finished jobs are trimmed, not {state!r}")
    where = f"queue = ? AND state = '{state}'"  # a literal, so SQLite uses the partial index
    cutoff = conn.execute(
        f"SELECT finished_at, seq FROM jobs WHERE {where} "
        "ORDER BY finished_at DESC, seq DESC LIMIT 1 OFFSET ?",
        (queue, keep),
    ).fetchone()
    if cutoff is not None:
        conn.execute(
            f"DELETE FROM jobs WHERE {where} AND (finished_at < ? OR "
            "(finished_at = ? AND seq <= ?))",
            (queue, cutoff[0], cutoff[0], cutoff[1]),
        )
