// Node BullMQ's view of a queue: {url, queue, prefix?, jobIds: [...]}.
// Prints {counts, workers: [{name, rawname}], version, paused, jobs: {<id>: description + logs},
// metrics: {completed, failed: Queue.getMetrics()}}.
import { Queue } from 'bullmq';
import { connect, describe, input, output, queueOpts } from './common.mjs';

const args = input();
const connection = connect(args.url);
// skipMetasUpdate: only look; a Queue would otherwise write its own version into meta.
const queue = new Queue(args.queue, { ...queueOpts(args, connection), skipMetasUpdate: true });
try {
  const jobs = {};
  for (const id of args.jobIds ?? []) {
    const job = await queue.getJob(id);
    const described = await describe(job);
    if (described) {
      described.logs = (await queue.getJobLogs(id)).logs;
    }
    jobs[id] = described;
  }
  output({
    counts: await queue.getJobCounts(),
    workers: (await queue.getWorkers()).map(w => ({ name: w.name, rawname: w.rawname })),
    version: await queue.getVersion(),
    paused: await queue.isPaused(),
    jobs,
    metrics: {
      completed: await queue.getMetrics('completed'),
      failed: await queue.getMetrics('failed'),
    },
  });
} finally {
  await queue.close();
  connection.disconnect();
}
