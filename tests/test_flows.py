"""Flows, written once and run against SQLite and BullMQ alike: trees across queues, the four
failure policies, retries, reused job ids, refused trees, chain/chord and a 1,000-child fan-in."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from corral import (
    ChildStatus,
    FlowJob,
    FlowNode,
    JobInfo,
    JobState,
    PayloadError,
    QueueMessage,
    QueueService,
    Retry,
    chain,
    chord,
)

from conftest import SettingsFactory

pytestmark = pytest.mark.timeout(120)

SETTLED = (JobState.COMPLETED, JobState.FAILED)


async def job_of(service: QueueService, node: FlowNode) -> JobInfo:
    """A job of the flow, whatever its queue."""
    info = await service.backend.for_queue(node.queue).get_job(node.id)
    assert info is not None, f"job {node.id} of {node.queue} is gone"
    return info


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 20.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


async def run_until_settled(
    service: QueueService,
    node: FlowNode,
    queues: list[str],
    *,
    concurrency: int = 5,
    timeout_s: float = 20.0,
) -> JobInfo:
    """Run a worker of ``queues`` until ``node``'s job has completed or failed."""
    worker = asyncio.create_task(service.start_worker(concurrency=concurrency, queues=queues))
    try:

        async def settled() -> bool:
            if worker.done():
                worker.result()
                raise AssertionError("the worker stopped")
            return (await job_of(service, node)).state in SETTLED

        await wait_until(settled, timeout_s=timeout_s, what=f"job {node.name} settled")
    finally:
        service.stop()
        await asyncio.wait_for(worker, 15)
    return await job_of(service, node)


class Recorder:
    """Handlers that note what ran, in order, and what each parent saw of its children."""

    def __init__(self, service: QueueService) -> None:
        self.ran: list[tuple[str, Any]] = []
        self.saw: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        self.runs: Counter[str] = Counter()

        @service.handler("leaf")
        async def leaf(message: QueueMessage) -> Any:
            self.ran.append(("leaf", message.data))
            self.runs[message.id] += 1
            return {"double": message.data * 2}

        @service.handler("boom", attempts=1)
        async def boom(message: QueueMessage) -> None:
            self.ran.append(("boom", message.data))
            raise ValueError(f"boom {message.data}")

        @service.handler("flaky", attempts=3, backoff=Retry.fixed(0))
        async def flaky(message: QueueMessage) -> int:
            self.ran.append(("flaky", message.attempt))
            if message.attempt < 3:
                raise ConnectionError(f"attempt {message.attempt} fails")
            return message.attempt

        @service.handler("parent")
        async def parent(message: QueueMessage) -> Any:
            results = await message.children_results()
            failures = await message.children_failures()
            self.ran.append(("parent", message.data))
            self.runs[message.id] += 1
            self.saw[message.id] = (results, failures)
            values = [r for r in results.values() if isinstance(r, dict)]
            return {"sum": sum(r.get("double", 0) + r.get("sum", 0) for r in values)}


# -- running flows -----------------------------------------------------------------------------


