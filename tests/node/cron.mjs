// Next runs of cron patterns as Node BullMQ computes them (cron-parser, bullmq's dependency):
// stdin {cases: [{pattern, tz, baseMs, count}]} -> {runs: [[ms, ...] | {error}]}.
// tz null means the process's zone, as BullMQ's defaultRepeatStrategy does without a tz.
import { CronExpressionParser } from 'cron-parser';
import { readFileSync } from 'node:fs';

const args = JSON.parse(readFileSync(0, 'utf8'));
const runs = args.cases.map(({ pattern, tz, baseMs, count }) => {
  try {
    const options = { currentDate: new Date(baseMs) };
    if (tz) {
      options.tz = tz;
    }
    const interval = CronExpressionParser.parse(pattern, options);
    const found = [];
    for (let i = 0; i < count; i++) {
      found.push(interval.next().getTime());
    }
    return found;
  } catch (error) {
    return { error: error.message };
  }
});
process.stdout.write(JSON.stringify({ runs }) + '\n');
