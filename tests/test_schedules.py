"""Job schedules: cron and interval jobs, one job per slot, on both backends.

- Cron patterns mean to corral what they mean to Node.js BullMQ's cron-parser (a table of
  patterns, zones and daylight-saving days, against cron-parser run in Node).
- The contract, once for both backends: bad input writes nothing; intervals, cron with seconds,
  limit, start/end, replacing a schedule, unschedule, missed slots, @periodic.
- Real processes: three workers, two killed and restarted, each slot once and no gap.
- Node.js interop both ways (the BullMQ backend): a corral schedule listed and kept going by a
  Node worker, a Node scheduler kept going by a corral worker.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from corral import (
    ConfigError,
    JobState,
    PayloadError,
    QueueMessage,
    QueueService,
    QueueSettings,
    Retry,
    ScheduleConflictError,
)
from corral.cron import check_cron, cron_next
from corral.schedules import ScheduleRule, every_next, slot_of

from conftest import PYTHON, ROOT, SettingsFactory, missing, python_env, unique_queue_name

NODE_DIR = ROOT / "tests" / "node"


def slots(ids: list[str], schedule_id: str) -> list[int]:
    """The slots (epoch ms) of ``schedule_id``'s job ids among ``ids``, in order."""
    return sorted(s for job_id in ids if (s := slot_of(job_id, schedule_id)) is not None)


def gaps(values: list[int]) -> set[int]:
    return {b - a for a, b in itertools.pairwise(values)}


def on_grid(values: list[int], step: int) -> bool:
    """Whether the slots are distinct and ``step`` apart or a multiple of it: a slot whose job
    a busy machine picked up late is followed by the next one on the grid (missed slots are
    skipped, as in BullMQ); the process test below checks that none is skipped."""
    return all(gap > 0 and gap % step == 0 for gap in gaps(values))


async def run_until(
    service: QueueService,
    done: Callable[[], bool] | Callable[[], Awaitable[bool]],
    *,
    timeout_s: float = 15.0,
) -> None:
    """Run a worker until ``done()`` holds, then stop it."""

    async def holds() -> bool:
        found = done()
        return bool(await found) if inspect.isawaitable(found) else bool(found)

    worker = asyncio.create_task(service.start_worker(concurrency=4))
    try:
        deadline = time.monotonic() + timeout_s
        while not await holds():
            if worker.done():
                worker.result()
                raise AssertionError("worker stopped before the condition held")
            assert time.monotonic() < deadline, f"not done within {timeout_s}s"
            await asyncio.sleep(0.02)
    finally:
        service.stop()
        await asyncio.wait_for(worker, 15)


def recorder(service: QueueService, name: str = "tick") -> list[QueueMessage]:
    seen: list[QueueMessage] = []

    @service.handler(name)
    async def record(message: QueueMessage) -> None:
        seen.append(message)

    return seen


# -- cron patterns: corral and Node's cron-parser agree -------------------------------------------

PATTERNS = [
    "0 9 * * *",
    "*/10 * * * * *",
    "0 0 9 * * *",
    "30 2 * * *",
    "30 1 * * *",
    "*/30 * * * *",
    "0 0 L * *",
    "0 0 * * 5L",
    "0 0 * * 5#3",
    "0 12 * * 1-5",
    "0 0 1,15 * 3",
    "0 0 ? * MON",
    "15 10-14/2 * * *",
    "0 0 1-10/3 * *",
    "0 0 * jan-mar/2 *",
    "5-50/15 * * * * *",
    "0 0 * * 7",
    "0 0 * * 1-7/2",
    "@weekdays",
    "@weekends",
    "@hourly",
    "@monthly",
]
ZONES = ["America/New_York", "Europe/Lisbon", "Australia/Sydney", "Asia/Kolkata"]
BASES = [
    "2024-03-09T12:00:00.500+00:00",  # before New York's spring forward (the 10th)
    "2024-03-10T06:59:59+00:00",  # 01:59:59 in New York, the second before it
    "2024-10-27T00:30:00+00:00",  # Lisbon falls back at 02:00 local
    "2024-11-03T05:00:00+00:00",  # New York's repeated hour (01:00 EDT)
]
DST_CASES = [  # pattern, zone, base: around daylight-saving changes, several runs each
    ("30 2 * * *", "America/New_York", "2024-03-09T12:00:00-05:00"),
    ("*/30 * * * *", "America/New_York", "2024-03-10T01:00:00-05:00"),
    ("30 1 * * *", "America/New_York", "2024-11-03T01:40:00-04:00"),
    ("30 1 * * *", "America/New_York", "2024-11-03T01:10:00-05:00"),
    ("*/30 * * * *", "America/New_York", "2024-11-03T00:40:00-04:00"),
    ("0 0-3 * * *", "America/New_York", "2024-11-02T22:00:00-04:00"),
    ("*/20 * * * * *", "America/New_York", "2024-11-03T01:59:30-04:00"),
    ("0 0 1 * * *", "Europe/Lisbon", "2024-03-31T00:30:00+00:00"),
    ("0 0 2 * * *", "Australia/Sydney", "2024-10-05T12:00:00+10:00"),
    ("0 0 * * *", "America/Santiago", "2024-09-07T12:00:00-04:00"),  # a midnight gap
    ("0 0 L * *", "UTC", "2024-02-28T23:59:59.999+00:00"),  # a leap February
    ("0 0 29 2 *", "UTC", "2023-01-01T00:00:00+00:00"),  # every four years
]


