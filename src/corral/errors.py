"""The exceptions corral raises. Every one derives from :class:`CorralError`."""

from __future__ import annotations


class CorralError(Exception):
    """Root of every error corral raises."""


class ConfigError(CorralError, ValueError):
    """A setting has a value corral cannot use; the message names the env var and the fix."""


class PayloadError(CorralError, ValueError):
    """A job payload or option was refused before anything was written."""


class BackendError(CorralError):
    """The storage behind a queue failed or holds something corral cannot read."""


class BackendConnectionError(BackendError):
    """The storage (SQLite file, Redis server) could not be reached or opened."""


class BackendAuthError(BackendConnectionError):
    """The storage refused the credentials; retrying will not help until they are fixed."""


class LeaseLostError(BackendError):
    """A worker tried to finish a job whose lease it no longer holds; the job was left untouched."""


class JobActiveError(BackendError):
    """The job is active (a worker holds its lease), so it cannot be removed or changed now."""


class ScheduleConflictError(BackendError):
    """A schedule's job is in the way: the pending job of a schedule cannot be removed on its own
    (unschedule it), or the time slot a schedule would write already has a job."""


class ChildrenPendingError(CorralError):
    """A parent job cannot complete: children of it are still pending or failed it."""


class MissingDependencyError(ConfigError):
    """A setting needs a package that is not installed; the message names the pip command."""


class TaskModuleError(ConfigError):
    """A task module could not be imported or defines no QueueService."""


class JobNotFoundError(CorralError, KeyError):
    """No job with that id exists in the queue."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "job not found"


class JobFailedError(CorralError):
    """The job waited for failed for good; ``reason`` and ``traceback`` are its last attempt's."""

    def __init__(self, job_id: str, reason: str, traceback: str | None = None) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason
        self.traceback = traceback


class WaitTimeoutError(CorralError, TimeoutError):
    """The job waited for did not finish in time; it is left as it is (it may still finish)."""


class UnrecoverableError(Exception):
    """Raise from a handler to fail the job at once, with no further attempts."""


class HandlerTimeoutError(CorralError, TimeoutError):
    """A handler ran longer than its ``timeout_s``; that attempt failed."""


class HandlerCrashError(CorralError):
    """An isolated handler's process died (a crash, ``os._exit``) before it answered; that
    attempt failed."""


class NoHandlerError(CorralError, LookupError):
    """A worker received a job whose name has no registered handler."""


class BenchError(CorralError):
    """A benchmark phase could not run (a runner failed, timed out or answered nonsense)."""


class Unsupported(BenchError):
    """The system has no API for what the phase measures (e.g. Huey has no bulk enqueue)."""
