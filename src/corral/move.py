"""Moving a queue's jobs to another queue or backend (``corral move``, ``QueueService.move_to``).

Jobs are copied batch by batch through three primitives of every backend
(:meth:`~corral.backends.base.QueueBackend.export_jobs`, ``import_jobs``, ``remove_exported``):

1. read a batch from the source (waiting, delayed or failed jobs, with everything needed to
   recreate them);
2. write it to the target, keeping ids; an id already in the target with the same name and data
   is an earlier copy (an interrupted run) and is not written again; an id taken by another job
   is a conflict and that job stays in the source;
3. delete from the source only the jobs the target now has, and only if each is still in the
   state it was read in. A job that changed meanwhile (a worker claimed it) stays in the source
   and the copy just written is taken back from the target.

So a job is never in neither store, and a re-run after an interruption (even ``kill -9``) picks up
where the last one stopped without copying anything twice. Active jobs are not moved: stop the
workers first. Nor are the jobs of a flow (with a parent or children): the links between them
stay behind, so they do too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from corral.backends.base import QueueBackend
from corral.errors import ConfigError
from corral.message import ImportOutcome, JobRecord, JobState
from corral.schedules import carried_over, now_ms

MOVABLE_STATES = (JobState.WAITING, JobState.DELAYED, JobState.FAILED)
DEFAULT_BATCH = 500


@dataclass(slots=True)
class MoveReport:
    """What a move did (or, with ``dry_run``, would do)."""

    dry_run: bool
    moved: dict[JobState, int] = field(default_factory=lambda: dict.fromkeys(MOVABLE_STATES, 0))
    """Jobs copied to the target and deleted from the source (would be, in a dry run)."""
    already_there: int = 0
    """Jobs an earlier, interrupted run had copied: deleted from the source now, not copied
    again."""
    conflicts: list[str] = field(default_factory=list)
    """Ids taken in the target by a different job: those jobs stay in the source."""
    changed: int = 0
    """Jobs that changed state in the source while being moved (a worker claimed them): they
    stay in the source, their fresh copies were taken back from the target."""
    duplicated: list[str] = field(default_factory=list)
    """Jobs whose copy could not be taken back (a worker of the target had claimed it): they
    are in both queues. Empty unless workers ran on both sides during the move."""
    active_skipped: int = 0
    """Active jobs of the source when the move started: never moved."""
    in_flow: list[str] = field(default_factory=list)
    """Jobs of a flow (with a parent or children): they stay in the source, since the links
    between them do not travel."""
    schedules: int = 0
    """Schedules moved (see :func:`move_schedules`)."""
    left: dict[JobState, int] = field(default_factory=dict)
    """Jobs of the moved states still in the source at the end."""

    @property
    def total_moved(self) -> int:
        return sum(self.moved.values())


Progress = Callable[[int], None]
"""Called with the number of jobs handled since the last call."""


def parse_states(states: str | Sequence[str | JobState] | None) -> tuple[JobState, ...]:
    """``"waiting,delayed"`` (or a sequence) as states; every movable state by default.

    Raises:
        ConfigError: a state that is not ``waiting``, ``delayed`` or ``failed``.
    """
    if states is None:
        return MOVABLE_STATES
    parts = states.split(",") if isinstance(states, str) else list(states)
    chosen: list[JobState] = []
    for part in parts:
        text = str(part).strip()
        if not text:
            continue
        try:
            state = JobState(text)
        except ValueError:
            state = None
        if state not in MOVABLE_STATES:
            raise ConfigError(
                f"cannot move {text!r} jobs: the states that move are waiting, delayed and "
                "failed (active jobs finish where they run; completed jobs stay)"
            )
        assert state is not None
        if state not in chosen:
            chosen.append(state)
    if not chosen:
        raise ConfigError("no state to move; name some of waiting, delayed, failed")
    return tuple(chosen)


async def move_jobs(
    source: QueueBackend,
    target: QueueBackend,
    *,
    states: Sequence[JobState] = MOVABLE_STATES,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> MoveReport:
    """Move the jobs of ``source`` in ``states`` to ``target`` (see the module docstring)."""
    if source.settings.storage() == target.settings.storage() and (
        source.queue_name == target.queue_name
    ):
        raise ConfigError(
            f"the target is the source itself (queue {source.queue_name!r} on the same "
            "storage); name another backend, storage or queue (--to-queue)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    report = MoveReport(dry_run=dry_run)
    report.active_skipped = (await source.counts())[JobState.ACTIVE]
    report.schedules = await move_schedules(source, target, dry_run=dry_run)
    for state in states:
        offset = 0
        while True:
            records = await source.export_jobs(state, limit=batch_size, offset=offset)
            if not records:
                break
            offset += await _move_batch(source, target, records, report)
            if progress is not None:
                progress(len(records))
    counts = await source.counts()
    report.left = {state: counts[state] for state in states}
    return report


async def _move_batch(
    source: QueueBackend, target: QueueBackend, records: list[JobRecord], report: MoveReport
) -> int:
    """Move one batch; return how many of its jobs stay where they were read (the next read
    skips them)."""
    linked = [record for record in records if record.in_flow]
    if linked:
        report.in_flow += [record.id for record in linked]
        records = [record for record in records if not record.in_flow]
        if not records:
            return len(linked)
    outcomes = await target.import_jobs(records, dry_run=report.dry_run)
    if report.dry_run:
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome is ImportOutcome.CONFLICT:
                report.conflicts.append(record.id)
            elif outcome is ImportOutcome.PRESENT:
                report.already_there += 1
            else:
                report.moved[record.state] += 1
        return len(records) + len(linked)
    stays = len(linked)
    copied: list[tuple[JobRecord, ImportOutcome]] = []
    for record, outcome in zip(records, outcomes, strict=True):
        if outcome is ImportOutcome.CONFLICT:
            report.conflicts.append(record.id)
            stays += 1
        else:
            copied.append((record, outcome))
    removed = await source.remove_exported([record for record, _ in copied])
    take_back: list[JobRecord] = []
    for (record, outcome), gone in zip(copied, removed, strict=True):
        if not gone:
            report.changed += 1
            if outcome is ImportOutcome.CREATED:
                take_back.append(record)
        elif outcome is ImportOutcome.PRESENT:
            report.already_there += 1
        else:
            report.moved[record.state] += 1
    if take_back:
        taken = await target.remove_exported(take_back)
        report.duplicated += [r.id for r, ok in zip(take_back, taken, strict=True) if not ok]
    return stays


async def move_schedules(source: QueueBackend, target: QueueBackend, *, dry_run: bool) -> int:
    """Move the queue's schedules, before its jobs; return how many.

    Each is written to the target (an upsert: a re-run writes it again, idempotently), then
    deleted from the source with its pending job, so that job is not moved as a plain job: the
    target's schedule makes its own. ``limit`` counts the runs left and an interval starts its
    phase at the move. A schedule that is done (limit reached, end passed) stays in the source.
    """
    moved = 0
    for info in await source.list_schedules():
        schedule = carried_over(info, target.settings, now_ms())
        if schedule is None:
            continue
        if not dry_run:
            await target.upsert_schedule(schedule)
            await source.remove_schedule(info.id)
        moved += 1
    return moved
