"""OpenTelemetry traces (``pip install 'corral[otel]'``): a producer span per enqueue and a
consumer span per attempt, with the trace context carried in the job as Node.js BullMQ's
telemetry (``bullmq-otel``) carries it.

:func:`instrument` turns it on for a :class:`~corral.service.QueueService` (producers and
workers alike); spans go to the tracer provider the application set up (the global one unless
another is passed), so without an SDK they cost next to nothing.

- An enqueue (``enqueue``, ``enqueue_many``, ``enqueue_flow``, their ``_sync`` forms,
  ``message.enqueue``) is a span ``add <queue>.<name>`` (``addBulk <queue>`` for several jobs,
  a flow's too) of kind PRODUCER. The
  context of that
  span is stored with each job: the propagator's headers (W3C ``traceparent``, and ``baggage``
  with the default propagators) as a JSON object, in the job's ``tm`` option on BullMQ (Node's
  ``opts.telemetry.metadata``: exactly what ``bullmq-otel``'s ``getMetadata`` writes) and in the
  ``trace_context`` column on SQLite.
- Each attempt a worker runs is a span ``process <queue>`` of kind CONSUMER, the child of the
  producer's span when the job carries a context (so a trace started by a Node.js producer with
  ``bullmq-otel`` continues in a corral worker, and a corral producer's trace continues in a Node
  worker), and the current span while the handler runs (the handler's own spans and the jobs it
  enqueues belong to it). A failed attempt sets the span's status to ERROR with the error.

Attributes follow the messaging semantic conventions (``messaging.system``,
``messaging.operation.type``/``.name``, ``messaging.destination.name``,
``messaging.message.id``, ``messaging.batch.message_count``) and carry BullMQ's own
(``bullmq.queue.name``, ``bullmq.queue.operation``, ``bullmq.job.name``, ``bullmq.job.id``,
``bullmq.job.attempts.made``), as Node's spans do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from corral import __version__
from corral.errors import MissingDependencyError
from corral.message import (
    Dispatch,
    Failed,
    NewJob,
    Outcome,
    QueueMessage,
    RetryLater,
    Send,
)

if TYPE_CHECKING:
    from corral.service import QueueService

OTEL_EXTRA_HINT = "pip install 'corral[otel]'"


def _api() -> tuple[Any, Any, Any]:
    """``opentelemetry``'s ``trace``, ``propagate`` and ``context`` modules."""
    try:
        from opentelemetry import context, propagate, trace
    except ImportError as exc:
        raise MissingDependencyError(
            f"OpenTelemetry tracing needs the opentelemetry-api package: {OTEL_EXTRA_HINT}"
        ) from exc
    return trace, propagate, context


def instrument(service: QueueService, *, tracer_provider: Any = None) -> None:
    """Trace ``service``'s enqueues and the job runs of its workers (see the module docstring).

    Args:
        tracer_provider: where the spans go; by default OpenTelemetry's global provider.
    """
    trace, _, _ = _api()
    tracer = trace.get_tracer("corral", __version__, tracer_provider=tracer_provider)
    system = "bullmq" if service.settings.backend == "bullmq" else "corral"
    default_queue = service.settings.name

    def sender(send: Send) -> Send:
        async def traced(jobs: list[NewJob]) -> list[str]:
            return await _produce(tracer, system, default_queue, send, jobs)

        return traced

    def instrumented(dispatch: Dispatch) -> Dispatch:
        async def traced(message: QueueMessage) -> Outcome:
            return await _consume(tracer, system, dispatch, message)

        return traced

    service.senders.append(sender)
    service.instruments.append(instrumented)


def carrier_of(context: Any = None) -> str | None:
    """The trace context ``context`` (the current one by default) as a job carries it: the
    propagator's headers as JSON, ``None`` when there is nothing to carry."""
    _, propagate, _ = _api()
    headers: dict[str, str] = {}
    propagate.inject(headers, context=context)
    return json.dumps(headers, separators=(",", ":")) if headers else None


def context_of(carried: str | None) -> Any:
    """The context a job's carried trace context (:func:`carrier_of`) stands for, or ``None``
    when it carries none (or nothing readable: a foreign producer's text is never an error)."""
    if not carried:
        return None
    try:
        headers = json.loads(carried)
    except ValueError:
        return None
    if not isinstance(headers, Mapping):
        return None
    _, propagate, _ = _api()
    return propagate.extract({str(k): str(v) for k, v in headers.items()})


async def _produce(
    tracer: Any, system: str, default_queue: str, send: Send, jobs: list[NewJob]
) -> list[str]:
    trace, _, _ = _api()
    queues = sorted({job.queue or default_queue for job in jobs})
    queue = queues[0] if len(queues) == 1 else ",".join(queues)
    single = len(jobs) == 1
    operation = "add" if single else "addBulk"
    name = f"add {queue}.{jobs[0].name}" if single else f"addBulk {queue}"
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.operation.type": "send",
        "messaging.operation.name": operation,
        "messaging.destination.name": queue,
        "bullmq.queue.name": queue,
        "bullmq.queue.operation": operation,
    }
    if single:
        attributes["bullmq.job.name"] = jobs[0].name
    else:
        attributes["messaging.batch.message_count"] = len(jobs)
        attributes["bullmq.job.bulk.count"] = len(jobs)
        attributes["bullmq.job.bulk.names"] = [job.name for job in jobs]
    with tracer.start_as_current_span(
        name, kind=trace.SpanKind.PRODUCER, attributes=attributes
    ) as span:
        carried = carrier_of(trace.set_span_in_context(span))
        if carried is not None:
            for job in jobs:
                if job.trace_context is None:
                    job.trace_context = carried
        ids = await send(jobs)
        if single and ids:
            span.set_attribute("messaging.message.id", ids[0])
            span.set_attribute("bullmq.job.id", ids[0])
        return ids


async def _consume(tracer: Any, system: str, dispatch: Dispatch, message: QueueMessage) -> Outcome:
    trace, _, _ = _api()
    attributes = {
        "messaging.system": system,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": message.queue,
        "messaging.message.id": message.id,
        "bullmq.queue.name": message.queue,
        "bullmq.queue.operation": "process",
        "bullmq.job.id": message.id,
        "bullmq.job.name": message.name,
        "bullmq.job.attempts.made": message.attempt - 1,
    }
    with tracer.start_as_current_span(
        f"process {message.queue}",
        context=context_of(message.trace_context),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        outcome = await dispatch(message)
        if isinstance(outcome, Failed | RetryLater):
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error))
            span.set_attribute("error.type", outcome.error.partition(":")[0] or "Error")
            span.add_event(
                "job failed" if isinstance(outcome, Failed) else "job attempt failed, retried",
                {"bullmq.job.failed.reason": outcome.error},
            )
        else:
            span.add_event("job completed")
        return outcome
