// Run a Node BullMQ Worker until `expect` jobs have finished for good (completed, or failed
// with no attempt left), then print what it saw.
//
// Input: {url, queue, prefix?, expect, timeoutMs?, concurrency?, maxDataPoints? (the worker's
//   metrics option), behaviours: {<job name>:
//   {failUntilAttempt?: n, fail?: "message", progress?: value, log?: "line"}}}
// Jobs whose name has no behaviour return {echo: data}. Output: {runs: [{id, name, data, opts,
// attempt, priority, startedAt}], finished: [job descriptions], timedOut}.
import { Worker } from 'bullmq';
import { connect, describe, input, output, queueOpts } from './common.mjs';

const args = input();
const connection = connect(args.url);
const runs = [];
const finished = [];
let done;
const allDone = new Promise(resolve => (done = resolve));

const worker = new Worker(
  args.queue,
  async job => {
    const attempt = job.attemptsMade + 1;
    runs.push({
      id: job.id,
      name: job.name,
      data: job.data,
      opts: job.opts,
      attempt,
      priority: job.priority,
      startedAt: Date.now(),
    });
    const behaviour = (args.behaviours ?? {})[job.name] ?? {};
    if (behaviour.progress !== undefined) {
      await job.updateProgress(behaviour.progress);
    }
    if (behaviour.log !== undefined) {
      await job.log(behaviour.log);
    }
    if (behaviour.fail !== undefined) {
      throw new Error(behaviour.fail);
    }
    if (behaviour.failUntilAttempt !== undefined && attempt < behaviour.failUntilAttempt) {
      throw new Error(`attempt ${attempt} failed on purpose`);
    }
    return { echo: job.data, attempt };
  },
  {
    ...queueOpts(args, connection),
    concurrency: args.concurrency ?? 1,
    ...(args.maxDataPoints ? { metrics: { maxDataPoints: args.maxDataPoints } } : {}),
  },
);

async function settled(job) {
  const state = await job.getState();
  if (state === 'completed' || state === 'failed') {
    finished.push(await describe(job));
    if (finished.length >= args.expect) {
      done(false);
    }
  }
}

worker.on('completed', job => settled(job));
worker.on('failed', job => job && settled(job));
const timer = setTimeout(() => done(true), args.timeoutMs ?? 20000);
const timedOut = await allDone;
clearTimeout(timer);
await worker.close();
connection.disconnect();
output({ runs, finished, timedOut });
