"""Sync handlers isolated in child processes: killed at timeout_s and retried, a crash fails its
attempt and not the worker, results and errors come back. Both backends, real processes."""

from __future__ import annotations

import os
from typing import Any

import pytest

import isolated_tasks
from corral import ConfigError, JobState, QueueService, QueueSettings

from conftest import SettingsFactory, finished, run_worker_until

pytestmark = pytest.mark.timeout(60)


async def test_isolated_handlers_time_out_crash_and_answer(make_settings: SettingsFactory) -> None:
    service = QueueService(make_settings(attempts=1))
    handle = service.handler
    handle("spin", isolate=True, timeout_s=0.5, attempts=2)(isolated_tasks.spin)
    handle("exit", isolate=True)(isolated_tasks.hard_exit)
    handle("segv", isolate=True)(isolated_tasks.segfault)
    handle("double", isolate=True)(isolated_tasks.double)
    handle("refuse", isolate=True)(isolated_tasks.refuse)
    handle("unencodable", isolate=True)(isolated_tasks.unencodable)
    ids: dict[str, Any] = {}
    for name in ("spin", "exit", "segv", "refuse", "unencodable"):
        ids[name] = await service.enqueue(name, {"n": 1})
    ids["double"] = [await service.enqueue("double", {"n": n}) for n in range(6)]

    await run_worker_until(service, finished(service, 11), concurrency=3, timeout_s=30)
    jobs = {name: await service.get_job(ids[name]) for name in ids if name != "double"}
    doubles = [await service.get_job(job_id) for job_id in ids["double"]]
    await service.close()

    for job in doubles:
        assert job is not None and job.state is JobState.COMPLETED
    assert [job.result["twice"] for job in doubles] == [0, 2, 4, 6, 8, 10]  # type: ignore[index]
    pids = {job.result["pid"] for job in doubles}  # type: ignore[index]
    assert os.getpid() not in pids
    assert len(pids) <= 3 + 3  # children are reused (one per slot, plus the replacements)

    spin = jobs["spin"]
    assert spin is not None and spin.state is JobState.FAILED
    assert spin.attempts_made == 2  # killed at the timeout and retried, killed again
    assert "HandlerTimeoutError" in (spin.error or "") and "killed" in (spin.error or "")
    exited = jobs["exit"]
    assert exited is not None and exited.state is JobState.FAILED
    assert "HandlerCrashError" in (exited.error or "")
    assert "exited with code 3" in (exited.error or "")
    segv = jobs["segv"]
    assert segv is not None and segv.state is JobState.FAILED
    assert "SIGSEGV" in (segv.error or "")
    refused = jobs["refuse"]
    assert refused is not None and refused.state is JobState.FAILED
    assert refused.error == "ValueError: no good: {'n': 1}"
    assert "isolated_tasks.py" in (refused.traceback or "")  # the child's own traceback
    bad = jobs["unencodable"]
    assert bad is not None and bad.state is JobState.FAILED
    assert "not JSON-serialisable" in (bad.error or "")


def test_isolate_sync_setting_and_bad_handlers(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "q.db")
    monkeypatch.setenv("QUEUE_ISOLATE_SYNC", "true")
    service = QueueService(QueueSettings(sqlite_path=path))
    service.handler("double")(isolated_tasks.double)
    service.handler("threaded", isolate=False)(isolated_tasks.refuse)

    @service.handler("async")
    async def not_isolated(message: object) -> None: ...

    assert service.handlers["double"].isolate
    assert not service.handlers["threaded"].isolate
    assert not service.handlers["async"].isolate
    plain = QueueService(QueueSettings(sqlite_path=path, isolate_sync=False))
    plain.handler("double")(isolated_tasks.double)
    assert not plain.handlers["double"].isolate

    with pytest.raises(ConfigError, match="is async"):

        @plain.handler("a", isolate=True)
        async def on_loop(message: object) -> None: ...

    with pytest.raises(ConfigError, match="top level of a module"):

        @plain.handler("b", isolate=True)
        def local(message: object) -> None: ...
