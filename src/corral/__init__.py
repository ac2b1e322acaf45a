"""corral: a Python job queue with one API over SQLite and BullMQ on Redis."""

from corral.dedup import Deduplication
from corral.errors import (
    BackendAuthError,
    BackendConnectionError,
    BackendError,
    ConfigError,
    CorralError,
    HandlerCrashError,
    HandlerTimeoutError,
    JobActiveError,
    JobFailedError,
    JobNotFoundError,
    LeaseLostError,
    MissingDependencyError,
    NoHandlerError,
    PayloadError,
    ScheduleConflictError,
    TaskModuleError,
    UnrecoverableError,
    WaitTimeoutError,
)
from corral.flows import FlowJob, FlowNode, chain, chord
from corral.message import Child, ChildStatus, Event, JobInfo, JobRef, JobState, QueueMessage
from corral.retry import Retry
from corral.schedules import ScheduleInfo
from corral.service import QueueService
from corral.settings import QueueSettings

__version__ = "0.1.0"

__all__ = [
    "BackendAuthError",
    "BackendConnectionError",
    "BackendError",
    "Child",
    "ChildStatus",
    "ConfigError",
    "CorralError",
    "Deduplication",
    "Event",
    "FlowJob",
    "FlowNode",
    "HandlerCrashError",
    "HandlerTimeoutError",
    "JobActiveError",
    "JobFailedError",
    "JobInfo",
    "JobNotFoundError",
    "JobRef",
    "JobState",
    "LeaseLostError",
    "MissingDependencyError",
    "NoHandlerError",
    "PayloadError",
    "QueueMessage",
    "QueueService",
    "QueueSettings",
    "Retry",
    "ScheduleConflictError",
    "ScheduleInfo",
    "TaskModuleError",
    "UnrecoverableError",
    "WaitTimeoutError",
    "__version__",
    "chain",
    "chord",
]
