// Run the example backend: SVD_SERVE_URL, SVD_SERVE_API_KEY, SVD_SERVE_WEBHOOK_SECRET, PORT,
// PUBLIC_URL (where svd-serve reaches this backend's webhook).
import { createApp } from './app.mjs';
import { SvdServe } from './svd-serve.mjs';

const port = Number(process.env.PORT ?? 3000);
const app = createApp({
  svd: new SvdServe(),
  webhookSecret: process.env.SVD_SERVE_WEBHOOK_SECRET,
  publicUrl: process.env.PUBLIC_URL ?? `http://127.0.0.1:${port}`,
  onWebhook: (id, message) => console.log(`webhook ${id}: ${message.type} ${message.data.jobId}`),
});
app.listen(port, () => console.log(`listening on http://127.0.0.1:${port}`));
