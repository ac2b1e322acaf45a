// Flows with Node BullMQ's FlowProducer and Workers. The first argument is JSON with `mode`:
//
// add:     {url, prefix?, flow: {name, queueName, data, opts, children}} -> the tree of ids
//          {id, name, queueName, children: [...]} that FlowProducer.add wrote.
// work:    {url, prefix?, queues: [...], roots: [{id, queue}], timeoutMs?, fail: [job names]}
//          -> runs a Worker on each queue until every root has finished, then prints
//          {runs: [{id, name, queue}], timedOut}. A job whose name is in `fail` throws; any
//          other job returns {echo: data, children: getChildrenValues(), ignored:
//          getIgnoredChildrenFailures()}.
// getflow: {url, prefix?, id, queue, queues: [...]} -> FlowProducer.getFlow's tree, each node
//          {id, name, queueName, state, returnvalue, failedReason, opts, parent, parentKey,
//          childrenValues, children}, and bullBoardRoots: for each leaf, the root that Bull
//          Board's findFlowRoot reaches by climbing job.opts.parent {id, queue}.
import { FlowProducer, Queue, Worker } from 'bullmq';
import { connect, input, output } from './common.mjs';

const args = input();
const connection = connect(args.url);
const prefix = args.prefix ?? 'bull';

async function add() {
  const producer = new FlowProducer({ connection, prefix });
  try {
    const tree = await producer.add(args.flow);
    const ids = node => ({
      id: node.job.id,
      name: node.job.name,
      queueName: node.job.queueName,
      children: (node.children ?? []).map(ids),
    });
    output(ids(tree));
  } finally {
    await producer.close();
  }
}

async function work() {
  const runs = [];
  const fail = new Set(args.fail ?? []);
  const workers = args.queues.map(
    name =>
      new Worker(
        name,
        async job => {
          runs.push({ id: job.id, name: job.name, queue: name });
          if (fail.has(job.name)) {
            throw new Error(`${job.name} failed on purpose`);
          }
          return {
            echo: job.data,
            children: await job.getChildrenValues(),
            ignored: await job.getIgnoredChildrenFailures(),
          };
        },
        { connection, prefix, concurrency: 4 },
      ),
  );
  const queues = Object.fromEntries(
    args.queues.map(name => [name, new Queue(name, { connection, prefix, skipMetasUpdate: true })]),
  );
  const deadline = Date.now() + (args.timeoutMs ?? 20000);
  let timedOut = true;
  while (Date.now() < deadline) {
    const states = await Promise.all(
      args.roots.map(async root => (await queues[root.queue].getJob(root.id))?.getState()),
    );
    if (states.every(state => state === 'completed' || state === 'failed')) {
      timedOut = false;
      break;
    }
    await new Promise(resolve => setTimeout(resolve, 50));
  }
  await Promise.all(workers.map(worker => worker.close()));
  await Promise.all(Object.values(queues).map(queue => queue.close()));
  output({ runs, timedOut });
}

async function getflow() {
  const producer = new FlowProducer({ connection, prefix });
  const queues = Object.fromEntries(
    args.queues.map(name => [name, new Queue(name, { connection, prefix, skipMetasUpdate: true })]),
  );
  try {
    const tree = await producer.getFlow({ id: args.id, queueName: args.queue, maxChildren: 100 });
    const leaves = [];
    const describe = async node => {
      const job = node.job;
      const children = await Promise.all((node.children ?? []).map(describe));
      if (children.length === 0) {
        leaves.push(job);
      }
      return {
        id: job.id,
        name: job.name,
        queueName: job.queueName,
        state: await job.getState(),
        returnvalue: job.returnvalue ?? null,
        failedReason: job.failedReason ?? null,
        opts: job.opts,
        parent: job.parent ?? null,
        parentKey: job.parentKey ?? null,
        childrenValues: await job.getChildrenValues(),
        children,
      };
    };
    const described = tree ? await describe(tree) : null;
    // Bull Board's findFlowRoot: climb opts.parent, matching its queue to a known queue name.
    const bullBoardRoots = [];
    for (let job of leaves) {
      let queueName = job.queueName;
      while (job.opts.parent) {
        const parent = job.opts.parent;
        queueName = args.queues.find(name => parent.queue.endsWith(`:${name}`));
        job = await queues[queueName].getJob(parent.id);
      }
      bullBoardRoots.push({ id: job.id, queue: queueName });
    }
    output({ tree: described, bullBoardRoots });
  } finally {
    await producer.close();
    await Promise.all(Object.values(queues).map(queue => queue.close()));
  }
}

try {
  await { add, work, getflow }[args.mode]();
} finally {
  connection.disconnect();
}
