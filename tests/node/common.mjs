// Shared helpers for the interop scripts: argv/stdout JSON and ioredis connections.
import IORedis from 'ioredis';

/** The JSON document passed as the first command-line argument. */
export function input() {
  return JSON.parse(process.argv[2] ?? '{}');
}

/** Print the result as one JSON line (the last line of stdout is what pytest reads). */
export function output(value) {
  process.stdout.write(JSON.stringify(value) + '\n');
}

/** An ioredis client for the URL; BullMQ needs maxRetriesPerRequest: null for workers. */
export function connect(url) {
  return new IORedis(url, { maxRetriesPerRequest: null });
}

/** Queue/Worker options shared by the scripts. */
export function queueOpts(args, connection) {
  return { connection, prefix: args.prefix ?? 'bull' };
}

/** A job as Node BullMQ sees it. */
export async function describe(job) {
  if (!job) {
    return null;
  }
  return {
    id: job.id,
    name: job.name,
    data: job.data,
    opts: job.opts,
    state: await job.getState(),
    attemptsMade: job.attemptsMade,
    attemptsStarted: job.attemptsStarted,
    progress: job.progress,
    returnvalue: job.returnvalue,
    failedReason: job.failedReason ?? null,
    stacktrace: job.stacktrace ?? [],
    priority: job.priority,
    delay: job.delay,
    timestamp: job.timestamp,
    processedOn: job.processedOn ?? null,
    finishedOn: job.finishedOn ?? null,
  };
}
