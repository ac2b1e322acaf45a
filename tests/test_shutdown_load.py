"""SIGTERM with 200 jobs in flight: no job lost, no claim after the signal, a bounded exit, and
the unfinished jobs run again on the next worker. Against both backends, real processes."""

from __future__ import annotations

import asyncio
import collections
import random
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from corral import JobState, QueueService
from corral.tools.chaos import JOB_NAME, TASK_MODULE, settings_env

from conftest import PYTHON, SettingsFactory, python_env

TOTAL_JOBS = 320
CONCURRENCY = 200
GRACE_S = 1.5
EXIT_MARGIN_S = 3.0
SIGNAL_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) INFO .*SIGTERM received: claiming no more jobs",
    re.MULTILINE,
)


def read_ledger(path: Path) -> list[tuple[str, str, int, int]]:
    """``(event, job id, pid, unix time ns)`` per line."""
    rows = []
    for line in path.read_text().splitlines():
        event, job_id, _attempt, pid, at_ns = line.split()
        rows.append((event, job_id, int(pid), int(at_ns)))
    return rows


def worker(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [PYTHON, "-m", "corral.worker", TASK_MODULE, "--log-level", "info", *extra],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def signal_seen_ns(log: Path) -> int:
    """When the worker handled SIGTERM, from its own log line (local time, ms, rounded down)."""
    found = SIGNAL_LINE.search(log.read_text())
    assert found, log.read_text()[-2000:]
    moment = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")
    return int(moment.timestamp()) * 10**9 + int(found.group(2)) * 10**6


@pytest.mark.slow
async def test_sigterm_under_load_loses_nothing(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(
        concurrency=CONCURRENCY, shutdown_grace_s=GRACE_S, lease_s=10.0, keep_completed=None
    )
    ledger, log = tmp_path / "ledger", tmp_path / "worker.log"
    ledger.touch()
    env = python_env(**settings_env(settings))
    rng = random.Random(5)
    async with QueueService(settings) as service:
        ids = await service.enqueue_many(
            [
                {"name": JOB_NAME, "data": {"ledger": str(ledger), "ms": rng.randint(500, 3000)}}
                for _ in range(TOTAL_JOBS)
            ]
        )
        first = worker(env, log)
        try:
            # Every slot busy, and some jobs already finished and replaced by new claims.
            deadline = time.monotonic() + 30
            while sum(1 for row in read_ledger(ledger) if row[0] == "start") < CONCURRENCY + 20:
                assert first.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the worker never had 200 jobs in flight"
                await asyncio.sleep(0.02)
            rows = read_ledger(ledger)
            in_flight = len(
                {r[1] for r in rows if r[0] == "start"} - {r[1] for r in rows if r[0] == "done"}
            )
            assert in_flight >= CONCURRENCY - 20
            sent = time.monotonic()
            first.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(first.wait, GRACE_S + 20)
            exit_after_s = time.monotonic() - sent
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        assert code == 0, log.read_text()[-2000:]
        assert exit_after_s <= GRACE_S + EXIT_MARGIN_S, exit_after_s

        seen_ns = signal_seen_ns(log)
        rows = read_ledger(ledger)
        assert {r[2] for r in rows} == {first.pid}
        # No job started after the worker handled the signal (the log's clock rounds down).
        late = [r for r in rows if r[0] == "start" and r[3] >= seen_ns + 1_000_000]
        assert late == []
        started = collections.Counter(r[1] for r in rows if r[0] == "start")
        done = collections.Counter(r[1] for r in rows if r[0] == "done")
        finished_in_grace = [r for r in rows if r[0] == "done" and r[3] >= seen_ns + 1_000_000]
        released = set(started) - set(done)
        # Both phases happened: jobs finished within the grace period, others were released.
        assert finished_in_grace and released

        counts = await service.counts()
        assert counts[JobState.ACTIVE] == counts[JobState.FAILED] == 0
        assert counts[JobState.COMPLETED] == len(done)
        assert counts[JobState.WAITING] == TOTAL_JOBS - len(done)
        for job_id in released:
            job = await service.get_job(job_id)
            assert job is not None and job.state is JobState.WAITING, job
            assert job.attempts_made == 0  # a release does not use an attempt
        for job_id in done:
            job = await service.get_job(job_id)
            assert job is not None and job.state is JobState.COMPLETED

        second = worker(env, log, "--burst")
        try:
            assert await asyncio.to_thread(second.wait, 60) == 0, log.read_text()[-2000:]
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
        counts = await service.counts()
        assert counts[JobState.COMPLETED] == TOTAL_JOBS
        assert sum(counts.values()) == TOTAL_JOBS
        rows = read_ledger(ledger)
        done = collections.Counter(r[1] for r in rows if r[0] == "done")
        assert set(done) == set(ids) and set(done.values()) == {1}  # each ran to the end once
        rerun = {r[1] for r in rows if r[0] == "start" and r[2] == second.pid}
        assert released <= rerun
