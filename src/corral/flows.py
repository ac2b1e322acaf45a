"""Flows: parent jobs that run once their children have settled, across queues.

A flow is a tree of :class:`FlowJob` objects. ``QueueService.enqueue_flow`` checks the whole tree
first (:func:`plan_flow`: options, job ids, queue names, its size), then has the backend write it
atomically (:func:`write_flow`): every job of the tree or none. A job with children waits in
``waiting-children`` until each child has settled, then runs like any job; its handler reads the
children's results with ``await message.children_results()``. What a child's failure does to
its parent is the child's ``on_child_failure`` (BullMQ's four policies, see
:class:`~corral.message.ChildPolicy`).

On the BullMQ backend the tree is stored as Node.js BullMQ's ``FlowProducer`` stores it, so Node
workers, ``FlowProducer.getFlow`` and Bull Board see corral's flows and corral runs theirs.

:func:`chain` and :func:`chord` build the common shapes out of :class:`FlowJob`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.errors import PayloadError
from corral.message import ChildPolicy, FlowEntry, JobRef, NewJob
from corral.retry import Retry
from corral.settings import check_queue_name

if TYPE_CHECKING:
    from corral.backends.base import QueueBackend
    from corral.service import QueueService

FLOW_JOB_OPTIONS = (
    "name",
    "data",
    "queue",
    "children",
    "job_id",
    "on_child_failure",
    "priority",
    "attempts",
    "backoff",
    "delay_s",
)
"""The keys of a flow job given as a mapping (the keyword arguments of :class:`FlowJob`)."""

_POLICIES = ", ".join(repr(policy.value) for policy in ChildPolicy)


@dataclass(frozen=True, slots=True, init=False)
class FlowJob:
    """One job of a flow: a job like :meth:`QueueService.enqueue` adds, plus its children.

    Args:
        name: the handler's name.
        data: the payload (plain JSON).
        queue: the queue the job goes to; ``None`` is the service's queue (not the parent's).
        children: jobs that must settle before this one runs.
        job_id: your id for the job (as ``enqueue``'s; unique within the flow).
        on_child_failure: what this job failing for good does to its parent: ``"fail"`` (the
            parent fails without running; the default), ``"continue"`` (the parent runs at
            once), ``"ignore"`` (the parent runs once the other children settled and reads the
            failure with ``message.children_failures()``), ``"remove"`` (as ``"ignore"``, but
            the failure is not recorded).
        priority, attempts, backoff, delay_s: as for ``enqueue``. A parent's ``delay_s``
            counts from the moment its children have settled.
    """

    name: str
    data: Any
    queue: str | None
    children: tuple[FlowJob, ...]
    job_id: str | None
    on_child_failure: str
    priority: int
    attempts: int | None
    backoff: Retry | None
    delay_s: float

    def __init__(
        self,
        name: str,
        data: Any = None,
        *,
        queue: str | None = None,
        children: Iterable[FlowJob] = (),
        job_id: str | None = None,
        on_child_failure: str = "fail",
        priority: int = 0,
        attempts: int | None = None,
        backoff: Retry | None = None,
        delay_s: float = 0,
    ) -> None:
        if isinstance(children, FlowJob | str | bytes | Mapping):
            raise PayloadError(
                f"children of flow job {name!r} must be a list of FlowJob, got {children!r}"
            )
        try:
            kids = tuple(children)
        except TypeError:
            raise PayloadError(
                f"children of flow job {name!r} must be a list of FlowJob, got {children!r}"
            ) from None
        values = {
            "name": name,
            "data": data,
            "queue": queue,
            "children": kids,
            "job_id": job_id,
            "on_child_failure": on_child_failure,
            "priority": priority,
            "attempts": attempts,
            "backoff": backoff,
            "delay_s": delay_s,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> FlowJob:
        """A flow from plain data: ``{"name": ..., "data": ..., "children": [{...}, ...]}`` with
        the keyword arguments of :class:`FlowJob` as keys.

        Raises:
            PayloadError: an unknown key, a node that is not a mapping, or a cycle.
        """
        return _from_mapping(spec)

    def walk(self) -> Iterator[FlowJob]:
        """This job and every job under it, parents before their children."""
        stack: list[FlowJob] = [self]
        while stack:
            job = stack.pop()
            yield job
            stack.extend(reversed(job.children))


@dataclass(frozen=True, slots=True)
class FlowNode:
    """A flow as written: each job's id and queue, in the shape of the :class:`FlowJob` tree."""

    id: str
    queue: str
    name: str
    children: tuple[FlowNode, ...] = ()

    def walk(self) -> Iterator[FlowNode]:
        """This node and every node under it, parents before their children."""
        stack: list[FlowNode] = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


def chain(*jobs: FlowJob) -> FlowJob:
    """``a``, then ``b``, then ``c``: each job runs once the one before it completed, and reads
    its result with ``await message.children_results()``. Enqueue the returned job (the last
    of the chain) with ``enqueue_flow``; by default a failure fails the rest of the chain."""
    if not jobs:
        raise PayloadError("chain() needs at least one FlowJob")
    current = _flow_job(jobs[0], "chain() argument 1")
    for number, job in enumerate(jobs[1:], start=2):
        job = _flow_job(job, f"chain() argument {number}")
        current = dataclasses.replace(job, children=(*job.children, current))
    return current


def chord(group: Iterable[FlowJob], callback: FlowJob) -> FlowJob:
    """Run every job of ``group`` (in parallel, on any queues), then ``callback`` once all of
    them have settled; ``callback`` reads their results with ``message.children_results()``.
    By default one failure in the group fails the callback."""
    callback = _flow_job(callback, "chord() callback")
    members = tuple(_flow_job(job, "a chord() group member") for job in group)
    return dataclasses.replace(callback, children=(*callback.children, *members))


def _flow_job(value: Any, what: str) -> FlowJob:
    if not isinstance(value, FlowJob):
        raise PayloadError(f"{what} must be a FlowJob, got {value!r}")
    return value


def _from_mapping(root: Any) -> FlowJob:
    """The FlowJob tree of nested mappings, built children first without recursion (a chain
    is as deep as it is long)."""
    specs: list[tuple[Mapping[str, Any], int | None, int]] = []  # (spec, parent, place)
    kids: list[list[int]] = []
    built: list[FlowJob | None] = []
    on_path: set[int] = set()  # the mappings from the root down to the one being read

    def path(parent: int | None, number: int) -> str:
        parts: list[str] = []
        while parent is not None:
            parts.append(f"children[{number}]")
            _, parent, number = specs[parent]
        return ".".join(["root", *reversed(parts)])

    # (False, index) finishes a mapping once its children are built.
    stack: list[tuple[bool, Any, int | None, int]] = [(True, root, None, 0)]
    while stack:
        entering, item, parent, number = stack.pop()
        if not entering:
            spec = specs[item][0]
            on_path.discard(id(spec))
            options = {k: v for k, v in spec.items() if k not in ("name", "children")}
            children = [job for k in kids[item] if (job := built[k]) is not None]
            built[item] = FlowJob(spec["name"], children=children, **options)
            continue
        index = len(specs)
        if isinstance(item, FlowJob):
            specs.append(({}, parent, number))
            kids.append([])
            built.append(item)
        else:
            spec = _checked_mapping(item, path(parent, number), on_path)
            specs.append((spec, parent, number))
            kids.append([])
            built.append(None)
            on_path.add(id(spec))
            stack.append((False, index, None, 0))
            children = list(spec.get("children", ()))
            for child_number in range(len(children) - 1, -1, -1):
                stack.append((True, children[child_number], index, child_number))
        if parent is not None:
            kids[parent].append(index)
    top = built[0]
    assert top is not None
    return top


def _checked_mapping(spec: Any, path: str, on_path: set[int]) -> Mapping[str, Any]:
    if not isinstance(spec, Mapping):
        raise PayloadError(f"flow job {path} must be a mapping or a FlowJob, got {spec!r}")
    if id(spec) in on_path:
        raise PayloadError(f"flow job {path} contains itself (a cycle); a flow is a tree")
    unknown = sorted(str(key) for key in spec if key not in FLOW_JOB_OPTIONS)
    if unknown:
        raise PayloadError(
            f"flow job {path} has unknown option(s) {', '.join(map(repr, unknown))}; "
            f"use {', '.join(FLOW_JOB_OPTIONS)}"
        )
    if "name" not in spec:
        raise PayloadError(f"flow job {path} has no 'name'")
    children = spec.get("children", ())
    if isinstance(children, Mapping | str | bytes) or not isinstance(children, Iterable):
        raise PayloadError(f"'children' of flow job {path} must be a list, got {children!r}")
    return spec


# -- planning ----------------------------------------------------------------------------------


@dataclass(slots=True)
class FlowPlan:
    """A checked flow: the entries the backend writes, parents first."""

    entries: list[FlowEntry]


def plan_flow(service: QueueService, flow: FlowJob | Mapping[str, Any]) -> FlowPlan:
    """Check the whole tree and build its entries, parents first; nothing is written.

    Raises:
        PayloadError: a bad job or option (the message names the job's place in the tree), a
            job id used twice, an unusable queue name, or more jobs than ``max_flow_jobs``.
    """
    root = flow if isinstance(flow, FlowJob) else FlowJob.from_dict(_mapping(flow))
    limit = service.settings.max_flow_jobs
    entries: list[FlowEntry] = []
    numbers: list[int] = []  # each entry's place among its parent's children
    ids: dict[str, int] = {}

    def path(parent: int | None, number: int) -> str:
        # Built only for an error: a chain of thousands is as deep as it is long.
        parts: list[str] = []
        while parent is not None:
            parts.append(f"children[{number}]")
            number = numbers[parent]
            parent = entries[parent].parent
        return ".".join(["root", *reversed(parts)])

    stack: list[tuple[Any, int | None, int]] = [(root, None, 0)]
    while stack:
        job, parent, number = stack.pop()
        if not isinstance(job, FlowJob):
            raise PayloadError(f"flow job {path(parent, number)} must be a FlowJob, got {job!r}")
        if len(entries) >= limit:
            raise PayloadError(
                f"the flow has more than {limit} jobs (QUEUE_MAX_FLOW_JOBS); split it, or raise "
                "the limit"
            )
        try:
            new = _new_job(service, job)
        except PayloadError as exc:
            raise PayloadError(f"flow job {path(parent, number)} ({job.name!r}): {exc}") from None
        if new.job_id is not None:
            if new.job_id in ids:
                other = ids[new.job_id]
                raise PayloadError(
                    f"flow job {path(parent, number)} ({job.name!r}): job_id {new.job_id!r} is "
                    f"also used by flow job {path(entries[other].parent, numbers[other])}; "
                    "every job of a flow needs its own id"
                )
            ids[new.job_id] = len(entries)
        try:
            policy = ChildPolicy(job.on_child_failure)
        except ValueError:
            raise PayloadError(
                f"flow job {path(parent, number)} ({job.name!r}): on_child_failure must be one "
                f"of {_POLICIES}, got {job.on_child_failure!r}"
            ) from None
        index = len(entries)
        entries.append(FlowEntry(new, parent, policy, bool(job.children)))
        numbers.append(number)
        for child_number in range(len(job.children) - 1, -1, -1):
            stack.append((job.children[child_number], index, child_number))
    return FlowPlan(entries)


def _mapping(flow: Any) -> Mapping[str, Any]:
    if not isinstance(flow, Mapping):
        raise PayloadError(f"a flow is a FlowJob or a mapping, got {flow!r}")
    return flow


def _new_job(service: QueueService, job: FlowJob) -> NewJob:
    queue = job.queue if job.queue is not None else service.settings.name
    try:
        check_queue_name(queue)
    except ValueError as exc:
        raise PayloadError(f"queue name {queue!r} {exc}") from None
    return service.build_job(
        job.name,
        job.data,
        delay_s=job.delay_s,
        priority=job.priority,
        attempts=job.attempts,
        backoff=job.backoff,
        job_id=job.job_id,
        queue=queue,
    )


# -- running -----------------------------------------------------------------------------------


async def write_flow(backend: QueueBackend, plan: FlowPlan) -> FlowNode:
    """Write a checked flow; return its tree of ids (see :meth:`QueueService.enqueue_flow`)."""
    written = await backend.enqueue_flow(plan.entries)
    if written.existed:
        root_id = written.ids[0]
        queue = plan.entries[0].job.queue
        assert root_id is not None and queue is not None
        stored = await read_flow(backend, JobRef(queue, root_id), limit=len(plan.entries))
        if stored is not None:
            return stored
    return tree_of(plan.entries, written.ids)


def tree_of(entries: Sequence[FlowEntry], ids: Sequence[str | None]) -> FlowNode:
    """The :class:`FlowNode` tree of written entries (entries not written are left out)."""
    kids: list[list[FlowNode]] = [[] for _ in entries]
    root: FlowNode | None = None
    for index in range(len(entries) - 1, -1, -1):  # children before their parent
        job_id = ids[index]
        if job_id is None:
            continue
        entry = entries[index]
        node = FlowNode(job_id, entry.job.queue or "", entry.job.name, tuple(reversed(kids[index])))
        if entry.parent is None:
            root = node
        else:
            kids[entry.parent].append(node)
    assert root is not None
    return root


async def read_flow(backend: QueueBackend, root: JobRef, *, limit: int) -> FlowNode | None:
    """The flow under the job ``root`` as stored (at most ``limit`` jobs), or ``None`` if that
    job does not exist. Children that were removed since are left out."""
    info = await backend.for_queue(root.queue).get_job(root.id)
    if info is None:
        return None
    order = [root]  # breadth first: every parent before its children
    names: dict[JobRef, str] = {root: info.name}
    kids: dict[JobRef, list[JobRef]] = {}
    position = 0
    while position < len(order) and len(order) < limit:
        ref = order[position]
        position += 1
        for child in await backend.for_queue(ref.queue).children(ref.id):
            child_ref = JobRef(child.queue, child.id)
            if child.name is None or child_ref in names or len(order) >= limit:
                continue
            names[child_ref] = child.name
            kids.setdefault(ref, []).append(child_ref)
            order.append(child_ref)
    built: dict[JobRef, FlowNode] = {}
    for ref in reversed(order):  # children before their parent, without recursion
        children = tuple(built.pop(kid) for kid in kids.get(ref, ()))
        built[ref] = FlowNode(ref.id, ref.queue, names[ref], children)
    return built[root]
