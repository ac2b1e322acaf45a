// Job schedulers through Node BullMQ's Queue: {url, queue, prefix?, action, ...}.
//   list                          -> {schedulers: queue.getJobSchedulers(0, -1, true), count}
//   upsert {id, repeat, template} -> {job: <first job's description>}
//   remove {id}                   -> {removed}
import { Queue } from 'bullmq';
import { connect, describe, input, output, queueOpts } from './common.mjs';

const args = input();
const connection = connect(args.url);
const queue = new Queue(args.queue, queueOpts(args, connection));
try {
  if (args.action === 'list') {
    const schedulers = await queue.getJobSchedulers(0, -1, true);
    output({ schedulers, count: await queue.getJobSchedulersCount() });
  } else if (args.action === 'upsert') {
    const job = await queue.upsertJobScheduler(args.id, args.repeat, args.template);
    output({ job: await describe(job) });
  } else if (args.action === 'remove') {
    output({ removed: await queue.removeJobScheduler(args.id) });
  } else {
    throw new Error(`unknown action ${args.action}`);
  }
} finally {
  await queue.close();
  connection.disconnect();
}
