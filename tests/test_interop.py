"""corral and Node.js BullMQ (pinned in tests/node/package.json) on the same queues.

Each test drives a small Node script (tests/node/*.mjs) with JSON on argv and reads JSON from its
stdout, against the machine's Redis: Node producer -> corral worker, corral producer -> Node
worker, and Node's view (counts, getWorkers, state, progress, results) of a running corral worker.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from corral import (
    Deduplication,
    FlowJob,
    JobFailedError,
    JobState,
    QueueMessage,
    QueueService,
    Retry,
)
from corral.backends.bullmq import LIB_VERSION

from conftest import SettingsFactory, finished, missing, run_worker_until

pytestmark = pytest.mark.node

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_BULLMQ_VERSION = "6.7.0"


@pytest.fixture
def backend_kind() -> str:
    """These tests are about the BullMQ backend only."""
    return "bullmq"


@pytest.fixture(scope="session")
def node_bullmq() -> Path:
    """tests/node with its pinned packages installed (``npm ci`` from the committed lock)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing("Node.js and npm are needed for the BullMQ interop tests")
    installed = NODE_DIR / "node_modules" / "bullmq" / "package.json"
    if not installed.exists():
        result = subprocess.run(
            [str(npm), "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            missing(f"npm ci failed in {NODE_DIR}: {result.stderr.strip()[-500:]}")
    version = json.loads(installed.read_text())["version"]
    assert version == NODE_BULLMQ_VERSION, f"tests/node has bullmq {version}; run npm ci there"
    return NODE_DIR


async def run_node(script: str, args: dict[str, Any], *, timeout_s: float = 30.0) -> Any:
    """Run ``tests/node/<script>`` without blocking the event loop; return its JSON output."""
    process = await asyncio.create_subprocess_exec(
        "node",
        script,
        json.dumps(args),
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"node {script} did not finish within {timeout_s}s") from None
    if process.returncode != 0:
        raise AssertionError(f"node {script} exited {process.returncode}: {stderr.decode()}")
    # split("\n"), not splitlines(): U+2028 in a payload is a line break to splitlines().
    return json.loads(stdout.decode().strip().split("\n")[-1])


def node_args(settings: Any, **extra: Any) -> dict[str, Any]:
    return {"url": settings.redis_url, "queue": settings.name, "prefix": settings.prefix, **extra}


PAYLOAD = {"text": "héllo ✓ \u2028", "n": [1, 2.5, -3], "deep": {"a": None, "b": [True, {}]}}


async def test_node_producer_to_corral_worker(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    jobs = [
        {"name": "echo", "data": PAYLOAD},
        {"name": "flaky", "data": {"k": 1}, "opts": {"attempts": 3, "backoff": 200}},
        {
            "name": "jittery",
            "data": 2,
            "opts": {
                "attempts": 2,
                "backoff": {"type": "exponential", "delay": 300, "jitter": 0.5},
            },
        },
        {"name": "later", "data": "x", "opts": {"delay": 400}},
        {"name": "prio", "data": 3, "opts": {"priority": 3}},
        {"name": "prio", "data": 1, "opts": {"priority": 1}},
    ]
    produced = await run_node("producer.mjs", node_args(settings, jobs=jobs))
    names = ["echo", "flaky", "jittery", "later", "prio3", "prio1"]
    ids = dict(zip(names, produced["ids"], strict=True))

    seen: list[tuple[QueueMessage, float]] = []
    async with QueueService(settings) as service:

        async def record(message: QueueMessage) -> Any:
            seen.append((message, time.time()))
            if message.name == "flaky" and message.attempt < 3:
                raise RuntimeError(f"attempt {message.attempt}")
            if message.name == "jittery":
                raise RuntimeError("always")
            return {"got": message.data}

        for name in ("echo", "flaky", "jittery", "later", "prio"):
            service.handler(name)(record)
        await run_worker_until(service, finished(service, 6), concurrency=1, timeout_s=20)

        by_name: dict[str, list[tuple[QueueMessage, float]]] = {}
        for message, at in seen:
            by_name.setdefault(message.name, []).append((message, at))
        echo, _ = by_name["echo"][0]
        assert (echo.id, echo.data, echo.attempt, echo.max_attempts) == (ids["echo"], PAYLOAD, 1, 1)

        flaky = by_name["flaky"]
        assert [m.attempt for m, _ in flaky] == [1, 2, 3]
        assert flaky[0][0].max_attempts == 3 and flaky[0][0].backoff == Retry("fixed", 200)
        gaps = [b - a for (_, a), (_, b) in itertools.pairwise(flaky)]
        assert all(0.2 <= gap < 0.2 + 0.3 for gap in gaps), gaps

        jittery = by_name["jittery"]
        assert jittery[0][0].backoff == Retry("exponential", 300, 0.5)
        gap = jittery[1][1] - jittery[0][1]
        assert 0.15 <= gap < 0.3 + 0.25, gap  # jitter 0.5 of 300 ms: [150, 300) ms

        later, later_at = by_name["later"][0]
        assert later_at >= later.enqueued_at.timestamp() + 0.4

        # Priority 0 first (FIFO), then priority 1 before 3; "later" was delayed meanwhile.
        order = [(m.name, m.data) for m, _ in seen if m.attempt == 1 and m.name != "later"]
        expected = [("echo", PAYLOAD), ("flaky", {"k": 1}), ("jittery", 2), ("prio", 1)]
        assert order == [*expected, ("prio", 3)]

        flaky_job = await service.get_job(ids["flaky"])
        assert flaky_job is not None
        assert (flaky_job.state, flaky_job.attempts_made, flaky_job.result) == (
            JobState.COMPLETED,
            3,
            {"got": {"k": 1}},
        )
        jittery_job = await service.get_job(ids["jittery"])
        assert jittery_job is not None and jittery_job.state == JobState.FAILED

    # Node reads back what corral recorded.
    view = await run_node("inspect.mjs", node_args(settings, jobIds=list(ids.values())))
    assert view["jobs"][ids["flaky"]]["returnvalue"] == {"got": {"k": 1}}
    assert view["jobs"][ids["flaky"]]["attemptsMade"] == 3
    jittery_view = view["jobs"][ids["jittery"]]
    assert (jittery_view["state"], jittery_view["failedReason"]) == (
        "failed",
        "RuntimeError: always",
    )
    assert len(jittery_view["stacktrace"]) == 2 and "RuntimeError" in jittery_view["stacktrace"][-1]
    assert view["counts"]["completed"] == 5 and view["counts"]["failed"] == 1
    # corral's worker counted its jobs in BullMQ's metrics, as a Node worker with the metrics
    # option does: retries are not counted, finished jobs are.
    metrics = view["metrics"]
    assert (metrics["completed"]["meta"]["count"], metrics["failed"]["meta"]["count"]) == (5, 1)


async def test_corral_producer_to_node_worker(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    async with QueueService(settings) as service:
        enqueued_at = time.time()
        echo = await service.enqueue("echo", PAYLOAD)
        flaky = await service.enqueue("flaky", {"k": 1}, attempts=3, backoff=Retry.fixed(0.2))
        boom = await service.enqueue(
            "boom", [1], attempts=2, backoff=Retry.exponential(0.1, jitter=0.5)
        )
        later = await service.enqueue("later", "x", delay_s=0.4)
        p3 = await service.enqueue("prio", 3, priority=3)
        p1 = await service.enqueue("prio", 1, priority=1)

        out = await run_node(
            "worker.mjs",
            node_args(
                settings,
                expect=6,
                timeoutMs=15000,
                behaviours={"flaky": {"failUntilAttempt": 3}, "boom": {"fail": "boom from node"}},
                maxDataPoints=60,
            ),
        )
        assert not out["timedOut"], out
        runs: dict[str, list[dict[str, Any]]] = {}
        for run in out["runs"]:
            runs.setdefault(run["id"], []).append(run)

        # Node sees the name and data exactly as corral enqueued them, and BullMQ's options.
        assert (runs[echo][0]["name"], runs[echo][0]["data"]) == ("echo", PAYLOAD)
        assert runs[flaky][0]["opts"]["attempts"] == 3
        assert runs[flaky][0]["opts"]["backoff"] == {"type": "fixed", "delay": 200}
        assert runs[boom][0]["opts"]["backoff"] == {
            "type": "exponential",
            "delay": 100,
            "jitter": 0.5,
        }
        assert runs[p3][0]["priority"] == 3

        # ... and honours them.
        flaky_starts = [r["startedAt"] for r in runs[flaky]]
        assert [r["attempt"] for r in runs[flaky]] == [1, 2, 3]
        assert all(200 <= b - a < 200 + 300 for a, b in itertools.pairwise(flaky_starts))
        boom_gap = runs[boom][1]["startedAt"] - runs[boom][0]["startedAt"]
        assert 50 <= boom_gap < 100 + 250, boom_gap
        assert runs[later][0]["startedAt"] >= enqueued_at * 1000 + 400
        first_runs = sorted(out["runs"], key=lambda r: r["startedAt"])
        order = [r["id"] for r in first_runs if r["attempt"] == 1 and r["id"] != later]
        assert order == [echo, flaky, boom, p1, p3]

        # What Node recorded, read back through corral.
        echo_job = await service.get_job(echo)
        assert echo_job is not None
        assert (echo_job.state, echo_job.result, echo_job.attempts_made) == (
            JobState.COMPLETED,
            {"echo": PAYLOAD, "attempt": 1},
            1,
        )
        flaky_job = await service.get_job(flaky)
        assert flaky_job is not None
        assert (flaky_job.state, flaky_job.attempts_made) == (JobState.COMPLETED, 3)
        boom_job = await service.get_job(boom)
        assert boom_job is not None
        assert (boom_job.state, boom_job.error, boom_job.attempts_made) == (
            JobState.FAILED,
            "boom from node",
            2,
        )
        assert boom_job.traceback is not None and "Error: boom from node" in boom_job.traceback
        counts = await service.counts()
        assert (counts[JobState.COMPLETED], counts[JobState.FAILED]) == (5, 1)
        # The Node worker's metrics (its metrics option), read as corral's throughput.
        throughput = await service.throughput(minutes=5)
        assert (sum(throughput.completed), sum(throughput.failed)) == (5, 1)


async def test_node_view_of_a_running_corral_worker(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    async with QueueService(settings) as service:
        started, gate = asyncio.Event(), asyncio.Event()

        @service.handler("hold")
        async def hold(message: QueueMessage) -> dict[str, bool]:
            await message.progress({"pct": 50})
            await message.log("halfway")
            started.set()
            await gate.wait()
            return {"ok": True}

        @service.handler("bad")
        async def bad(message: QueueMessage) -> None:
            raise ValueError("bad input")

        hold_id = await service.enqueue("hold", {"n": 1})
        worker = asyncio.create_task(service.start_worker(concurrency=2))
        try:
            await asyncio.wait_for(started.wait(), 10)
            view = await run_node("inspect.mjs", node_args(settings, jobIds=[hold_id]))
            assert view["counts"]["active"] == 1
            queue_b64 = base64.b64encode(settings.name.encode()).decode()
            assert view["workers"], "Queue.getWorkers() does not list the corral worker"
            prefix = f"bull:{queue_b64}:w:corral-"
            assert [w["name"] for w in view["workers"]] == [settings.name]
            assert view["workers"][0]["rawname"].startswith(prefix), view["workers"]
            assert view["version"] == LIB_VERSION
            held = view["jobs"][hold_id]
            assert (held["state"], held["progress"], held["logs"]) == (
                "active",
                {"pct": 50},
                ["halfway"],
            )

            bad_id = await service.enqueue("bad", None, attempts=1)
            gate.set()
            deadline = time.monotonic() + 10
            while not await finished(service, 2)():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            view = await run_node("inspect.mjs", node_args(settings, jobIds=[hold_id, bad_id]))
        finally:
            service.stop()
            await asyncio.wait_for(worker, 15)

        done, failed = view["jobs"][hold_id], view["jobs"][bad_id]
        assert (done["state"], done["returnvalue"], done["attemptsMade"]) == (
            "completed",
            {"ok": True},
            1,
        )
        assert done["finishedOn"] >= done["processedOn"] > 0
        assert (failed["state"], failed["failedReason"]) == ("failed", "ValueError: bad input")
        assert "Traceback" in failed["stacktrace"][-1] and "bad input" in failed["stacktrace"][-1]
        assert (view["counts"]["completed"], view["counts"]["failed"]) == (1, 1)

        after = await run_node("inspect.mjs", node_args(settings))
        assert after["workers"] == [], "a stopped corral worker still shows in getWorkers()"


async def test_corral_writes_the_options_a_node_producer_writes(
    make_settings: SettingsFactory, node_bullmq: Path, redis_url: str
) -> None:
    settings = make_settings(keep_completed=100, keep_failed=None)
    async with QueueService(settings) as service:
        await service.enqueue(
            "same",
            PAYLOAD,
            job_id="from-corral",
            attempts=4,
            backoff=Retry.exponential(0.25, jitter=0.3),
            priority=7,
            delay_s=1.5,
        )
    node_opts = {
        "jobId": "from-node",
        "attempts": 4,
        "backoff": {"type": "exponential", "delay": 250, "jitter": 0.3},
        "priority": 7,
        "delay": 1500,
        "removeOnComplete": 100,
    }
    await run_node(
        "producer.mjs",
        node_args(settings, jobs=[{"name": "same", "data": PAYLOAD, "opts": node_opts}]),
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ours = client.hgetall(f"bull:{settings.name}:from-corral")
        theirs = client.hgetall(f"bull:{settings.name}:from-node")
        delayed = set(client.zrange(f"bull:{settings.name}:delayed", 0, -1))
    finally:
        client.close()
    assert json.loads(ours.pop("opts")) | {"jobId": "x"} == json.loads(theirs.pop("opts")) | {
        "jobId": "x"
    }
    for raw in (ours, theirs):
        raw.pop("timestamp")
    assert ours == theirs  # name, data (verbatim JSON), delay, priority
    assert delayed == {"from-corral", "from-node"}


async def test_a_job_retried_from_bull_board_says_so(
    make_settings: SettingsFactory, node_bullmq: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bull Board's retry keeps attemptsMade: attempt 3 of a job allowed 2 is shown as such,
    not as "attempt 3/2"."""
    settings = make_settings()
    async with QueueService(settings) as service:

        @service.handler("fails")
        async def fails(message: QueueMessage) -> None:
            raise RuntimeError(f"attempt {message.attempt}")

        job_id = await service.enqueue("fails", None, attempts=2, backoff=Retry.fixed(0))
        await run_worker_until(service, finished(service, 1))
        await run_node("retry.mjs", node_args(settings, jobIds=[job_id]))
        caplog.clear()
        await run_worker_until(service, finished(service, 1))
        job = await service.get_job(job_id)
        assert job is not None and (job.state, job.attempts_made) == (JobState.FAILED, 3)
        assert len(job.tracebacks) == 3
    lines = [r.getMessage() for r in caplog.records if f"job {job_id} " in r.getMessage()]
    assert any("attempt 3 (retried by hand; 2 allowed) failed for good" in line for line in lines)
    assert not any("attempt 3/2" in line for line in lines)
    shown = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable, "-m", "corral", "--backend", "bullmq", "--queue", settings.name,
            "--redis-url", settings.redis_url, "job", job_id,
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "3 (retried by hand; 2 allowed)" in shown.stdout
    assert "traceback 3 of 3:" in shown.stdout


async def test_queues_only_node_writes_to_are_listed_and_managed(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    node_only = make_settings()  # a queue corral never writes to
    custom = make_settings(name=node_only.name + "-ids")  # Node jobs with custom ids only
    produced = await run_node(
        "producer.mjs", node_args(node_only, jobs=[{"name": "resize", "data": {"w": 320}}])
    )
    await run_node(
        "producer.mjs",
        node_args(custom, jobs=[{"name": "mail", "data": 1, "opts": {"jobId": "welcome-ada"}}]),
    )
    async with QueueService(make_settings(name=node_only.name + "-other")) as service:
        queues = await service.list_queues()
        assert node_only.name in queues and custom.name in queues
        node_backend = service.backend.for_queue(node_only.name)
        assert (await node_backend.counts())[JobState.WAITING] == 1
        found = await node_backend.search_jobs(JobState.WAITING, name="RESIZE")
        assert [job.id for job in found.jobs] == produced["ids"]
        assert found.jobs[0].data == {"w": 320}


# -- moved jobs ------------------------------------------------------------------------------------


async def test_jobs_moved_from_sqlite_are_bullmq_jobs_to_node(
    node_bullmq: Path, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    from corral import QueueSettings
    from test_move import fill

    settings = make_settings()
    source = QueueService(QueueSettings(sqlite_path=str(tmp_path / "q.db"), name=settings.name))
    try:
        ids = await fill(source)
        report = await source.move_to(settings)
        assert report.total_moved == len(ids) == 7
    finally:
        await source.close()
    seen = await run_node("inspect.mjs", node_args(settings, jobIds=ids))
    jobs = seen["jobs"]
    assert seen["counts"]["failed"] == 1 and seen["counts"]["delayed"] == 3
    failed = jobs["fails-1"]
    assert (failed["state"], failed["failedReason"]) == ("failed", "ValueError: boom 1")
    assert failed["attemptsMade"] == 1 and "ValueError: boom 1" in failed["stacktrace"][0]
    assert failed["progress"] == {"step": 2} and failed["logs"] == ["about to fail"]
    retry = jobs[ids[1]]
    assert (retry["state"], retry["attemptsMade"], retry["opts"]["attempts"]) == ("delayed", 1, 3)
    late = jobs["late"]
    assert (late["state"], late["priority"], late["opts"]["jobId"]) == ("delayed", 3, "late")
    custom = jobs["custom-w"]
    assert custom["opts"]["backoff"] == {"type": "exponential", "delay": 2000, "jitter": 0.25}
    # A Node worker runs the waiting ones, in priority order.
    ran = await run_node("worker.mjs", node_args(settings, expect=3, timeoutMs=20000))
    assert not ran["timedOut"]
    assert [run["id"] for run in ran["runs"]] == [ids[2], "custom-w", ids[3]]


# -- flows -------------------------------------------------------------------------------------


async def test_node_flow_producer_to_corral_workers(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    other = make_settings(name=f"{settings.name}-b").name
    p, q = settings.name, other
    flow = {
        "name": "assemble",
        "queueName": p,
        "data": {"level": "root"},
        "children": [
            {"name": "part", "queueName": p, "data": {"n": 1}},
            {
                "name": "part",
                "queueName": q,
                "data": {"n": 2},
                "opts": {"failParentOnFailure": True},
            },
            {
                "name": "assemble",
                "queueName": q,
                "data": {"level": "mid"},
                "children": [
                    {"name": "part", "queueName": p, "data": {"n": 3}},
                    {
                        "name": "boom",
                        "queueName": q,
                        "data": {},
                        "opts": {"ignoreDependencyOnFailure": True},
                    },
                ],
            },
        ],
    }
    tree = await run_node("flow.mjs", {"mode": "add", "url": settings.redis_url, "flow": flow})
    root_id = tree["id"]
    part1, part2, mid = tree["children"]
    part3, boom = mid["children"]
    seen: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
    async with QueueService(settings) as service:
        root = await service.get_job(root_id)
        assert root is not None and root.state is JobState.WAITING_CHILDREN
        children = {c.id: (c.queue, c.status.value) for c in await service.get_children(root_id)}
        assert children == {
            part1["id"]: (p, "pending"),
            part2["id"]: (q, "pending"),
            mid["id"]: (q, "pending"),
        }

        @service.handler("part")
        async def part(message: QueueMessage) -> int:
            return int(message.data["n"]) * 10

        @service.handler("boom")
        async def fail(message: QueueMessage) -> None:
            raise ValueError("boom from corral")

        @service.handler("assemble")
        async def assemble(message: QueueMessage) -> Any:
            results = await message.children_results()
            seen[message.data["level"]] = (results, await message.children_failures())
            return sum(v if isinstance(v, int) else v["total"] for v in results.values())

        async def done() -> bool:
            info = await service.get_job(root_id)
            return info is not None and info.state in (JobState.COMPLETED, JobState.FAILED)

        worker = asyncio.create_task(service.start_worker(queues=[p, q]))
        try:
            deadline = time.monotonic() + 20
            while not await done():
                assert time.monotonic() < deadline and not worker.done()
                await asyncio.sleep(0.05)
        finally:
            service.stop()
            await worker
        root = await service.get_job(root_id)
        assert root is not None and root.state is JobState.COMPLETED, root
        assert root.result == 10 + 20 + 30
        assert seen["mid"] == ({part3["id"]: 30}, {boom["id"]: "ValueError: boom from corral"})
        assert seen["root"][0] == {part1["id"]: 10, part2["id"]: 20, mid["id"]: 30}

    view = await run_node(
        "flow.mjs",
        {"mode": "getflow", "url": settings.redis_url, "id": root_id, "queue": p, "queues": [p, q]},
    )
    assert view["tree"]["state"] == "completed" and view["tree"]["returnvalue"] == 60


async def test_corral_flow_run_by_node_workers(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    other = make_settings(name=f"{settings.name}-b").name
    p, q = settings.name, other
    async with QueueService(settings) as service:
        flow = await service.enqueue_flow(
            FlowJob(
                "assemble",
                {"level": "root"},
                children=[
                    FlowJob("part", {"n": 1}),
                    FlowJob("part", {"n": 2}, queue=q, on_child_failure="ignore"),
                    FlowJob(
                        "assemble",
                        {"level": "mid"},
                        queue=q,
                        children=[
                            FlowJob("part", {"n": 3}),
                            FlowJob("boom", {}, queue=q, on_child_failure="ignore"),
                        ],
                    ),
                ],
            )
        )
        doomed = await service.enqueue_flow(
            FlowJob("assemble", {"level": "doomed"}, children=[FlowJob("boom", {})])
        )
    part1, part2, mid = flow.children
    part3, boom = mid.children
    queues = [p, q]

    # Before any worker: Node sees the tree, its waiting parents and Bull Board finds the root.
    before = await run_node(
        "flow.mjs",
        {"mode": "getflow", "url": settings.redis_url, "id": flow.id, "queue": p, "queues": queues},
    )
    tree = before["tree"]
    assert (tree["id"], tree["name"], tree["state"]) == (flow.id, "assemble", "waiting-children")
    by_id = {child["id"]: child for child in tree["children"]}
    assert set(by_id) == {part1.id, part2.id, mid.id}
    assert by_id[mid.id]["state"] == "waiting-children"
    assert {c["id"] for c in by_id[mid.id]["children"]} == {part3.id, boom.id}
    assert by_id[part2.id]["opts"]["parent"] == {"id": flow.id, "queue": f"bull:{p}"}
    assert by_id[part2.id]["opts"]["ignoreDependencyOnFailure"] is True
    assert by_id[part2.id]["parent"] == {"id": flow.id, "queueKey": f"bull:{p}", "idof": True}
    assert by_id[part1.id]["parentKey"] == f"bull:{p}:{flow.id}"
    assert by_id[part1.id]["opts"]["failParentOnFailure"] is True  # the default policy
    assert before["bullBoardRoots"] == [{"id": flow.id, "queue": p}] * 4

    out = await run_node(
        "flow.mjs",
        {
            "mode": "work",
            "url": settings.redis_url,
            "queues": queues,
            "roots": [{"id": flow.id, "queue": p}, {"id": doomed.id, "queue": p}],
            "fail": ["boom"],
            "timeoutMs": 20000,
        },
    )
    assert not out["timedOut"]
    ran = [run["id"] for run in out["runs"]]
    assert ran.count(flow.id) == 1 and doomed.id not in ran  # "fail": the parent never runs

    after = await run_node(
        "flow.mjs",
        {"mode": "getflow", "url": settings.redis_url, "id": flow.id, "queue": p, "queues": queues},
    )
    tree = after["tree"]
    assert tree["state"] == "completed"
    mid_value = {
        "echo": {"level": "mid"},
        "children": {f"bull:{p}:{part3.id}": {"echo": {"n": 3}, "children": {}, "ignored": {}}},
        "ignored": {f"bull:{q}:{boom.id}": "boom failed on purpose"},
    }
    assert tree["childrenValues"] == {
        f"bull:{p}:{part1.id}": {"echo": {"n": 1}, "children": {}, "ignored": {}},
        f"bull:{q}:{part2.id}": {"echo": {"n": 2}, "children": {}, "ignored": {}},
        f"bull:{q}:{mid.id}": mid_value,
    }
    async with QueueService(settings) as service:
        root = await service.get_job(flow.id)
        assert root is not None and root.state is JobState.COMPLETED
        assert root.result == {
            "echo": {"level": "root"},
            "children": tree["childrenValues"],
            "ignored": {},
        }
        failed = await service.get_job(doomed.id)
        assert failed is not None and failed.state is JobState.FAILED
        assert failed.error == f"child bull:{p}:{doomed.children[0].id} failed"
    async with QueueService(settings.with_name(q)) as service:
        statuses = {c.id: c.status.value for c in await service.get_children(mid.id)}
        assert statuses == {part3.id: "completed", boom.id: "ignored"}


async def test_node_wait_until_finished_on_corral_run_jobs(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    async with QueueService(settings) as service:

        @service.handler("work")
        async def work(message: QueueMessage) -> Any:
            if message.data == "fail" or (message.data == "flaky" and message.attempt == 1):
                raise RuntimeError(f"{message.data} on attempt {message.attempt}")
            return {"done": message.data, "attempt": message.attempt}

        ids = [
            await service.enqueue("work", "ok"),
            await service.enqueue("work", "flaky", attempts=2),
            await service.enqueue("work", "fail"),
        ]
        waiter = await asyncio.create_subprocess_exec(
            "node",
            "wait.mjs",
            json.dumps(node_args(settings, ids=ids)),
            cwd=NODE_DIR,
            stdout=asyncio.subprocess.PIPE,
        )
        assert waiter.stdout is not None
        try:
            # Node listens before the jobs run: it sees them finish through the events.
            line = await asyncio.wait_for(waiter.stdout.readline(), 20)
            assert json.loads(line) == {"listening": True}
            await run_worker_until(service, finished(service, 3), timeout_s=20)
            last = await asyncio.wait_for(waiter.stdout.read(), 20)
        finally:
            if waiter.returncode is None:
                waiter.kill()
            await waiter.wait()
    results = json.loads(last.decode().strip().split("\n")[-1])["results"]
    assert results == {
        ids[0]: {"returnvalue": {"done": "ok", "attempt": 1}},
        ids[1]: {"returnvalue": {"done": "flaky", "attempt": 2}},
        ids[2]: {"failedReason": "RuntimeError: fail on attempt 1"},
    }


async def test_corral_wait_for_on_node_run_jobs(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    async with QueueService(settings) as service:
        done = await service.enqueue("echo", {"n": 1})
        flaky = await service.enqueue("flaky", 2, attempts=2)
        bad = await service.enqueue("bad", None)
        waits = asyncio.gather(
            service.wait_for(done, timeout_s=30),
            service.wait_for(flaky, timeout_s=30),
            service.wait_for(bad, timeout_s=30),
            return_exceptions=True,
        )
        behaviours = {"flaky": {"failUntilAttempt": 2}, "bad": {"fail": "broken on purpose"}}
        node = asyncio.create_task(
            run_node("worker.mjs", node_args(settings, expect=3, behaviours=behaviours))
        )
        echoed, flaky_result, failure = await waits
        assert not (await node)["timedOut"]
    assert echoed == {"echo": {"n": 1}, "attempt": 1}
    assert flaky_result == {"echo": 2, "attempt": 2}
    assert isinstance(failure, JobFailedError) and failure.reason == "broken on purpose"
    assert failure.traceback is not None and "broken on purpose" in failure.traceback
    # Finished before the call: answered from the job, Node's worker gone.
    assert await service.wait_for(done, timeout_s=0.05) == {"echo": {"n": 1}, "attempt": 1}


async def test_node_and_corral_producers_deduplicate_against_each_other(
    make_settings: SettingsFactory, node_bullmq: Path
) -> None:
    settings = make_settings()
    async with QueueService(settings) as service:
        first = await service.enqueue("sync", 1, deduplication=Deduplication("a", ttl_s=30))
        node = await run_node(
            "producer.mjs",
            node_args(
                settings,
                jobs=[
                    {
                        "name": "sync",
                        "data": 2,
                        "opts": {"deduplication": {"id": "a", "ttl": 30000}},
                    },
                    {"name": "sync", "data": 3, "opts": {"deduplication": {"id": "b"}}},
                ],
            ),
        )
        assert node["ids"][0] == first
        assert await service.enqueue("sync", 4, deduplication=Deduplication("b")) == node["ids"][1]
        # The job records its deduplication id as Node's does, so Node's finish frees it.
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            assert client.hget(f"bull:{settings.name}:{first}", "deid") == "a"
            assert client.pttl(f"bull:{settings.name}:de:a") > 25_000
        finally:
            client.close()
        seen = await run_node(
            "events.mjs", node_args(settings, names=["deduplicated"], count=2, timeoutMs=5000)
        )
    assert not seen["timedOut"]
    assert [event["args"] for event in seen["events"]] == [
        {"jobId": first, "deduplicationId": "a", "deduplicatedJobId": str(int(first) + 1)},
        {
            "jobId": node["ids"][1],
            "deduplicationId": "b",
            "deduplicatedJobId": str(int(node["ids"][1]) + 1),
        },
    ]
