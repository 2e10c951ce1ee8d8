// An Express backend in front of svd-serve: its users upload an image, it submits the job with
// a webhook back to itself, relays the job's progress as Server-Sent Events, and accepts
// svd-serve's webhooks only when their Standard Webhooks signature verifies.
import express from 'express';
import { Webhook, WebhookVerificationError } from 'standardwebhooks';

export function createApp({ svd, webhookSecret, publicUrl, onWebhook = () => {} }) {
  const app = express();
  const webhook = new Webhook(webhookSecret); // `whsec_...`, the service's SVD_SERVE_WEBHOOK_SECRETS

  // The signature covers the exact bytes: read the body raw, verify, then parse.
  app.post('/webhooks/svd-serve', express.raw({ type: 'application/json' }), (req, res) => {
    let message;
    try {
      message = webhook.verify(req.body, {
        'webhook-id': req.get('webhook-id'),
        'webhook-timestamp': req.get('webhook-timestamp'),
        'webhook-signature': req.get('webhook-signature'),
      });
    } catch (error) {
      if (error instanceof WebhookVerificationError) return res.status(400).json({ error: error.message });
      throw error;
    }
    onWebhook(req.get('webhook-id'), message); // deduplicate on webhook-id: a retry repeats it
    res.status(204).end();
  });

  // Upload an image (the raw bytes); answers 202 with the job id.
  app.post('/videos', express.raw({ type: 'image/*', limit: '20mb' }), async (req, res, next) => {
    try {
      const fields = { ...req.query, webhookUrl: `${publicUrl}/webhooks/svd-serve` };
      const job = await svd.submitJob(req.body, fields, { filename: `upload.${req.get('content-type').split('/')[1]}` });
      res.status(202).json({ jobId: job.jobId, status: job.status });
    } catch (error) {
      next(error);
    }
  });

  // The job's progress, relayed to a browser's EventSource.
  app.get('/videos/:jobId/events', async (req, res, next) => {
    try {
      const events = svd.followEvents(req.params.jobId, { lastEventId: req.get('last-event-id') });
      res.set({ 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
      res.flushHeaders();
      for await (const { id, event, data } of events) {
        res.write(`id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
      }
      res.end();
    } catch (error) {
      next(error);
    }
  });

  app.get('/videos/:jobId', async (req, res, next) => {
    try {
      res.json(await svd.getJob(req.params.jobId));
    } catch (error) {
      next(error);
    }
  });

  // svd-serve's problem codes go to our callers as they are.
  app.use((error, req, res, next) => {
    if (res.headersSent) return next(error);
    if (error.code && error.status) return res.status(error.status).json({ code: error.code, detail: error.detail });
    return next(error);
  });
  return app;
}