def node_cron(cases: list[dict[str, Any]]) -> list[Any]:
    result = subprocess.run(
        ["node", "cron.mjs"],
        input=json.dumps({"cases": cases}),
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    runs: list[Any] = json.loads(result.stdout.strip().split("\n")[-1])["runs"]
    return runs


def corral_cron(pattern: str, tz: str, base_ms: int, count: int) -> list[int | None]:
    found: list[int | None] = []
    for _ in range(count):
        next_ms = cron_next(base_ms, pattern, tz, None, None)
        found.append(next_ms)
        if next_ms is None:
            break
        base_ms = next_ms
    return found


def epoch_ms(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.mark.node
def test_cron_patterns_match_node_cron_parser(node_bullmq: Path) -> None:
    cases = [
        {"pattern": p, "tz": tz, "baseMs": epoch_ms(base), "count": 3}
        for p, tz, base in itertools.product(PATTERNS, ZONES, BASES)
    ]
    cases += [{"pattern": p, "tz": tz, "baseMs": epoch_ms(b), "count": 5} for p, tz, b in DST_CASES]
    expected = node_cron(cases)
    differ = []
    for case, node in zip(cases, expected, strict=True):
        mine = corral_cron(case["pattern"], case["tz"], case["baseMs"], case["count"])
        if mine != node:
            zone = ZoneInfo(case["tz"])

            def show(runs: Any, zone: ZoneInfo = zone) -> Any:
                if not isinstance(runs, list):
                    return runs
                return [datetime.fromtimestamp(ms / 1000, zone).isoformat() for ms in runs if ms]

            differ.append((case["pattern"], case["tz"], case["baseMs"], show(mine), show(node)))
    assert not differ, differ[:5]
    # The daylight-saving rules the table pins, spelled out:
    new_york = ZoneInfo("America/New_York")
    spring = corral_cron("30 2 * * *", "America/New_York", epoch_ms(DST_CASES[0][2]), 2)
    assert [datetime.fromtimestamp(ms / 1000, new_york).hour for ms in spring if ms] == [3, 2]
    fall = corral_cron("0 * * * *", "America/New_York", epoch_ms("2024-11-03T00:10:00-04:00"), 3)
    assert gaps([ms for ms in fall if ms]) == {3_600_000}  # 01:00 EDT, 01:00 EST, 02:00 EST


NODE_REFUSES = {
    "0 0 * * MON-SUN": "Invalid range",
    "0 22-2 * * *": "Invalid range",
    "0 0 12 * * 1#1,5#2": "incompatible",
    "0 0 30 2 *": "Invalid explicit day of month",
    "*/0 * * * *": "cannot repeat",
    "0 0 * * * * *": "too many fields",
    "0 0 LW * *": "Invalid characters",
}


@pytest.mark.node
def test_patterns_node_refuses_are_refused(node_bullmq: Path) -> None:
    cases = [{"pattern": p, "tz": "UTC", "baseMs": 0, "count": 1} for p in NODE_REFUSES]
    for (pattern, says), node in zip(NODE_REFUSES.items(), node_cron(cases), strict=True):
        assert says in node["error"], (pattern, node)
        with pytest.raises(ConfigError, match="cron"):
            check_cron(pattern)


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("0 25 * * *", "field 2 (hour) '25' is out of range; it takes 0-23"),
        ("0 61 * * * *", "field 2 (minute) '61' is out of range"),
        ("0 0 * * MOX", "field 5 (day of week) 'MOX'"),
        ("* * * *", "has 4 fields"),
        ("H 3 * * *", "field 1 (minute) 'H' uses a form corral does not support"),
        ("0 0 1W * *", "field 3 (day of month)"),
        ("@midnight", "not a known name"),
        ("0 0 1 * 0-7", "lists every day beside a restricted one"),
    ],
)
def test_cron_errors_name_the_field(pattern: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_cron(pattern)
    assert says in str(caught.value)


def test_intervals_skip_missed_slots_and_keep_their_phase() -> None:
    assert every_next(None, 500, 10_000, 0, None) == (10_000, 0)  # a new schedule: now
    assert every_next(None, 500, 10_000, 0, 12_345) == (12_345, 345)  # or at start_at
    assert every_next(10_000, 500, 10_100, 0, None) == (10_500, 0)  # on time
    # Three slots missed while no worker ran: the next one is the first on the grid after now.
    assert every_next(10_000, 500, 11_700, 0, None)[0] == 12_000
    rule = ScheduleRule(every_ms=500, limit=3, end_ms=11_200)
    assert rule.next_ms(10_000, 1, 10_050) == 10_500
    assert rule.next_ms(10_000, 3, 10_050) is None  # the third job was the last
    assert rule.next_ms(10_500, 1, 10_550) == 11_000
    assert rule.next_ms(11_000, 2, 11_050) is None  # 11_500 is past end_at
    assert rule.next_ms(10_000, 1, 10_550) == 11_000  # a late job: the next slot after now


# -- the contract, on both backends ---------------------------------------------------------------


async def test_bad_schedules_are_refused_and_write_nothing(service: QueueService) -> None:
    now = datetime.now(UTC)
    refused: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"cron": "0 3 * * 8"}, ConfigError, "field 5 (day of week)"),
        ({"cron": "0 3 * * *", "tz": "Mars/Olympus"}, ConfigError, "not a known time zone"),
        ({"cron": "0 3 * * *", "every_s": 5}, ConfigError, "exactly one of cron"),
        ({}, ConfigError, "exactly one of cron"),
        ({"every_s": 0}, ConfigError, "every_s must be a number of seconds > 0"),
        ({"every_s": -1}, ConfigError, "every_s must be"),
        ({"every_s": 5, "tz": "UTC"}, ConfigError, "tz applies to cron"),
        ({"every_s": 5, "limit": 0}, ConfigError, "limit must be"),
        (
            {
                "every_s": 5,
                "start_at": now + timedelta(hours=2),
                "end_at": now + timedelta(hours=1),
            },
            ConfigError,
            "is before start_at",
        ),
        ({"every_s": 5, "end_at": now - timedelta(hours=1)}, ConfigError, "in the past"),
        ({"every_s": 5, "start_at": datetime(2030, 1, 1)}, ConfigError, "no time zone"),
        (
            {"cron": "0 3 * * *", "end_at": now + timedelta(seconds=1)},
            ConfigError,
            "would never run",
        ),
        ({"every_s": 5, "job_id": "x"}, PayloadError, "job_id is not an option"),
        ({"every_s": 5, "priority": -1}, PayloadError, "priority"),
        ({"every_s": 5, "colour": "red"}, PayloadError, "colour"),
    ]
    for options, error, says in refused:
        with pytest.raises(error) as caught:
            await service.schedule("nightly", "tick", **options)
        assert says in str(caught.value), (options, str(caught.value))
    with pytest.raises(ConfigError, match="may not contain ':'"):
        await service.schedule("a:b", "tick", every_s=1)
    with pytest.raises(PayloadError):
        await service.schedule("nightly", "tick", {"f": float("nan")}, every_s=1)
    assert await service.schedules() == []
    counts = await service.counts()
    assert sum(counts.values()) == 0


