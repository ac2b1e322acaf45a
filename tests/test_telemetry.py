"""OpenTelemetry traces (corral.telemetry) with the SDK's in-memory exporter: producer and
consumer spans on both backends, the context in the job as bullmq-otel writes it, and traces
that cross between Node.js BullMQ (with bullmq-otel) and corral."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from corral import FlowJob, QueueMessage, QueueService
from corral.telemetry import instrument
from test_interop import node_args, node_bullmq, run_node  # noqa: F401  (a fixture)

from conftest import SettingsFactory, finished, run_worker_until


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def hex_id(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


async def test_a_job_continues_its_producers_trace(
    make_settings: SettingsFactory, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    settings = make_settings()
    q = settings.name
    tracer = provider.get_tracer("app")
    async with QueueService(settings) as service, QueueService(settings) as worker:
        instrument(service, tracer_provider=provider)

        @service.handler("parent")
        async def parent(message: QueueMessage) -> None:
            await message.enqueue("child", {"from": message.id})

        service.handler("sync")(_ok)

        @service.handler("child")
        async def child(message: QueueMessage) -> None:
            raise ValueError("child fails")

        with tracer.start_as_current_span("request") as request:
            job_id = await service.enqueue("parent", {"n": 1})
        # Synchronous code (a thread, its own span) is traced too.
        sync_id = await asyncio.to_thread(_enqueue_sync_in_span, service, tracer)
        worker.include(service)  # as `corral worker` gathers a task module's service
        await run_worker_until(worker, finished(worker, 3))

    (add,) = named(exporter, f"add {q}.parent")
    assert add.kind == SpanKind.PRODUCER
    assert add.parent is not None and add.parent.span_id == request.get_span_context().span_id
    assert add.attributes is not None
    assert add.attributes["messaging.destination.name"] == q
    assert add.attributes["messaging.message.id"] == job_id
    assert add.attributes["bullmq.job.name"] == "parent"

    (sync_add,) = named(exporter, f"add {q}.sync")
    (sync_request,) = named(exporter, "sync request")
    assert sync_add.parent is not None
    assert sync_add.parent.span_id == sync_request.context.span_id
    assert sync_add.attributes is not None and sync_add.attributes["bullmq.job.id"] == sync_id

    processed = {
        span.attributes["bullmq.job.name"]: span for span in named(exporter, f"process {q}")
    }  # type: ignore[index]
    run = processed["parent"]
    assert run.kind == SpanKind.CONSUMER
    assert run.context.trace_id == add.context.trace_id
    assert run.parent is not None and run.parent.span_id == add.context.span_id
    assert run.attributes is not None and run.attributes["messaging.operation.type"] == "process"
    assert run.status.status_code != StatusCode.ERROR

    # The job the handler enqueued belongs to the handler's span, and its run to that.
    (add_child,) = named(exporter, f"add {q}.child")
    assert add_child.parent is not None and add_child.parent.span_id == run.context.span_id
    failed = processed["child"]
    assert failed.parent is not None and failed.parent.span_id == add_child.context.span_id
    assert failed.context.trace_id == add.context.trace_id
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "ValueError: child fails"


async def test_a_flow_is_one_producer_span_its_jobs_run_under(
    make_settings: SettingsFactory, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    settings = make_settings()
    async with QueueService(settings) as service:
        instrument(service, tracer_provider=provider)
        for name in ("assemble", "part"):
            service.handler(name)(_ok)
        await service.enqueue_flow(
            FlowJob("assemble", children=[FlowJob("part", 1), FlowJob("part", 2)])
        )
        await run_worker_until(service, finished(service, 3))
    (add,) = named(exporter, f"addBulk {settings.name}")
    assert add.attributes is not None and add.attributes["messaging.batch.message_count"] == 3
    runs = named(exporter, f"process {settings.name}")
    assert len(runs) == 3
    assert all(run.parent is not None and run.parent.span_id == add.context.span_id for run in runs)


@pytest.mark.parametrize("backend_kind", ["bullmq"])
async def test_bullmq_jobs_carry_the_context_in_tm(
    make_settings: SettingsFactory,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    redis_url: str,
) -> None:
    """As bullmq-otel's getMetadata writes it: the propagator's headers as JSON, in opts.tm."""
    provider, exporter = spans
    settings = make_settings()
    async with QueueService(settings) as service:
        instrument(service, tracer_provider=provider)
        ids = await service.enqueue_many([{"name": "a"}, {"name": "b"}])
    (bulk,) = named(exporter, f"addBulk {settings.name}")
    assert bulk.attributes is not None and bulk.attributes["messaging.batch.message_count"] == 2
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for job_id in ids:
            opts = json.loads(client.hget(f"bull:{settings.name}:{job_id}", "opts") or "{}")
            context = bulk.context
            ids_hex = f"{hex_id(context.trace_id, 32)}-{hex_id(context.span_id, 16)}"
            expected = f"00-{ids_hex}-{int(context.trace_flags):02x}"
            assert json.loads(opts["tm"]) == {"traceparent": expected}
    finally:
        client.close()


@pytest.mark.node
@pytest.mark.parametrize("backend_kind", ["bullmq"])
async def test_traces_cross_between_node_and_corral(
    make_settings: SettingsFactory,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    node_bullmq: Path,  # noqa: F811
) -> None:
    provider, exporter = spans
    settings = make_settings()
    q = settings.name
    # A Node producer with bullmq-otel, a corral worker.
    produced = await run_node(
        "otel.mjs", node_args(settings, mode="produce", name="from-node", data={"n": 1})
    )
    assert produced["name"] == f"add {q}.from-node"
    async with QueueService(settings) as service:
        instrument(service, tracer_provider=provider)
        service.handler("from-node")(_ok)
        await run_worker_until(service, finished(service, 1))
        (run,) = named(exporter, f"process {q}")
        assert hex_id(run.context.trace_id, 32) == produced["traceId"]
        assert run.parent is not None and hex_id(run.parent.span_id, 16) == produced["spanId"]

        # A corral producer, a Node worker with bullmq-otel.
        await service.enqueue("from-corral", {"n": 2})
    (add,) = named(exporter, f"add {q}.from-corral")
    worked = await run_node("otel.mjs", node_args(settings, mode="work", expect=1))
    assert not worked["timedOut"], worked
    (node_run,) = [s for s in worked["spans"] if s["name"] == f"process {q}"]
    assert node_run["traceId"] == hex_id(add.context.trace_id, 32)
    assert node_run["parentSpanId"] == hex_id(add.context.span_id, 16)


async def _ok(message: QueueMessage) -> None:
    return None


def _enqueue_sync_in_span(service: QueueService, tracer: Any) -> str:
    with tracer.start_as_current_span("sync request"):
        return service.enqueue_sync("sync", {"n": 2})
