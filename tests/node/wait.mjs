// Wait for jobs with Node BullMQ's Job.waitUntilFinished (QueueEvents on the events stream).
//
// Input: {url, queue, prefix?, ids: [...], ttl?}. Prints {"listening": true} once its QueueEvents
// reads the stream, then, when every job has finished, {results: {<id>: {returnvalue} |
// {failedReason}}}.
import { Queue, QueueEvents } from 'bullmq';
import { connect, input, output, queueOpts } from './common.mjs';

const args = input();
const connection = connect(args.url);
const queue = new Queue(args.queue, queueOpts(args, connection));
const eventsConnection = connect(args.url);
const events = new QueueEvents(args.queue, queueOpts(args, eventsConnection));
try {
  await events.waitUntilReady();
  output({ listening: true });
  const results = {};
  await Promise.all(
    args.ids.map(async id => {
      const job = await queue.getJob(id);
      if (!job) {
        results[id] = { missing: true };
        return;
      }
      try {
        results[id] = { returnvalue: await job.waitUntilFinished(events, args.ttl ?? 20000) };
      } catch (error) {
        results[id] = { failedReason: error.message };
      }
    }),
  );
  output({ results });
} finally {
  await events.close();
  await queue.close();
  connection.disconnect();
  eventsConnection.disconnect();
}