async def test_three_levels_across_two_queues(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    io = make_settings(name=f"{settings.name}-io").name
    async with QueueService(settings) as service:
        rec = Recorder(service)
        flow = await service.enqueue_flow(
            FlowJob(
                "parent",
                "root",
                children=[
                    FlowJob("leaf", 1),
                    FlowJob("leaf", 2, queue=io),
                    FlowJob("parent", "mid", queue=io, children=[FlowJob("leaf", 3)]),
                ],
            )
        )
        leaf1, leaf2, mid = flow.children
        (leaf3,) = mid.children
        assert [n.queue for n in flow.walk()] == [
            settings.name,
            settings.name,
            io,
            io,
            settings.name,
        ]
        assert len({n.id for n in flow.walk()}) == 5

        root = await job_of(service, flow)
        assert root.state is JobState.WAITING_CHILDREN and root.parent is None
        assert (await job_of(service, mid)).state is JobState.WAITING_CHILDREN
        child = await job_of(service, leaf2)
        assert child.parent is not None and (child.parent.queue, child.parent.id) == (
            settings.name,
            flow.id,
        )
        counts = await service.counts()
        assert (counts[JobState.WAITING], counts[JobState.WAITING_CHILDREN]) == (2, 1)
        listed = await service.list_jobs("waiting-children")
        assert [j.id for j in listed] == [flow.id]
        children = await service.get_children(flow.id)
        assert {(c.id, c.status) for c in children} == {
            (n.id, ChildStatus.PENDING) for n in flow.children
        }

        root = await run_until_settled(service, flow, [settings.name, io])

        assert root.state is JobState.COMPLETED and root.result == {"sum": 2 + 4 + 6}
        assert rec.saw[mid.id] == ({leaf3.id: {"double": 6}}, {})
        assert rec.saw[flow.id] == (
            {leaf1.id: {"double": 2}, leaf2.id: {"double": 4}, mid.id: {"sum": 6}},
            {},
        )
        # Each parent ran once, after every one of its children.
        assert rec.ran.count(("parent", "root")) == 1 and rec.ran.count(("parent", "mid")) == 1
        assert rec.ran[-1] == ("parent", "root")
        assert rec.ran.index(("parent", "mid")) > rec.ran.index(("leaf", 3))
        children = await service.get_children(flow.id)
        assert {c.id: (c.status, c.name) for c in children} == {
            leaf1.id: (ChildStatus.COMPLETED, "leaf"),
            leaf2.id: (ChildStatus.COMPLETED, "leaf"),
            mid.id: (ChildStatus.COMPLETED, "parent"),
        }
        assert await service.get_flow(flow.id) == _sorted(flow, await service.get_flow(flow.id))


def _sorted(written: FlowNode, read: FlowNode | None) -> FlowNode:
    """``written`` with children in the order ``read`` lists them (BullMQ keeps them in sets)."""
    assert read is not None
    order = {n.id: i for i, n in enumerate(read.walk())}

    def sort(node: FlowNode) -> FlowNode:
        kids = sorted((sort(k) for k in node.children), key=lambda k: order.get(k.id, -1))
        return FlowNode(node.id, node.queue, node.name, tuple(kids))

    return sort(written)


async def test_fail_policy_fails_the_parents_without_running_them(service: QueueService) -> None:
    rec = Recorder(service)
    flow = await service.enqueue_flow(
        FlowJob(
            "parent",
            "root",
            children=[
                FlowJob("parent", "mid", children=[FlowJob("boom", 1), FlowJob("leaf", 2)]),
                FlowJob("leaf", 3),
            ],
        )
    )
    mid = flow.children[0]
    root = await run_until_settled(service, flow, [service.settings.name])
    assert root.state is JobState.FAILED
    mid_job = await job_of(service, mid)
    assert mid_job.state is JobState.FAILED
    boom = mid.children[0]
    assert "child" in (mid_job.error or "") and boom.id in (mid_job.error or "")
    assert mid.id in (root.error or "")
    assert not rec.saw  # neither parent ran its handler
    assert ("leaf", 3) in rec.ran  # siblings still ran
    by_id = {c.id: c for c in await service.get_children(mid.id)}
    assert by_id[boom.id].status is ChildStatus.FAILED
    assert by_id[boom.id].error == "ValueError: boom 1"


async def test_continue_policy_runs_the_parent_with_the_failure(service: QueueService) -> None:
    rec = Recorder(service)
    flow = await service.enqueue_flow(
        FlowJob(
            "parent",
            children=[FlowJob("leaf", 1), FlowJob("boom", 2, on_child_failure="continue")],
        )
    )
    good, bad = flow.children
    root = await run_until_settled(service, flow, [service.settings.name], concurrency=1)
    assert root.state is JobState.COMPLETED
    assert rec.saw[flow.id] == ({good.id: {"double": 2}}, {bad.id: "ValueError: boom 2"})


async def test_continue_releases_the_parent_before_other_children(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    idle = make_settings(name=f"{settings.name}-idle").name  # no worker: its child stays pending
    async with QueueService(settings) as service:
        Recorder(service)
        flow = await service.enqueue_flow(
            FlowJob(
                "parent",
                attempts=1,
                children=[
                    FlowJob("boom", 1, on_child_failure="continue"),
                    FlowJob("leaf", 2, queue=idle),
                ],
            )
        )
        # The parent runs at once; it cannot complete with a child pending, so that attempt
        # fails (BullMQ's continueParentOnFailure).
        root = await run_until_settled(service, flow, [settings.name])
        assert root.state is JobState.FAILED
        assert "cannot complete" in (root.error or "") and "pending" in (root.error or "")
        assert (await job_of(service, flow.children[1])).state is JobState.WAITING


async def test_ignore_policy_waits_for_the_others_then_shows_the_failure(
    service: QueueService,
) -> None:
    rec = Recorder(service)
    flow = await service.enqueue_flow(
        FlowJob(
            "parent",
            children=[FlowJob("boom", 1, on_child_failure="ignore"), FlowJob("leaf", 2)],
        )
    )
    bad, good = flow.children
    root = await run_until_settled(service, flow, [service.settings.name], concurrency=1)
    assert root.state is JobState.COMPLETED and root.result == {"sum": 4}
    assert rec.saw[flow.id] == ({good.id: {"double": 4}}, {bad.id: "ValueError: boom 1"})
    statuses = {c.id: c.status for c in await service.get_children(flow.id)}
    assert statuses == {bad.id: ChildStatus.IGNORED, good.id: ChildStatus.COMPLETED}


async def test_remove_policy_forgets_the_child(service: QueueService) -> None:
    rec = Recorder(service)
    flow = await service.enqueue_flow(
        FlowJob(
            "parent",
            children=[FlowJob("boom", 1, on_child_failure="remove"), FlowJob("leaf", 2)],
        )
    )
    _, good = flow.children
    root = await run_until_settled(service, flow, [service.settings.name], concurrency=1)
    assert root.state is JobState.COMPLETED
    assert rec.saw[flow.id] == ({good.id: {"double": 4}}, {})
    assert [c.id for c in await service.get_children(flow.id)] == [good.id]


async def test_a_child_retried_then_completing_releases_its_parent_once(
    service: QueueService,
) -> None:
    rec = Recorder(service)
    flow = await service.enqueue_flow(FlowJob("parent", children=[FlowJob("flaky")]))
    root = await run_until_settled(service, flow, [service.settings.name])
    assert root.state is JobState.COMPLETED
    assert [a for name, a in rec.ran if name == "flaky"] == [1, 2, 3]
    assert rec.runs[flow.id] == 1
    assert rec.saw[flow.id] == ({flow.children[0].id: 3}, {})


async def test_a_parents_delay_counts_from_its_release(service: QueueService) -> None:
    Recorder(service)
    flow = await service.enqueue_flow(
        FlowJob("parent", delay_s=60, priority=2, children=[FlowJob("leaf", 1)])
    )
    assert (await job_of(service, flow)).state is JobState.WAITING_CHILDREN
    worker = asyncio.create_task(service.start_worker())
    try:

        async def delayed() -> bool:
            return (await job_of(service, flow)).state is JobState.DELAYED

        await wait_until(delayed, what="the parent delayed once its child completed")
    finally:
        service.stop()
        await worker
    parent = await job_of(service, flow)
    assert parent.priority == 2
    assert parent.run_at is not None and parent.run_at.timestamp() > time.time() + 50


async def test_removing_the_last_pending_child_releases_the_parent(service: QueueService) -> None:
    flow = await service.enqueue_flow(FlowJob("parent", children=[FlowJob("leaf", 1)]))
    assert await service.remove(flow.children[0].id)
    assert (await job_of(service, flow)).state is JobState.WAITING
    assert await service.get_children(flow.id) == []


async def test_retrying_a_failed_child_makes_it_pending_again(service: QueueService) -> None:
    rec = Recorder(service)
    flow = await service.enqueue_flow(
        FlowJob("parent", children=[FlowJob("boom", 1, on_child_failure="ignore")])
    )
    await run_until_settled(service, flow, [service.settings.name])
    assert rec.saw[flow.id][1] == {flow.children[0].id: "ValueError: boom 1"}
    assert await service.retry_failed() == 1
    (child,) = await service.get_children(flow.id)
    assert child.status is ChildStatus.PENDING


# -- reused ids and refused trees ---------------------------------------------------------------


async def test_the_same_root_id_twice_writes_nothing_more(service: QueueService) -> None:
    tree = FlowJob("parent", job_id="report-7", children=[FlowJob("leaf", 1), FlowJob("leaf", 2)])
    first = await service.enqueue_flow(tree)
    again = await service.enqueue_flow(tree)
    assert again.id == first.id == "report-7"
    assert {n.id for n in again.children} == {n.id for n in first.children}
    counts = await service.counts()
    assert (counts[JobState.WAITING], counts[JobState.WAITING_CHILDREN]) == (2, 1)


async def test_a_completed_job_reused_as_a_child_does_not_release_early(
    service: QueueService,
) -> None:
    rec = Recorder(service)
    done = await service.enqueue("leaf", 5, job_id="part-5")
    await run_until_settled(
        service, FlowNode(done, service.settings.name, "leaf"), [service.settings.name]
    )
    assert (await service.get_job(done)).state is JobState.COMPLETED  # type: ignore[union-attr]

    # The reused child is written before its new sibling in the tree; the parent must still
    # wait for the sibling (the package's scripts would release it at once).
    flow = await service.enqueue_flow(
        FlowJob("parent", children=[FlowJob("leaf", 5, job_id="part-5"), FlowJob("leaf", 6)])
    )
    reused, new = flow.children
    assert reused.id == "part-5"
    assert (await job_of(service, flow)).state is JobState.WAITING_CHILDREN
    statuses = {c.id: c.status for c in await service.get_children(flow.id)}
    assert statuses == {"part-5": ChildStatus.COMPLETED, new.id: ChildStatus.PENDING}

    root = await run_until_settled(service, flow, [service.settings.name])
    assert root.state is JobState.COMPLETED
    assert rec.saw[flow.id][0] == {"part-5": {"double": 10}, new.id: {"double": 12}}
    assert rec.runs["part-5"] == 1  # not run again


async def test_a_running_job_reused_as_a_child_releases_its_parent(
    service: QueueService,
) -> None:
    rec = Recorder(service)
    started, finish = asyncio.Event(), asyncio.Event()

    @service.handler("slow")
    async def slow(message: QueueMessage) -> dict[str, int]:
        started.set()
        await finish.wait()
        return {"double": 14}

    await service.enqueue("slow", 7, job_id="running-7")
    worker = asyncio.create_task(service.start_worker(concurrency=2))
    try:
        await asyncio.wait_for(started.wait(), 10)
        # It becomes a child while it runs: its completion must still reach the parent.
        flow = await service.enqueue_flow(
            FlowJob("parent", children=[FlowJob("slow", 7, job_id="running-7")])
        )
        finish.set()

        async def parent_done() -> bool:
            return (await job_of(service, flow)).state is JobState.COMPLETED

        await wait_until(parent_done, what="the parent completed")
    finally:
        service.stop()
        await asyncio.wait_for(worker, 15)
    assert rec.saw[flow.id][0] == {"running-7": {"double": 14}}


async def test_a_parent_whose_children_all_existed_runs_at_once(service: QueueService) -> None:
    Recorder(service)
    done = await service.enqueue("leaf", 1, job_id="p1")
    await run_until_settled(
        service, FlowNode(done, service.settings.name, "leaf"), [service.settings.name]
    )
    flow = await service.enqueue_flow(
        FlowJob("parent", children=[FlowJob("leaf", 1, job_id="p1", children=[FlowJob("leaf")])])
    )
    assert flow.children[0].children == ()  # nothing is written under a reused job
    assert (await job_of(service, flow)).state is JobState.WAITING


@pytest.mark.parametrize("state", ["has a parent", "failed"])
async def test_a_child_id_that_cannot_be_reused_is_refused(
    service: QueueService, state: str
) -> None:
    Recorder(service)
    if state == "has a parent":
        await service.enqueue_flow(FlowJob("parent", children=[FlowJob("leaf", job_id="taken")]))
    else:
        await service.enqueue("boom", 1, job_id="taken")
        await run_until_settled(
            service, FlowNode("taken", service.settings.name, "boom"), [service.settings.name]
        )
    before = await service.counts()
    with pytest.raises(PayloadError, match="taken"):
        await service.enqueue_flow(
            FlowJob("parent", children=[FlowJob("leaf", 1), FlowJob("leaf", job_id="taken")])
        )
    assert await service.counts() == before


@pytest.mark.parametrize(
    ("flow", "fragment"),
    [
        ({"name": "parent", "children": [{"name": "leaf", "prio": 1}]}, "unknown option.*prio"),
        (
            FlowJob("parent", children=[FlowJob("leaf", job_id="x"), FlowJob("leaf", job_id="x")]),
            "job_id 'x' is also used",
        ),
        (FlowJob("parent", children=[FlowJob("leaf", queue="bad:queue")]), "queue name"),
        (
            FlowJob("parent", children=[FlowJob("leaf", on_child_failure="explode")]),
            "on_child_failure",
        ),
        (FlowJob("parent", children=[FlowJob("leaf", {1, 2})]), "children\\[0\\].*JSON"),
        (FlowJob("parent", children=[FlowJob("leaf", priority=-1)]), "priority"),
        (FlowJob("parent", children=[FlowJob("leaf", job_id="12")]), "integer"),
        (FlowJob("parent", children=[FlowJob(str(n)) for n in range(5)]), "more than 4 jobs"),
    ],
)
async def test_bad_trees_are_refused_before_anything_is_written(
    make_settings: SettingsFactory, flow: Any, fragment: str
) -> None:
    async with QueueService(make_settings(max_flow_jobs=4)) as service:
        with pytest.raises(PayloadError, match=fragment):
            await service.enqueue_flow(flow)
        assert sum((await service.counts()).values()) == 0


async def test_a_deep_chain_is_written_whole(make_settings: SettingsFactory) -> None:
    async with QueueService(make_settings(max_flow_jobs=3000)) as service:
        steps = chain(*(FlowJob("step", n) for n in range(3000)))
        flow = await service.enqueue_flow(steps)
        assert sum(1 for _ in flow.walk()) == 3000
        counts = await service.counts()
        assert (counts[JobState.WAITING], counts[JobState.WAITING_CHILDREN]) == (1, 2999)
        nested: dict[str, Any] = {"name": "step", "data": 0}
        for n in range(1, 3000):
            nested = {"name": "step", "data": n, "children": [nested]}
        built = FlowJob.from_dict(nested)  # as deep, without recursion
        assert [job.data for job in built.walk()] == [job.data for job in steps.walk()]
        with pytest.raises(PayloadError, match="more than 3000 jobs"):
            await service.enqueue_flow(FlowJob("one more", children=[steps]))


def test_a_cyclic_tree_is_refused() -> None:
    node: dict[str, Any] = {"name": "a", "children": []}
    node["children"].append({"name": "b", "children": [node]})
    with pytest.raises(PayloadError, match="cycle"):
        FlowJob.from_dict(node)
    with pytest.raises(TypeError):
        FlowJob("a", prio=1)  # type: ignore[call-arg]


# -- the shapes --------------------------------------------------------------------------------


async def test_chain_passes_each_result_to_the_next(service: QueueService) -> None:
    @service.handler("add")
    async def add(message: QueueMessage) -> int:
        before = await message.children_results()
        return sum(before.values()) + message.data

    flow = await service.enqueue_flow(
        chain(FlowJob("add", 1), FlowJob("add", 10), FlowJob("add", 100))
    )
    assert [n.name for n in flow.walk()] == ["add", "add", "add"]
    last = await run_until_settled(service, flow, [service.settings.name])
    assert last.result == 111


async def test_chord_runs_the_callback_after_the_group(service: QueueService) -> None:
    rec = Recorder(service)
    flow = await service.enqueue_flow(
        chord([FlowJob("leaf", n) for n in range(5)], FlowJob("parent", "callback"))
    )
    done = await run_until_settled(service, flow, [service.settings.name])
    assert done.result == {"sum": 20}
    assert len(rec.saw[flow.id][0]) == 5
    assert rec.ran[-1] == ("parent", "callback")


async def test_a_thousand_children_release_their_parent_exactly_once(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(max_flow_jobs=2000)
    runs: Counter[str] = Counter()
    seen: list[int] = []

    def register(service: QueueService) -> None:
        @service.handler("part")
        async def part(message: QueueMessage) -> int:
            return int(message.data)

        @service.handler("total")
        async def total(message: QueueMessage) -> int:
            runs[message.id] += 1
            results = await message.children_results()
            seen.append(len(results))
            return sum(results.values())

    # Two workers on separate connections settle children concurrently.
    async with QueueService(settings) as one, QueueService(settings) as two:
        register(one)
        register(two)
        flow = await one.enqueue_flow(
            FlowJob("total", children=[FlowJob("part", n) for n in range(1000)])
        )
        workers = [asyncio.create_task(s.start_worker(concurrency=20)) for s in (one, two)]
        try:

            async def done() -> bool:
                return (await job_of(one, flow)).state in SETTLED

            await wait_until(done, timeout_s=90, what="the parent of 1,000 children settled")
            await asyncio.sleep(0.3)  # a second, wrong release would run it again by now
        finally:
            one.stop()
            two.stop()
            await asyncio.gather(*workers)
        root = await job_of(one, flow)
        assert root.state is JobState.COMPLETED and root.result == sum(range(1000))
        assert runs == Counter({flow.id: 1}) and seen == [1000]
        counts = await one.counts()
        assert counts[JobState.FAILED] == counts[JobState.WAITING] == counts[JobState.ACTIVE] == 0


async def test_a_burst_worker_of_every_queue_runs_the_whole_flow(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    io = make_settings(name=f"{settings.name}-io").name
    async with QueueService(settings) as service:
        rec = Recorder(service)
        # The root's queue has nothing ready until the io queue's jobs are done.
        flow = await service.enqueue_flow(
            FlowJob(
                "parent",
                "root",
                children=[
                    FlowJob("leaf", 1, queue=io),
                    FlowJob("parent", "mid", queue=io, children=[FlowJob("leaf", 2, queue=io)]),
                ],
            )
        )
        await asyncio.wait_for(service.start_worker(burst=True, queues=[settings.name, io]), 30)
        root = await job_of(service, flow)
        assert root.state is JobState.COMPLETED and root.result == {"sum": 2 + 4}
        assert rec.ran[-1] == ("parent", "root")


async def test_a_move_leaves_the_jobs_of_flows_behind(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    target = make_settings(name=f"{settings.name}-moved")
    async with QueueService(settings) as service:
        Recorder(service)
        # A failed parent (its child failed it) and that child: failed jobs move, these not.
        doomed = await service.enqueue_flow(FlowJob("parent", children=[FlowJob("boom", 1)]))
        assert (await run_until_settled(service, doomed, [settings.name])).state is (
            JobState.FAILED
        )
        alone = await service.enqueue("leaf", 1, job_id="alone")  # its own id: same file
        flow = await service.enqueue_flow(
            FlowJob("parent", children=[FlowJob("leaf", 2), FlowJob("leaf", 3)])
        )
        report = await service.move_to(target)
        assert report.total_moved == 1  # only the job outside any flow
        stayed = {doomed.id, doomed.children[0].id, *(n.id for n in flow.children)}
        assert sorted(report.in_flow) == sorted(stayed)
        assert (await service.get_job(alone)) is None
        assert (await job_of(service, flow)).state is JobState.WAITING_CHILDREN
        assert {c.status for c in await service.get_children(flow.id)} == {ChildStatus.PENDING}


async def test_enqueue_flow_sync(service: QueueService) -> None:
    flow = await asyncio.to_thread(
        service.enqueue_flow_sync, FlowJob("parent", children=[FlowJob("leaf", 1)])
    )
    assert (await job_of(service, flow)).state is JobState.WAITING_CHILDREN
