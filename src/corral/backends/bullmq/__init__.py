"""The BullMQ backend: jobs in Redis in BullMQ's own layout (needs ``corral[redis]``)."""

from corral.backends.bullmq.backend import BullMQBackend
from corral.backends.bullmq.protocol import LIB_VERSION

__all__ = ["LIB_VERSION", "BullMQBackend"]
