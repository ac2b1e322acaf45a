"""BullMQ's Redis key names (the package's ``QueueKeys``) and the sets and lists they group into."""

from __future__ import annotations

from bullmq.queue_keys import QueueKeys

DELAY_SCORE_FACTOR = 0x1000
"""Delayed-set scores are ``timestamp_ms * 0x1000 + counter``."""

DEPENDENCY_SETS = ("dependencies", "processed", "failed", "unsuccessful")

COUNT_TYPES = (
    "wait",
    "paused",
    "prioritized",
    "waiting-children",
    "delayed",
    "active",
    "completed",
    "failed",
)
CLEAN_SETS = (
    "wait",
    "paused",
    "prioritized",
    "delayed",
    "completed",
    "failed",
    "waiting-children",
)


class Keys:
    """The key names of the queues under one prefix (BullMQ's ``QueueKeys``), computed once."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._table = QueueKeys(prefix)
        self._queues: dict[str, dict[str, str]] = {}

    def of(self, queue: str) -> dict[str, str]:
        """Every key of ``queue``; ``""`` is the job key prefix ``<prefix>:<queue>:``."""
        keys = self._queues.get(queue)
        if keys is None:
            keys = self._queues[queue] = self._table.getKeys(queue)
        return keys

    def job(self, queue: str, job_id: str) -> str:
        return self.of(queue)[""] + job_id

    def qualified(self, queue: str) -> str:
        """``<prefix>:<queue>``: Node's ``queue.qualifiedName``, a child's ``parent.queueKey``."""
        return self.of(queue)[""][:-1]

    def split_job_key(self, key: str) -> tuple[str, str]:
        """``(queue, id)`` of a job key ``<prefix>:<queue>:<id>``, as Node's ``parseNodeKey``
        (the last two colons) when the key is not under this prefix."""
        head = self.prefix + ":"
        if key.startswith(head):
            queue, _, job_id = key[len(head) :].rpartition(":")
            if queue:
                return queue, job_id
        parts = key.rsplit(":", 2)
        if len(parts) == 3:
            return parts[1], parts[2]
        return "", key
