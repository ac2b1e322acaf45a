// Retry failed jobs as Bull Board's "retry" button does: Job.retry('failed'), which keeps
// attemptsMade. {url, queue, prefix?, jobIds: [...]} -> {retried: [...]}.
import { Queue } from 'bullmq';
import { connect, input, output, queueOpts } from './common.mjs';

const args = input();
const connection = connect(args.url);
const queue = new Queue(args.queue, { ...queueOpts(args, connection), skipMetasUpdate: true });
try {
  const retried = [];
  for (const id of args.jobIds) {
    const job = await queue.getJob(id);
    await job.retry('failed');
    retried.push(id);
  }
  output({ retried });
} finally {
  await queue.close();
  connection.disconnect();
}