async def test_an_interval_runs_each_slot_once_until_its_limit(service: QueueService) -> None:
    seen = recorder(service)
    stored = await service.schedule("beat", "tick", {"n": 1}, every_s=0.25, limit=3, attempts=2)
    assert (stored.every_s, stored.cron, stored.limit, stored.runs) == (0.25, None, 3, 0)
    assert stored.next_run_at is not None and stored.attempts == 2
    await run_until(service, lambda: len(seen) >= 3)
    await asyncio.sleep(0.4)  # a fourth slot would be due by now
    assert len(seen) == 3
    ran = slots([m.id for m in seen], "beat")
    assert on_grid(ran, 250)
    assert {(m.name, json.dumps(m.data), m.max_attempts) for m in seen} == {("tick", '{"n": 1}', 2)}
    (info,) = await service.schedules()
    assert (info.id, info.runs, info.next_run_at) == ("beat", 3, None)
    counts = await service.counts()
    assert (counts[JobState.COMPLETED], counts[JobState.DELAYED], counts[JobState.WAITING]) == (
        3,
        0,
        0,
    )


async def test_cron_with_seconds_runs_on_whole_seconds(service: QueueService) -> None:
    seen = recorder(service)
    stored = await service.schedule(
        "each-second", "tick", cron="* * * * * *", tz="Europe/Lisbon", limit=2
    )
    assert (stored.cron, stored.tz, stored.every_s) == ("* * * * * *", "Europe/Lisbon", None)
    assert stored.next_run_at is not None and stored.next_run_at.microsecond == 0
    await run_until(service, lambda: len(seen) >= 2)
    ran = slots([m.id for m in seen], "each-second")
    assert len(ran) == 2 and on_grid(ran, 1000) and ran[0] % 1000 == 0
    assert ran[0] == round(stored.next_run_at.timestamp() * 1000)
    # Without tz a cron schedule runs in UTC, written down so every worker agrees.
    default = await service.schedule("utc", "tick", cron="0 3 * * *")
    assert default.tz == "UTC" and default.next_run_at is not None
    assert (default.next_run_at.hour, default.next_run_at.minute) == (3, 0)


