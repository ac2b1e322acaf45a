"""Flows on BullMQ: written and read as Node.js BullMQ's ``FlowProducer`` and ``Job`` do.

A flow is one MULTI of the package's add scripts in pre-order: ``addParentJob`` for a job with
children (it waits in the ``waiting-children`` sorted set), the usual add script for a leaf,
each child with its parent's key, its ``parent`` field (``{id, queueKey}`` and the policy flag)
and ``opts.parent`` (``{id, queue}``, which Bull Board follows to a flow's root). Settling a
child needs nothing more: ``moveToFinished`` reads the child's ``parent`` field and updates the
parent's ``dependencies``/``processed``/``failed``/``unsuccessful`` keys and releases it, in the
same script as the child's own outcome.

Sits beside :mod:`.source`, above :mod:`.connection`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.backends.bullmq.connection import Client, RedisStore
from corral.backends.bullmq.protocol import FLOW_ERRORS, ParentLink, ScriptCall
from corral.errors import BackendError, ConfigError, PayloadError
from corral.message import Child, ChildStatus, FlowEntry, FlowWrite
from corral.payload import decode_lenient
from corral.settings import QueueSettings

CHILDREN_REFUSALS = {
    -4: "children of it are pending (it was released early, by on_child_failure='continue' "
    "or a retry)",
    -9: "children of it failed it (on_child_failure='fail'); retry them first",
}
"""moveToFinished's refusals to complete a parent (its ``:dependencies`` or ``:unsuccessful``
are not empty); checked before the lock is touched, so the worker still holds the job."""


@dataclass(frozen=True, slots=True)
class _Existing:
    """A job of a flow that exists already (your job_id): it is attached, not written."""

    completed: bool


async def write_flow(
    store: RedisStore, settings: QueueSettings, entries: Sequence[FlowEntry]
) -> FlowWrite:
    """Write a flow (see ``QueueBackend.enqueue_flow``).

    Ids are chosen first (yours, or a random hex id, as the Python ``FlowProducer`` does), since
    a child names its parent. With your own ids the existing jobs are read under WATCH: a root
    that exists makes the call a no-op; an existing child is attached by the add script's
    duplicate path. The package's 3.4.4 scripts release a parent as soon as an attached child
    that already completed is added, even with siblings still to come (Node 6.x defers that
    release); so attached completed children are written after all their siblings, when the
    parent's set of pending children is complete.
    """
    writer = _FlowWriter(store, settings, entries)
    return await writer.write()


class _FlowWriter:
    def __init__(
        self, store: RedisStore, settings: QueueSettings, entries: Sequence[FlowEntry]
    ) -> None:
        self.store = store
        self.protocol = store.protocol
        self.settings = settings
        self.entries = entries
        self.queues = [entry.job.queue or settings.name for entry in entries]
        self.ids = [entry.job.job_id or uuid.uuid4().hex for entry in entries]
        self.children: list[list[int]] = [[] for _ in entries]
        for index, entry in enumerate(entries):
            if entry.parent is not None:
                self.children[entry.parent].append(index)

    async def write(self) -> FlowWrite:
        queues = sorted(set(self.queues))
        self._check_one_slot(queues)
        timestamp = round(time.time() * 1000)
        custom = [i for i, entry in enumerate(self.entries) if entry.job.job_id is not None]
        written = FlowWrite(list[str | None](self.ids))
        with self.store.errors("adding a flow"):
            await self.store.ready(*queues)
            if not custom:  # every id is new: no job can exist, nothing to read first
                results = await self.store.run_atomically(self._calls({}, timestamp, written))
            else:

                async def plan(client: Client) -> list[ScriptCall] | None:
                    found = await self._existing(client, custom)
                    if 0 in found:
                        written.ids = [self.ids[0]] + [None] * (len(self.entries) - 1)
                        written.existed = True
                        return None
                    written.ids = list(self.ids)
                    return self._calls(found, timestamp, written)

                keys = self.protocol.keys
                watched = [keys.job(self.queues[i], self.ids[i]) for i in custom]
                results = await self.store.run_watched(watched, plan) or []
        for result in results:
            if isinstance(result, int) and result < 0:
                why = FLOW_ERRORS.get(result, f"code {result}")
                raise BackendError(f"BullMQ refused a job of the flow: {why}")
        return written

    def _check_one_slot(self, queues: Sequence[str]) -> None:
        """The MULTI, and moveToFinished's writes to a parent of another queue, need every
        queue of the flow in one cluster slot."""
        if not self.store.cluster:
            return
        keys = [self.protocol.keys.of(queue)["id"] for queue in queues]
        if len(self.store.slots(keys)) > 1:
            raise ConfigError(
                "on Redis Cluster every queue of a flow must share one hash slot, and the "
                f"queues {', '.join(queues)} do not under QUEUE_PREFIX "
                f"{self.settings.prefix!r}; give them one hash-tagged prefix, e.g. {{bull}}"
            )

    async def _existing(self, client: Client, custom: list[int]) -> dict[int, _Existing]:
        """The entries whose id names an existing job; a job that cannot be attached is
        refused here, before anything is written."""
        keys = self.protocol.keys
        async with client.pipeline(transaction=False) as pipe:
            for i in custom:
                queue_keys = keys.of(self.queues[i])
                pipe.hmget(keys.job(self.queues[i], self.ids[i]), "name", "parentKey")
                pipe.zscore(queue_keys["completed"], self.ids[i])
                pipe.zscore(queue_keys["failed"], self.ids[i])
            replies = await pipe.execute()
        found: dict[int, _Existing] = {}
        for n, i in enumerate(custom):
            (name, parent_key), completed, failed = replies[3 * n : 3 * n + 3]
            if name is None:
                continue
            where = f"job {self.ids[i]!r} of queue {self.queues[i]!r}"
            if i != 0 and parent_key:
                raise PayloadError(
                    f"{where} already belongs to a flow (it has a parent); give this flow job "
                    "another job_id"
                )
            if i != 0 and failed is not None:
                raise PayloadError(
                    f"{where} exists and failed; retry or remove it before using its job_id "
                    "in a flow"
                )
            found[i] = _Existing(completed=completed is not None)
        return found

    def _calls(
        self, existing: Mapping[int, _Existing], timestamp: int, written: FlowWrite
    ) -> list[ScriptCall]:
        """The add calls, parents before children; an existing job is attached, and what is
        under it in the entries is not written (``None`` in ``written.ids``)."""
        protocol, settings = self.protocol, self.settings
        calls: list[ScriptCall] = []
        stack = [0]
        while stack:
            index = stack.pop()
            entry = self.entries[index]
            parent = None
            if entry.parent is not None:
                parent = ParentLink(
                    self.queues[entry.parent], self.ids[entry.parent], entry.on_failure
                )
            opts = protocol.job_opts(
                entry.job, keep_completed=settings.keep_completed, keep_failed=settings.keep_failed
            )
            if parent is not None:
                opts = protocol.child_opts(opts, parent)
            attached = index in existing
            calls.append(
                protocol.add_job(
                    self.queues[index],
                    entry.job,
                    opts,
                    timestamp,
                    job_id=self.ids[index],
                    parent=parent,
                    waiting_children=entry.has_children and not attached,
                )
            )
            if attached:
                for below in self._below(index):
                    written.ids[below] = None
                continue
            # Attached completed children last (see write_flow); the stack pops in reverse.
            kids = self.children[index]
            done = {k for k in kids if k in existing and existing[k].completed}
            ordered = [k for k in kids if k not in done] + [k for k in kids if k in done]
            stack.extend(reversed(ordered))
        return calls

    def _below(self, index: int) -> list[int]:
        found: list[int] = []
        stack = list(self.children[index])
        while stack:
            at = stack.pop()
            found.append(at)
            stack.extend(self.children[at])
        return found


async def read_children(store: RedisStore, queue: str, job_id: str) -> list[Child]:
    """The children of a job, from its four dependency keys as Node's ``getDependencies`` reads
    them (``processed``: completed, with results; ``failed``: failures ignored by ``idof`` or
    ``cpof`` -- Node calls these *ignored*; ``unsuccessful``: ``fpof`` failures -- Node's
    *failed*; ``dependencies``: pending), with each child's name and failure reason."""
    protocol = store.protocol
    keys = protocol.dependency_keys(queue, job_id)
    with store.errors(f"reading the children of job {job_id}"):
        client = store.client()
        async with client.pipeline(transaction=False) as pipe:
            pipe.smembers(keys["dependencies"])
            pipe.hgetall(keys["processed"])
            pipe.hgetall(keys["failed"])
            pipe.zrange(keys["unsuccessful"], 0, -1)
            pending, processed, ignored, unsuccessful = await pipe.execute()
        found: list[tuple[str, ChildStatus, Any, str | None]] = [
            *((k, ChildStatus.COMPLETED, decode_lenient(v), None) for k, v in processed.items()),
            *((k, ChildStatus.IGNORED, None, str(v)) for k, v in ignored.items()),
            *((str(k), ChildStatus.FAILED, None, None) for k in unsuccessful),
            *((str(k), ChildStatus.PENDING, None, None) for k in pending),
        ]
        if not found:
            return []
        found.sort(key=lambda item: item[0])
        async with client.pipeline(transaction=False) as pipe:
            for key, *_ in found:
                pipe.hmget(key, "name", "failedReason")
            fields = await pipe.execute()
    children = []
    for (key, status, result, error), (name, reason) in zip(found, fields, strict=True):
        child_queue, child_id = protocol.keys.split_job_key(key)
        if status is ChildStatus.FAILED:
            error = reason
        children.append(Child(child_queue, child_id, status, name, result, error))
    return children
