// node demo.mjs IMAGE: the whole round trip against a running svd-serve (make test runs it).
// Starts the example backend on a free port, uploads IMAGE through it, follows the progress it
// relays, waits for svd-serve's signed webhook, and prints a JSON summary on stdout.
import { once } from 'node:events';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { createApp } from './app.mjs';
import { parseSse, SvdServe, SvdServeError } from './svd-serve.mjs';

const image = await readFile(process.argv[2]);
const server = createServer();
server.listen(0, '127.0.0.1');
await once(server, 'listening');
const base = `http://127.0.0.1:${server.address().port}`;

let webhookArrived;
const webhook = new Promise((resolve) => { webhookArrived = resolve; });
const svd = new SvdServe();
server.on('request', createApp({
  svd,
  webhookSecret: process.env.SVD_SERVE_WEBHOOK_SECRET,
  publicUrl: base,
  onWebhook: (id, message) => webhookArrived({ id, type: message.type, jobId: message.data.jobId }),
}));

const upload = await fetch(`${base}/videos?numFrames=4&numInferenceSteps=2&width=128&height=64&seed=5&cache=false`, {
  method: 'POST', headers: { 'Content-Type': 'image/png' }, body: image,
});
if (upload.status !== 202) throw new Error(`upload: ${upload.status} ${await upload.text()}`);
const { jobId } = await upload.json();

const events = [];
const relayed = await fetch(`${base}/videos/${jobId}/events`);
for await (const event of parseSse(relayed.body)) events.push(event.event);

const timeout = setTimeout(() => { throw new Error('no webhook within 120 s'); }, 120_000);
const delivered = await webhook;
clearTimeout(timeout);

// A webhook whose signature does not verify is refused.
const forged = await fetch(`${base}/webhooks/svd-serve`, {
  method: 'POST',
  headers: {
    'Content-Type': 'application/json', 'webhook-id': 'msg_forged', 'webhook-timestamp': String(Math.floor(Date.now() / 1000)),
    'webhook-signature': 'v1,bm90IGEgc2lnbmF0dXJl',
  },
  body: JSON.stringify({ type: 'job.completed', data: { jobId } }),
});

let notFound;
try {
  await svd.getJob('0'.repeat(32));
} catch (error) {
  if (!(error instanceof SvdServeError)) throw error;
  notFound = { status: error.status, code: error.code };
}
const status = (await (await fetch(`${base}/videos/${jobId}`)).json()).status;

console.log(JSON.stringify({ jobId, events, webhook: delivered, forgedStatus: forged.status, notFound, status }));
server.close();
process.exit(0);