async def test_start_and_end_bound_the_runs(service: QueueService) -> None:
    seen = recorder(service)
    start = datetime.now(UTC) + timedelta(seconds=0.6)
    end = start + timedelta(seconds=0.5)
    stored = await service.schedule("window", "tick", every_s=0.2, start_at=start, end_at=end)
    assert stored.next_run_at == stored.start_at
    assert stored.start_at is not None and stored.end_at is not None
    assert abs(stored.start_at - start) < timedelta(milliseconds=1)
    assert stored.end_at - stored.start_at == end - start

    async def ended() -> bool:
        (info,) = await service.schedules()
        return info.next_run_at is None

    await run_until(service, ended)
    ran = slots([m.id for m in seen], "window")
    start_ms, end_ms = round(start.timestamp() * 1000), round(end.timestamp() * 1000)
    assert ran[0] == start_ms and on_grid(ran, 200)  # start, start + 200, start + 400
    assert ran[-1] <= end_ms and len(ran) <= 3  # start + 600 is past end_at
    (info,) = await service.schedules()
    assert info.runs == len(ran)


async def test_writing_a_schedule_again_replaces_it_and_unschedule_stops_it(
    service: QueueService,
) -> None:
    seen = recorder(service)
    later = datetime.now(UTC) + timedelta(hours=1)
    first = await service.schedule("s", "tick", {"v": 1}, every_s=60, start_at=later)
    # The same schedule again (a deploy, or two processes at once) keeps its pending slot.
    again = await asyncio.gather(
        *(service.schedule("s", "tick", {"v": 2}, every_s=60, start_at=later) for _ in range(3))
    )
    assert {each.next_run_at for each in again} == {first.next_run_at}
    (pending,) = await service.list_jobs(JobState.DELAYED)
    assert pending.data == {"v": 2} and slot_of(pending.id, "s") is not None
    # A new interval starts a new phase at once; its first job runs late here, and the next
    # slot is the next one of the new phase (not of the old one, a minute away).
    changed = await service.schedule("s", "tick", {"v": 3}, every_s=0.2)
    await asyncio.sleep(0.5)
    await run_until(service, lambda: len(seen) >= 3)
    ran = slots([m.id for m in seen], "s")
    assert changed.next_run_at is not None
    assert ran[0] == round(changed.next_run_at.timestamp() * 1000) and ran[1] - ran[0] < 5000
    assert on_grid(ran, 200) and {m.data["v"] for m in seen} == {3}
    assert await service.unschedule("s") is True
    assert await service.unschedule("s") is False
    assert await service.schedules() == []
    counts = await service.counts()
    assert counts[JobState.DELAYED] == counts[JobState.WAITING] == 0  # its pending job went too
    before = len(seen)
    worker = asyncio.create_task(service.start_worker())
    await asyncio.sleep(0.6)
    service.stop()
    await worker
    assert len(seen) == before


