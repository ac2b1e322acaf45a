// Node BullMQ with OpenTelemetry through bullmq-otel, spans kept in memory.
// Input: {url, queue, prefix?, mode: "produce", name, data}: adds one job in a span of its own;
//   prints {id, traceId, spanId} of the producer span ("add <queue>.<name>").
// Input: {..., mode: "work", expect, timeoutMs?}: a Worker runs `expect` jobs (each returns
//   {ok: true}); prints {spans: [{name, kind, traceId, spanId, parentSpanId}], timedOut}.
import { context, propagation, trace } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { Queue, Worker } from 'bullmq';
import { BullMQOtel } from 'bullmq-otel';
import { connect, input, output, queueOpts } from './common.mjs';

const exporter = new InMemorySpanExporter();
trace.setGlobalTracerProvider(
  new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }),
);
propagation.setGlobalPropagator(new W3CTraceContextPropagator());
context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());

const args = input();
const connection = connect(args.url);
const telemetry = new BullMQOtel({ tracerName: 'corral-interop' });
const opts = { ...queueOpts(args, connection), telemetry };

function described(span) {
  return {
    name: span.name,
    kind: span.kind,
    traceId: span.spanContext().traceId,
    spanId: span.spanContext().spanId,
    parentSpanId: span.parentSpanContext?.spanId ?? null,
  };
}

if (args.mode === 'produce') {
  const queue = new Queue(args.queue, opts);
  try {
    const job = await queue.add(args.name, args.data ?? {});
    const add = exporter.getFinishedSpans().find(s => s.name.startsWith('add '));
    output({ id: job.id, ...described(add) });
  } finally {
    await queue.close();
    connection.disconnect();
  }
} else {
  let finished = 0;
  let done;
  const allDone = new Promise(resolve => (done = resolve));
  const worker = new Worker(args.queue, async () => ({ ok: true }), opts);
  worker.on('completed', () => {
    finished += 1;
    if (finished >= args.expect) done(false);
  });
  const timer = setTimeout(() => done(true), args.timeoutMs ?? 10000);
  const timedOut = await allDone;
  clearTimeout(timer);
  await worker.close();
  connection.disconnect();
  output({ spans: exporter.getFinishedSpans().map(described), timedOut });
}
