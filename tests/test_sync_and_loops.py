"""Producers as real applications run them: many threads calling enqueue_sync (a threaded
Django/Flask server), and one service used from several event loops (asyncio.run per command,
pytest's per-test loops)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from corral import JobState, QueueService

from conftest import PYTHON, SettingsFactory, python_env

THREADS_SCRIPT = """
import json, os, sys, threading
from corral import QueueService, QueueSettings

settings = QueueSettings(**json.loads(sys.argv[1]))
service = QueueService(settings)

def fds():
    return len(os.listdir("/proc/self/fd"))

def sync_threads():
    return sum(1 for t in threading.enumerate() if t.name == "corral-sync")

before = fds()
ids = []
lock = threading.Lock()
start = threading.Barrier(16)

def produce(n):
    start.wait()  # all threads make their first call at once, as a server's first burst does
    mine = [service.enqueue_sync("job", {"n": n, "i": i}) for i in range(100)]
    with lock:
        ids.extend(mine)

threads = [threading.Thread(target=produce, args=(n,)) for n in range(16)]
for t in threads: t.start()
for t in threads: t.join()
during = {"threads": sync_threads(), "fds": fds() - before}
import asyncio
asyncio.run(service.close())
after = {"threads": sync_threads(), "fds": fds() - before}
print(json.dumps({"ids": len(set(ids)), "during": during, "after": after}))
"""


def test_enqueue_sync_from_many_threads_uses_one_loop_and_closes_it(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings()
    values = settings.model_dump(context={"reveal_secrets": True})
    done = subprocess.run(
        [PYTHON, "-c", THREADS_SCRIPT, json.dumps(values)],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ids"] == 1600
    assert report["during"]["threads"] == 1
    # One loop (its selector and self-pipe) and one connection (a socket; a file and its WAL
    # and shared-memory files on SQLite), however many threads called at once: a handful,
    # where a loop per thread held 80 and more.
    assert report["during"]["fds"] <= 8
    assert report["after"]["threads"] == 0
    assert report["after"]["fds"] <= 0
    assert "Task was destroyed" not in done.stderr
    assert "Traceback" not in done.stderr

    async def count() -> int:
        async with QueueService(settings) as service:
            return (await service.counts())[JobState.WAITING]

    assert asyncio.run(count()) == 1600


def test_one_service_works_on_several_event_loops(make_settings: SettingsFactory) -> None:
    service = QueueService(make_settings())
    job_id = asyncio.run(service.enqueue("x", 1))
    for _ in range(3):  # each asyncio.run is a new loop; the previous one is closed
        counts = asyncio.run(service.counts())
        assert counts[JobState.WAITING] == 1
        job = asyncio.run(service.get_job(job_id))
        assert job is not None and job.data == 1
    asyncio.run(service.enqueue("x", 2))
    assert asyncio.run(service.counts())[JobState.WAITING] == 2
    asyncio.run(service.close())