async def test_missed_slots_run_once_late_then_the_schedule_goes_on(
    service: QueueService,
) -> None:
    seen = recorder(service)
    stored = await service.schedule("late", "tick", every_s=0.2)
    await asyncio.sleep(1.1)  # no worker: five slots pass
    await run_until(service, lambda: len(seen) >= 3)
    ran = slots([m.id for m in seen], "late")
    assert stored.next_run_at is not None
    assert ran[0] == round(stored.next_run_at.timestamp() * 1000)  # the pending one, late
    assert ran[1] - ran[0] >= 1000  # no backlog: the missed slots are skipped...
    assert on_grid(ran, 200)  # ...on the same grid
    assert len(seen) == len({m.id for m in seen})


async def test_periodic_is_written_when_a_worker_starts(make_settings: SettingsFactory) -> None:
    seen: list[QueueMessage] = []
    async with QueueService(make_settings()) as service:

        @service.periodic("heartbeat", every_s=0.2, limit=2, data={"k": 1}, attempts=4)
        async def heartbeat(message: QueueMessage) -> None:
            seen.append(message)

        assert service.handlers["heartbeat"].attempts == 4
        assert await service.schedules() == []  # declaring writes nothing
        await run_until(service, lambda: len(seen) >= 2)
        (info,) = await service.schedules()
        assert (info.name, info.data, info.attempts, info.runs) == ("heartbeat", {"k": 1}, 4, 2)
        # Another worker start finds it unchanged and leaves it (its limit is not reset).
        worker = asyncio.create_task(service.start_worker())
        await asyncio.sleep(0.7)
        service.stop()
        await worker
        assert len(seen) == 2
        (info,) = await service.schedules()
        assert info.runs == 2
        with pytest.raises(ConfigError, match="field 2"):
            service.periodic("bad", cron="0 99 * * *")


async def test_a_schedules_pending_job_survives_purge_and_refuses_remove(
    service: QueueService,
) -> None:
    await service.schedule(
        "keep", "tick", every_s=3600, start_at=datetime.now(UTC) + timedelta(hours=1)
    )
    await service.enqueue("other", delay_s=60)
    (pending, other) = sorted(await service.list_jobs(JobState.DELAYED), key=lambda j: j.name)
    assert pending.name == "tick" or other.name == "tick"
    job = pending if pending.name == "tick" else other
    with pytest.raises(ScheduleConflictError, match="schedule"):
        await service.remove(job.id)
    assert await service.purge() == 1
    assert [j.id for j in await service.list_jobs(JobState.DELAYED)] == [job.id]
    assert await service.unschedule("keep")
    assert await service.list_jobs(JobState.DELAYED) == []


