// Read a queue's events with Node BullMQ's QueueEvents, from the start of the stream.
//
// Input: {url, queue, prefix?, names: [event names], count, timeoutMs?}. Collects the events
// named until `count` arrived (or the timeout), then prints {events: [{name, args}], timedOut}.
import { QueueEvents } from 'bullmq';
import { connect, input, output, queueOpts } from './common.mjs';

const args = input();
const connection = connect(args.url);
const events = new QueueEvents(args.queue, { ...queueOpts(args, connection), lastEventId: '0-0' });
const seen = [];
let done;
const allDone = new Promise(resolve => (done = resolve));
for (const name of args.names) {
  events.on(name, eventArgs => {
    seen.push({ name, args: eventArgs });
    if (seen.length >= args.count) {
      done(false);
    }
  });
}
const timer = setTimeout(() => done(true), args.timeoutMs ?? 10000);
const timedOut = await allDone;
clearTimeout(timer);
await events.close();
connection.disconnect();
output({ events: seen, timedOut });
