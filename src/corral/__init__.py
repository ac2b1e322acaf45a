"""corral: a Python job queue with one API over SQLite and BullMQ on Redis."""

from corral.errors import (
    BackendConnectionError,
    BackendError,
    ConfigError,
    CorralError,
    HandlerTimeoutError,
    JobNotFoundError,
    LeaseLostError,
    NoHandlerError,
    PayloadError,
    UnrecoverableError,
)
from corral.message import JobInfo, JobState, QueueMessage
from corral.retry import Retry
from corral.service import QueueService
from corral.settings import QueueSettings

__version__ = "0.1.0"

__all__ = [
    "BackendConnectionError",
    "BackendError",
    "ConfigError",
    "CorralError",
    "HandlerTimeoutError",
    "JobInfo",
    "JobNotFoundError",
    "JobState",
    "LeaseLostError",
    "NoHandlerError",
    "PayloadError",
    "QueueMessage",
    "QueueService",
    "QueueSettings",
    "Retry",
    "UnrecoverableError",
    "__version__",
]