async def test_moving_a_queue_carries_its_schedules(tmp_path: Path, redis_url: str) -> None:
    source = QueueService(QueueSettings(sqlite_path=str(tmp_path / "q.db"), name="m"))
    target_settings = QueueSettings(backend="bullmq", redis_url=redis_url, name=unique_queue_name())
    async with source, QueueService(target_settings) as target:
        later = datetime.now(UTC) + timedelta(hours=1)
        await source.schedule("nightly", "report", {"k": 1}, cron="0 3 * * *", tz="Asia/Tokyo")
        await source.schedule("beat", "tick", every_s=60, limit=5, start_at=later, attempts=4)
        dry = await source.move_to(target_settings, dry_run=True)
        assert dry.schedules == 2 and len(await source.schedules()) == 2
        report = await source.move_to(target_settings)
        assert report.schedules == 2 and report.total_moved == 0  # pending jobs went with them
        assert await source.schedules() == []
        assert sum((await source.counts()).values()) == 0
        moved = {each.id: each for each in await target.schedules()}
        assert (moved["nightly"].cron, moved["nightly"].tz, moved["nightly"].data) == (
            "0 3 * * *",
            "Asia/Tokyo",
            {"k": 1},
        )
        assert (moved["beat"].every_s, moved["beat"].limit, moved["beat"].attempts) == (60, 5, 4)
        assert moved["beat"].next_run_at is not None
        assert abs(moved["beat"].next_run_at - later) < timedelta(milliseconds=1)
        assert (await target.counts())[JobState.DELAYED] == 2
        for schedule_id in moved:
            await target.unschedule(schedule_id)


# -- real processes -------------------------------------------------------------------------------


def _ledger(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines()]


async def test_three_workers_killed_and_restarted_make_each_slot_once(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(lease_s=1.0)
    ledger = tmp_path / "ledger"
    env = python_env(
        QUEUE_BACKEND=settings.backend,
        QUEUE_NAME=settings.name,
        QUEUE_SQLITE_PATH=settings.sqlite_path,
        QUEUE_REDIS_URL=settings.redis_url,
        QUEUE_LEASE_S="1",
        QUEUE_SHUTDOWN_GRACE_S="2",
    )

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [PYTHON, str(ROOT / "tests" / "ledger_worker.py"), str(ledger)],
            env=env,
            stderr=subprocess.DEVNULL,
        )

    async def ready(count: int) -> None:
        deadline = time.monotonic() + 20
        while sum(1 for row in _ledger(ledger) if row[0] == "ready") < count:
            assert time.monotonic() < deadline, "workers did not start"
            await asyncio.sleep(0.05)

    async with QueueService(settings) as service:
        await service.counts()  # the schema exists before the workers race to create it
        workers = [spawn() for _ in range(3)]
        try:
            await ready(3)
            await service.schedule("beat", "record", every_s=0.5)
            started = time.monotonic()
            # Kills between slots: one landing in the instant between taking a slot's job
            # and writing the next (a Redis round trip on BullMQ) would idle the schedule
            # until the job's lease expires; see README, "Periodic jobs".
            kills = []
            for victim, at in ((0, 2.2), (1, 3.7)):
                await asyncio.sleep(at - (time.monotonic() - started))
                kills.append(time.time() * 1000)
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait(5)
                workers[victim] = spawn()
            await asyncio.sleep(6.0 - (time.monotonic() - started))
            assert await service.unschedule("beat")
            # A job its killed worker held runs again once its lease expires.
            deadline = time.monotonic() + 10
            while True:
                done = [row[1] for row in _ledger(ledger) if row[0] == "done"]
                ran = slots(done, "beat")
                expected = list(range(ran[0], ran[-1] + 1, 500)) if ran else []
                if ran and sorted(set(ran)) == expected:
                    break
                if time.monotonic() > deadline:
                    lost = sorted(set(expected) - set(ran))
                    jobs = [await service.get_job(f"repeat:beat:{ms}") for ms in lost]
                    raise AssertionError(
                        f"slots missing: {lost} of {ran[0]}..{ran[-1]} (kills at "
                        f"{[round(k) for k in kills]}): {jobs}; ledger: {_ledger(ledger)}"
                    )
                await asyncio.sleep(0.1)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                worker.wait(15)
    per_slot = collections.Counter(ran)
    assert len(per_slot) >= 10, ran  # about 6 s of half-second slots
    assert set(per_slot.values()) == {1}, per_slot  # each slot made and run once
    assert gaps(sorted(per_slot)) == {500}  # no gap: some worker always lived
    workers_used = {row[3] for row in _ledger(ledger) if row[0] == "done"}
    assert len(workers_used) >= 3


# -- Node.js interop (the BullMQ backend) --------------------------------------------------------


async def node(script: str, args: dict[str, Any], timeout_s: float = 30.0) -> Any:
    process = await asyncio.create_subprocess_exec(
        "node",
        script,
        json.dumps(args),
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout.decode().strip().split("\n")[-1])


