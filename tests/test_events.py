"""A queue's events (``service.events()``, ``corral events``) on both backends: BullMQ's names and
fields in the same order, resuming with ``since=``, readers that do not hold up workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from corral import ConfigError, Event, QueueMessage, QueueService, QueueSettings

from conftest import PYTHON, SettingsFactory, finished, python_env, run_worker_until

pytestmark = pytest.mark.timeout(60)


async def newest(service: QueueService) -> str:
    feed = await service.backend.open_events()
    try:
        return await feed.last_id()
    finally:
        await feed.aclose()


async def stored(service: QueueService, since: str, job_id: str | None = None) -> list[Any]:
    """``(name, fields)`` of the events after ``since`` (of ``job_id`` only, if given)."""
    return [
        (event.name, event.fields)
        async for event in service.events(since=since, follow=False)
        if job_id is None or event.job_id == job_id
    ]


async def test_the_events_of_a_job_that_fails_once_then_completes(service: QueueService) -> None:
    @service.handler("flaky")
    async def flaky(message: QueueMessage) -> dict[str, int]:
        await message.progress(50)
        if message.attempt == 1:
            raise RuntimeError("not yet")
        return {"attempt": message.attempt}

    @service.handler("bad")
    async def bad(message: QueueMessage) -> None:
        raise ValueError("never")

    since = await newest(service)
    flaky_id = await service.enqueue("flaky", attempts=2)
    bad_id = await service.enqueue("bad", delay_s=0.05)
    await run_worker_until(service, finished(service, 2), timeout_s=10)

    assert await stored(service, since, flaky_id) == [
        ("added", {"name": "flaky"}),
        ("waiting", {}),
        ("active", {"prev": "waiting"}),
        ("progress", {"data": "50"}),
        ("waiting", {"prev": "active"}),  # the retry, as BullMQ's retryJob writes it
        ("active", {"prev": "waiting"}),
        ("progress", {"data": "50"}),
        ("completed", {"returnvalue": '{"attempt":2}', "prev": "active"}),
    ]
    events = await stored(service, since, bad_id)
    delay = events[1][1]["delay"]
    assert events == [
        ("added", {"name": "bad"}),
        ("delayed", {"delay": delay}),
        ("waiting", {"prev": "delayed"}),
        ("active", {"prev": "waiting"}),
        ("failed", {"failedReason": "ValueError: never", "prev": "active"}),
        ("retries-exhausted", {"attemptsMade": "1"}),
    ]
    info = await service.get_job(bad_id)
    assert info is not None and abs(int(delay) - info.enqueued_at.timestamp() * 1000 - 50) < 5

    await service.pause()
    await service.resume()
    assert await service.remove(await service.enqueue("flaky"))
    names = [(event.name, event.job_id) async for event in service.events(since, follow=False)]
    assert names[-5:] == [
        ("paused", None),
        ("resumed", None),
        ("added", names[-1][1]),
        ("waiting", names[-1][1]),
        ("removed", names[-1][1]),
    ]


async def test_resuming_with_since_loses_nothing(service: QueueService) -> None:
    @service.handler("job")
    async def job(message: QueueMessage) -> int:
        return int(message.data)

    since = await newest(service)
    ids = await service.enqueue_many([{"name": "job", "data": n} for n in range(30)])
    worker = asyncio.create_task(service.start_worker(concurrency=5))
    seen: list[Event] = []
    try:
        # One reader stops after 10, another resumes from the last one it saw.
        async with contextlib.aclosing(service.events(since, names={"completed"})) as first:
            async for event in first:
                seen.append(event)
                if len(seen) == 10:
                    break
        async with contextlib.aclosing(service.events(seen[-1].id, names=["completed"])) as more:
            async for event in more:
                seen.append(event)
                if len(seen) == 30:
                    break
    finally:
        service.stop()
        await asyncio.wait_for(worker, 15)
    assert sorted(event.job_id or "" for event in seen) == sorted(ids)
    assert {event.name for event in seen} == {"completed"}
    assert len({event.id for event in seen}) == 30


async def test_a_slow_reader_does_not_hold_up_the_worker(service: QueueService) -> None:
    @service.handler("job")
    async def job(message: QueueMessage) -> None:
        return None

    since = await newest(service)
    read: list[Event] = []

    async def slow_reader() -> None:
        async for event in service.events(since):
            read.append(event)
            await asyncio.sleep(0.5)

    reader = asyncio.create_task(slow_reader())
    try:
        await service.enqueue_many([{"name": "job"} for _ in range(40)])
        await run_worker_until(service, finished(service, 40), timeout_s=10)
        assert len(read) < 40 * 4  # the reader is far behind the 160 events; jobs all ran
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    assert len([event async for event in service.events(since, follow=False)]) >= 160


async def test_bad_positions_and_names_are_refused(service: QueueService) -> None:
    for since in ("abc", "1-2-3", ""):
        with pytest.raises(ConfigError, match="is not an event id"):
            await anext(service.events(since, follow=False))
    with pytest.raises(ConfigError, match="event names must be non-empty strings"):
        service.events(names=["completed", ""])


@pytest.mark.parametrize("backend_kind", ["sqlite"])
async def test_sqlite_keeps_about_events_max_len_events(make_settings: SettingsFactory) -> None:
    settings = make_settings(events_max_len=100)
    async with QueueService(settings) as service:
        for _ in range(150):  # a row (two events) each, in 150 commits: trimmed every 64
            await service.enqueue("job")
        kept = [event async for event in service.events("0", follow=False)]
    rows = sorted({int(event.id.split("-")[0]) for event in kept})
    assert 100 <= len(rows) < 100 + 64
    assert rows == list(range(151 - len(rows), 151))  # the newest, with no gap
    assert [event.name for event in kept[:2]] == ["added", "waiting"]


def test_corral_events_prints_what_is_stored(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"

    async def prepare() -> str:
        async with QueueService(QueueSettings(sqlite_path=str(db))) as service:
            return await service.enqueue("hello", {"to": "ada"})

    job_id = asyncio.run(prepare())

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "corral", "events", *args],
            env=python_env(QUEUE_SQLITE_PATH=str(db)),
            capture_output=True,
            text=True,
            timeout=60,
        )

    as_json = corral("--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == [
        {"id": "1-0", "name": "added", "job_id": job_id, "fields": {"name": "hello"}},
        {"id": "1-1", "name": "waiting", "job_id": job_id, "fields": {}},
    ]
    text = corral("--since", "1-0")
    assert (text.returncode, text.stdout) == (0, f"1-1  waiting  job {job_id}\n")
    bad = corral("--since", "x")
    assert bad.returncode == 2 and "is not an event id" in bad.stderr


def test_corral_events_follow_prints_new_events_until_interrupted(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    settings = QueueSettings(sqlite_path=str(db))

    async def enqueue() -> str:
        async with QueueService(settings) as service:
            return await service.enqueue("hello")

    async def position() -> str:
        async with QueueService(settings) as service:
            await service.enqueue("hello")  # before the position: not printed
            return await newest(service)

    since = asyncio.run(position())
    follower = subprocess.Popen(
        [PYTHON, "-m", "corral", "events", "--follow", "--since", since, "--json", "-n", "added"],
        env=python_env(QUEUE_SQLITE_PATH=str(db)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = asyncio.run(enqueue())
        assert follower.stdout is not None
        assert since == "1"  # one row: the first job's added and waiting
        assert json.loads(follower.stdout.readline()) == {
            "id": "2-0",
            "name": "added",
            "job_id": job_id,
            "fields": {"name": "hello"},
        }
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 130
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
