// Add jobs with Node BullMQ's Queue.add: {url, queue, prefix?, jobs: [{name, data, opts}]}.
// Prints {ids: [...], version: <meta.version>}.
import { Queue } from 'bullmq';
import { connect, input, output, queueOpts } from './common.mjs';

const args = input();
const connection = connect(args.url);
const queue = new Queue(args.queue, queueOpts(args, connection));
try {
  const ids = [];
  for (const job of args.jobs) {
    const added = await queue.add(job.name, job.data, job.opts ?? {});
    ids.push(added.id);
  }
  output({ ids, version: await queue.getVersion() });
} finally {
  await queue.close();
  connection.disconnect();
}