@pytest.fixture(scope="session")
def node_bullmq() -> Path:
    """tests/node with its packages installed (test_interop checks the pinned versions)."""
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "bullmq").exists():
        missing("Node.js and `npm ci` in tests/node are needed for the cron and interop tests")
    return NODE_DIR


@pytest.mark.node
@pytest.mark.parametrize("backend_kind", ["bullmq"])
async def test_node_lists_a_corral_schedule_and_keeps_it_going(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    where = {"url": settings.redis_url, "queue": settings.name, "prefix": settings.prefix}
    async with QueueService(settings) as service:
        await service.schedule("c1", "tick", {"a": 1}, every_s=0.3, limit=5, attempts=2)
        await service.schedule("c2", "tock", cron="* * * * * *", tz="Europe/Lisbon", limit=3)
        listed = await node("schedulers.mjs", {**where, "action": "list"})
        by_key = {each["key"]: each for each in listed["schedulers"]}
        assert listed["count"] == 2
        assert by_key["c1"]["every"] == 300 and by_key["c1"]["limit"] == 5
        assert by_key["c1"]["template"]["data"] == {"a": 1}
        assert by_key["c1"]["template"]["opts"]["attempts"] == 2
        assert (by_key["c2"]["pattern"], by_key["c2"]["tz"]) == ("* * * * * *", "Europe/Lisbon")
        ran = await node("worker.mjs", {**where, "expect": 8, "timeoutMs": 15000}, 30)
        assert not ran["timedOut"]
        ids = [run["id"] for run in ran["runs"]]
        tick, tock = slots(ids, "c1"), slots(ids, "c2")
        assert len(tick) == 5 and len(tock) == 3  # each limit, made by the Node worker
        assert on_grid(tick, 300) and on_grid(tock, 1000)
        assert {run["opts"]["attempts"] for run in ran["runs"] if run["name"] == "tick"} == {2}
        infos = {each.id: each for each in await service.schedules()}
        assert (infos["c1"].runs, infos["c2"].runs) == (5, 3)
        assert infos["c1"].next_run_at is None and infos["c2"].next_run_at is None


@pytest.mark.node
@pytest.mark.parametrize("backend_kind", ["bullmq"])
async def test_corral_runs_a_node_scheduler_and_keeps_it_going(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    where = {"url": settings.redis_url, "queue": settings.name, "prefix": settings.prefix}
    template = {"name": "tick", "data": {"a": 1}, "opts": {"attempts": 2, "backoff": 100}}
    await node(
        "schedulers.mjs",
        {
            **where,
            "action": "upsert",
            "id": "n1",
            "repeat": {"every": 300, "limit": 5},
            "template": template,
        },
    )
    await node(
        "schedulers.mjs",
        {
            **where,
            "action": "upsert",
            "id": "n2",
            "repeat": {"pattern": "* * * * * *", "tz": "America/New_York", "limit": 2},
            "template": {"name": "tock", "data": {"b": 2}},
        },
    )
    async with QueueService(settings) as service:
        listed = {each.id: each for each in await service.schedules()}
        assert (listed["n1"].every_s, listed["n1"].limit, listed["n1"].attempts) == (0.3, 5, 2)
        assert (listed["n2"].cron, listed["n2"].tz) == ("* * * * * *", "America/New_York")
        ticks, tocks = recorder(service, "tick"), recorder(service, "tock")
        await run_until(service, lambda: len(ticks) >= 5 and len(tocks) >= 2)
        await asyncio.sleep(0.5)
        tick, tock = slots([m.id for m in ticks], "n1"), slots([m.id for m in tocks], "n2")
        assert len(tick) == 5 and len(tock) == 2
        assert on_grid(tick, 300) and on_grid(tock, 1000)
        assert {(m.max_attempts, m.backoff) for m in ticks} == {(2, Retry.fixed(0.1))}
        assert {json.dumps(m.data) for m in tocks} == {'{"b": 2}'}
    listed = await node("schedulers.mjs", {**where, "action": "list"})
    counts = {each["key"]: each["iterationCount"] for each in listed["schedulers"]}
    assert counts == {"n1": 5, "n2": 2}
