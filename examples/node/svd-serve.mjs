// A minimal svd-serve client on Node's own fetch (Node 20+): submit a job, follow its
// Server-Sent Events (resumed with Last-Event-ID after a dropped connection), typed errors.
import { randomUUID } from 'node:crypto';

export class SvdServeError extends Error {
  // Every error answer is RFC 9457 problem+json with a stable `code`.
  constructor(status, problem, retryAfter) {
    super(`${status} ${problem.code}: ${problem.detail}`);
    this.status = status;
    this.code = problem.code;
    this.detail = problem.detail;
    this.retryAfter = retryAfter; // seconds, on 429
  }
}

export class SvdServe {
  constructor({ baseUrl = process.env.SVD_SERVE_URL, apiKey = process.env.SVD_SERVE_API_KEY } = {}) {
    this.baseUrl = (baseUrl ?? 'http://127.0.0.1:8000').replace(/\/$/, '');
    this.headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  }

  async #json(path, init = {}) {
    const response = await fetch(this.baseUrl + path, { ...init, headers: { ...this.headers, ...init.headers } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const retryAfter = response.headers.get('retry-after');
      throw new SvdServeError(response.status, body, retryAfter === null ? undefined : Number(retryAfter));
    }
    return body;
  }

  /** Submit an image (a Buffer) with API fields (`numFrames`, `seed`, `webhookUrl`, ...). */
  async submitJob(image, fields = {}, { filename = 'image.png', idempotencyKey = randomUUID() } = {}) {
    const form = new FormData();
    form.append('image', new Blob([image]), filename);
    for (const [name, value] of Object.entries(fields)) {
      form.append(name, typeof value === 'object' ? JSON.stringify(value) : String(value));
    }
    // The same Idempotency-Key on a retry of this submit returns the same job, never a second one.
    return this.#json('/api/v1/animate-image', { method: 'POST', body: form, headers: { 'Idempotency-Key': idempotencyKey } });
  }

  getJob(jobId) {
    return this.#json(`/api/v1/animate-image/status/${encodeURIComponent(jobId)}`);
  }

  cancelJob(jobId) {
    return this.#json(`/api/v1/animate-image/${encodeURIComponent(jobId)}`, { method: 'DELETE' });
  }

  /**
   * Yield the job's events ({id, event, data}) until its terminal one (completed, error,
   * canceled). A dropped connection is resumed with Last-Event-ID: nothing is lost or repeated.
   */
  async *followEvents(jobId, { lastEventId, maxReconnects = 5 } = {}) {
    let failures = 0;
    for (;;) {
      const headers = { ...this.headers, Accept: 'text/event-stream' };
      if (lastEventId) headers['Last-Event-ID'] = lastEventId;
      try {
        const response = await fetch(`${this.baseUrl}/api/v1/animate-image/${encodeURIComponent(jobId)}/events`, { headers });
        if (!response.ok) {
          throw new SvdServeError(response.status, await response.json().catch(() => ({})));
        }
        for await (const event of parseSse(response.body)) {
          failures = 0;
          lastEventId = event.id ?? lastEventId;
          yield event;
          if (['completed', 'error', 'canceled'].includes(event.event)) return;
        }
      } catch (error) {
        if (error instanceof SvdServeError) throw error;
        // A network error: reconnect below.
      }
      if (++failures > maxReconnects) throw new Error(`events of job ${jobId}: connection lost`);
      await new Promise((resolve) => setTimeout(resolve, 250 * 2 ** failures));
    }
  }
}

/** Server-Sent Events from a fetch body: one {id, event, data} per event; comments skipped. */
export async function* parseSse(body) {
  const decoder = new TextDecoder();
  let buffer = '';
  for await (const chunk of body) {
    buffer += decoder.decode(chunk, { stream: true }).replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { id: undefined, event: 'message', data: '' };
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'id') event.id = value;
        else if (field === 'event') event.event = value;
        else if (field === 'data') event.data += (event.data ? '\n' : '') + value;
      }
      if (event.data) yield { id: event.id, event: event.event, data: JSON.parse(event.data) };
    }
  }
}
