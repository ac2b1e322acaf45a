#!/usr/bin/env node
// The Node.js BullMQ system of bench/compare.py: the same measurements as corral's own runner,
// with the npm `bullmq` package of this folder (npm ci here; or --modules DIR). Every mode prints
// JSON.
//
//   node bullmq-bench.mjs enqueue --queue Q --count N [--batch B]    one by one (B=0) or addBulk
//   node bullmq-bench.mjs work --queue Q --count N --concurrency C   drain N prefilled no-op jobs
//   node bullmq-bench.mjs idle --queue Q --samples K                 idle pickup, in one process
//   node bullmq-bench.mjs idle-worker --queue Q                      a line per pickup; stdin EOF stops
//   node bullmq-bench.mjs producer                                   JSON commands on stdin, one a line
//   node bullmq-bench.mjs version                                    the bullmq version in use
//
// Common options: --redis URL (redis://127.0.0.1:6379/0), --modules DIR (the folder holding
// node_modules/bullmq; default this script's folder).
// Times are CLOCK_MONOTONIC microseconds (process.hrtime), the clock Python's time.monotonic_ns()
// reads, so a producer in one language and a worker in another measure the same interval.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  const [mode, ...rest] = argv;
  const opts = {
    mode,
    redis: 'redis://127.0.0.1:6379/0',
    modules: HERE,
    queue: 'bench',
    count: 1000,
    batch: 0,
    concurrency: 1,
    samples: 20,
    gapMinMs: 50,
    gapMaxMs: 200,
    maxS: 120,
    warm: 100,
  };
  const names = {
    '--redis': 'redis',
    '--modules': 'modules',
    '--queue': 'queue',
    '--count': 'count',
    '--batch': 'batch',
    '--concurrency': 'concurrency',
    '--samples': 'samples',
    '--gap-min-ms': 'gapMinMs',
    '--gap-max-ms': 'gapMaxMs',
    '--max-s': 'maxS',
    '--warm': 'warm',
  };
  for (let i = 0; i < rest.length; i += 2) {
    const key = names[rest[i]];
    if (key === undefined || i + 1 >= rest.length) {
      throw new Error(`unknown option or missing value: ${rest[i]}`);
    }
    opts[key] = typeof opts[key] === 'number' ? Number(rest[i + 1]) : rest[i + 1];
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const requireFrom = createRequire(join(opts.modules, 'package.json'));
const { Queue, Worker } = requireFrom('bullmq');

function connection(url) {
  const parsed = new URL(url);
  return {
    host: parsed.hostname || '127.0.0.1',
    port: Number(parsed.port || 6379),
    db: Number(parsed.pathname.replace('/', '') || 0),
    username: parsed.username || undefined,
    password: parsed.password ? decodeURIComponent(parsed.password) : undefined,
    maxRetriesPerRequest: null,
  };
}

const CONNECTION = connection(opts.redis);
const nowUs = () => Number(process.hrtime.bigint() / 1000n);
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

function memoryKb() {
  const status = readFileSync('/proc/self/status', 'utf8');
  const field = (name) => Number((status.match(new RegExp(`^${name}:\\s+(\\d+)`, 'm')) || [])[1]);
  return { rss_kb: field('VmRSS'), hwm_kb: field('VmHWM') };
}

function emit(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

async function openQueue(name) {
  const queue = new Queue(name, { connection: CONNECTION });
  await queue.waitUntilReady();
  return queue;
}

// Enqueue `count` no-op jobs: one by one when batch is 0, else addBulk in chunks of `batch`.
async function enqueue(queue, count, batch) {
  const started = process.hrtime.bigint();
  if (batch > 0) {
    for (let i = 0; i < count; i += batch) {
      const jobs = [];
      for (let j = i; j < Math.min(count, i + batch); j += 1) {
        jobs.push({ name: 'noop', data: { i: j } });
      }
      await queue.addBulk(jobs);
    }
  } else {
    for (let i = 0; i < count; i += 1) {
      await queue.add('noop', { i });
    }
  }
  const elapsedS = Number(process.hrtime.bigint() - started) / 1e9;
  return { ok: true, count, elapsed_s: elapsedS };
}

// Process `count` prefilled jobs; time from the first handler call to the count-th one.
async function work(name, count, concurrency, maxS, warm) {
  const startMem = memoryKb();
  let seen = 0;
  let firstUs = 0;
  let lastUs = 0;
  let warmMem = null;
  let endMem = null;
  let finish;
  const finished = new Promise((done) => {
    finish = done;
  });
  const worker = new Worker(
    name,
    async () => {
      const t = nowUs();
      seen += 1;
      if (seen === 1) firstUs = t;
      if (seen === warm) warmMem = memoryKb();
      if (seen === count) {
        lastUs = t;
        endMem = memoryKb();
        finish(false);
      }
    },
    { connection: CONNECTION, concurrency },
  );
  const timer = setTimeout(() => finish(true), maxS * 1000);
  const timedOut = await finished;
  clearTimeout(timer);
  if (timedOut) {
    lastUs = nowUs();
    endMem = memoryKb();
  }
  await worker.close();
  const jobs = seen;
  const elapsedS = jobs > 1 ? (lastUs - firstUs) / 1e6 : 0;
  return {
    ok: true,
    jobs,
    timed_out: timedOut,
    elapsed_s: elapsedS,
    rss_kb: { start: startMem.rss_kb, warm: (warmMem || endMem).rss_kb, end: endMem.rss_kb },
    hwm_kb: endMem.hwm_kb,
  };
}

function gap() {
  return opts.gapMinMs + Math.random() * (opts.gapMaxMs - opts.gapMinMs);
}

// A producer and a worker in this process: enqueue a job to the idle worker, wait for it.
async function idleInProcess(name, samples) {
  const queue = await openQueue(name);
  let picked = null;
  const worker = new Worker(
    name,
    async (job) => {
      const latency = nowUs() - job.data.t0_us;
      if (picked) picked(latency);
    },
    { connection: CONNECTION, concurrency: 1 },
  );
  await worker.waitUntilReady();
  await sleep(200);
  const latencies = [];
  for (let i = 0; i <= samples; i += 1) {
    await sleep(gap());
    const got = new Promise((done) => {
      picked = done;
    });
    await queue.add('noop', { t0_us: nowUs() });
    const latency = await got;
    if (i > 0) latencies.push(latency / 1000); // the first sample warms up
  }
  await worker.close();
  await queue.close();
  return { ok: true, latencies_ms: latencies };
}

// A worker that reports each pickup on stdout until its stdin closes.
async function idleWorker(name) {
  const worker = new Worker(
    name,
    async (job) => {
      emit({ latency_us: nowUs() - job.data.t0_us });
    },
    { connection: CONNECTION, concurrency: 1 },
  );
  await worker.waitUntilReady();
  emit({ ready: true });
  await new Promise((done) => {
    process.stdin.on('end', done);
    process.stdin.resume();
  });
  await worker.close();
}

// Commands on stdin, one JSON object a line; one JSON answer a line on stdout.
async function producer() {
  const queues = new Map();
  const get = async (name) => {
    if (!queues.has(name)) queues.set(name, await openQueue(name));
    return queues.get(name);
  };
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let answer;
    try {
      const command = JSON.parse(line);
      if (command.op === 'enqueue') {
        answer = await enqueue(await get(command.queue), command.count, command.batch || 0);
      } else if (command.op === 'probe') {
        const queue = await get(command.queue);
        await queue.add('noop', { t0_us: nowUs() });
        answer = { ok: true };
      } else if (command.op === 'close') {
        const queue = queues.get(command.queue);
        queues.delete(command.queue);
        if (queue) await queue.close();
        answer = { ok: true };
      } else {
        answer = { ok: false, error: `unknown op ${command.op}` };
      }
    } catch (error) {
      answer = { ok: false, error: String(error && error.stack ? error.stack : error) };
    }
    emit(answer);
  }
  for (const queue of queues.values()) await queue.close();
}

async function main() {
  switch (opts.mode) {
    case 'enqueue': {
      const queue = await openQueue(opts.queue);
      emit(await enqueue(queue, opts.count, opts.batch));
      await queue.close();
      break;
    }
    case 'work':
      emit(await work(opts.queue, opts.count, opts.concurrency, opts.maxS, opts.warm));
      break;
    case 'idle':
      emit(await idleInProcess(opts.queue, opts.samples));
      break;
    case 'idle-worker':
      await idleWorker(opts.queue);
      break;
    case 'producer':
      await producer();
      break;
    case 'version':
      emit({
        bullmq: JSON.parse(
          readFileSync(join(opts.modules, 'node_modules', 'bullmq', 'package.json'), 'utf8'),
        ).version,
        node: process.version,
      });
      break;
    default:
      throw new Error(`unknown mode ${opts.mode}; see the comment at the top of this script`);
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
    process.exit(1);
  },
);
