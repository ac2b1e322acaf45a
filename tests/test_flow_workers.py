"""Flows run by worker processes: a tree across two queues served by separate processes, and a
child whose worker is killed (SIGKILL) mid-run; on both backends."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import FlowJob, FlowNode, JobInfo, JobState, QueueService, QueueSettings

from conftest import PYTHON, SettingsFactory, python_env

pytestmark = pytest.mark.timeout(120)


class Workers:
    """``python -m corral.worker flow_tasks --queue Q`` processes on the test's storage."""

    def __init__(self, settings: QueueSettings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, queue: str) -> subprocess.Popen[bytes]:
        s = self.settings
        env = python_env(
            QUEUE_BACKEND=s.backend,
            QUEUE_SQLITE_PATH=s.sqlite_path,
            QUEUE_REDIS_URL=s.redis_url,
            QUEUE_NAME=queue,
            QUEUE_LEASE_S=str(s.lease_s),
            QUEUE_ATTEMPTS="1",
            QUEUE_LOG_LEVEL="info",
        )
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [PYTHON, "-m", "corral.worker", "flow_tasks", "--queue", queue],
            env=env,
            cwd=self.tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.tmp_path.glob("worker-*.log"))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def workers(make_settings: SettingsFactory, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(make_settings(lease_s=1.0), tmp_path)
    yield group
    group.stop()


async def settled(service: QueueService, node: FlowNode, workers: Workers) -> JobInfo:
    deadline = time.monotonic() + 60
    while True:
        info = await service.backend.for_queue(node.queue).get_job(node.id)
        if info is not None and info.state in (JobState.COMPLETED, JobState.FAILED):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"flow not settled within 60 s: {info}\n{workers.logs()}")
        await asyncio.sleep(0.05)


def events(out: Path) -> list[tuple[str, str, str, str]]:
    """``(event, job id, pid, detail)`` per trace line, in the order they were written."""
    found = []
    for line in out.read_text().splitlines():
        event, job_id, pid, *detail = line.split(" ", 3)
        found.append((event, job_id, pid, detail[0] if detail else ""))
    return found


async def test_three_levels_across_two_queues_in_worker_processes(
    workers: Workers, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = workers.settings
    other = make_settings(name=f"{settings.name}-b").name
    out = str(tmp_path / "trace.txt")

    def part(n: int, queue: str) -> FlowJob:
        return FlowJob("part", {"n": n, "out": out}, queue=queue)

    async with QueueService(settings) as service:
        flow = await service.enqueue_flow(
            FlowJob(
                "assemble",
                {"out": out},
                children=[
                    part(1, settings.name),
                    FlowJob(
                        "assemble",
                        {"out": out},
                        queue=other,
                        children=[part(2, settings.name), part(3, other)],
                    ),
                    part(4, other),
                ],
            )
        )
        a, b = workers.start(settings.name), workers.start(other)
        root = await settled(service, flow, workers)

    assert root.state is JobState.COMPLETED, root.error
    assert root.result == 10 + (20 + 30) + 40
    trace = events(Path(out))
    mid = flow.children[1]
    assembled = [(job_id, pid) for event, job_id, pid, _ in trace if event == "assemble"]
    assert assembled == [(mid.id, str(b.pid)), (flow.id, str(a.pid))]  # each once, in order
    ends = {job_id: i for i, (event, job_id, _, _) in enumerate(trace) if event == "end"}
    starts = [i for i, (event, _, _, _) in enumerate(trace) if event == "assemble"]
    assert max(ends[n.id] for n in mid.children) < starts[0]
    assert max(ends[n.id] for n in (flow.children[0], flow.children[2])) < starts[1]
    # The processes split the work by queue.
    ran_in = {job_id: pid for event, job_id, pid, _ in trace if event == "end"}
    assert ran_in[flow.children[0].id] == ran_in[mid.children[0].id] == str(a.pid)
    assert ran_in[mid.children[1].id] == ran_in[flow.children[2].id] == str(b.pid)


async def test_a_parent_runs_once_its_killed_child_has_run_again(
    workers: Workers, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = workers.settings
    other = make_settings(name=f"{settings.name}-b").name
    out = tmp_path / "trace.txt"
    async with QueueService(settings) as service:
        flow = await service.enqueue_flow(
            FlowJob(
                "assemble",
                {"out": str(out)},
                children=[
                    FlowJob("part", {"n": 1, "out": str(out)}),
                    FlowJob("part", {"n": 2, "out": str(out), "hang_once": True}, queue=other),
                ],
            )
        )
        hanging = flow.children[1]
        workers.start(settings.name)
        doomed = workers.start(other)
        deadline = time.monotonic() + 30
        while not (out.exists() and f"start {hanging.id} {doomed.pid}" in out.read_text()):
            assert time.monotonic() < deadline, workers.logs()
            await asyncio.sleep(0.05)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(10)
        assert (await service.backend.for_queue(flow.queue).get_job(flow.id)).state is (  # type: ignore[union-attr]
            JobState.WAITING_CHILDREN
        )
        again = workers.start(other)
        root = await settled(service, flow, workers)

    assert root.state is JobState.COMPLETED, root.error
    assert root.result == 10 + 20
    trace = events(out)
    starts = [pid for event, job_id, pid, _ in trace if event == "start" and job_id == hanging.id]
    assert starts == [str(doomed.pid), str(again.pid)]
    assembled = [detail for event, job_id, _, detail in trace if event == "assemble"]
    assert len(assembled) == 1 and re.search(rf'"{hanging.id}": 20', assembled[0])
