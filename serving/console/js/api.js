// The public JSON API, as any client uses it: bearer key, problem+json errors, SSE events.

const KEY_STORAGE = "svd.apiKey"; // sessionStorage only: gone with the tab, never in a URL

export class ApiError extends Error {
  /** A problem+json answer (RFC 9457): `detail` is what the person is shown. */
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || "http_" + status;
    this.problem = problem;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function authHeaders(extra = {}) {
  const key = storedKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function problemOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body === "object") return body;
  } catch (_) { /* not JSON: a proxy's page, say */ }
  return { status: response.status, detail: `The server answered ${response.status} ${response.statusText}.` };
}

/** One API call; resolves to the parsed JSON, rejects with ApiError (or a TypeError offline). */
export async function request(method, path, { json, form, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  const response = await fetch(path, init);
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  return { status: response.status, body: response.status === 204 ? null : await response.json() };
}

export const api = {
  me: () => request("GET", "/api/v1/me"),
  models: () => request("GET", "/api/v1/models"),
  estimate: (fields) => request("POST", "/api/v1/estimate", { json: fields }),
  submitForm: (form, idempotencyKey) =>
    request("POST", "/api/v1/animate-image", { form, headers: { "Idempotency-Key": idempotencyKey } }),
  submitJson: (body, idempotencyKey) =>
    request("POST", "/api/v1/animate-image", { json: body, headers: { "Idempotency-Key": idempotencyKey } }),
  status: (jobId) => request("GET", `/api/v1/animate-image/status/${encodeURIComponent(jobId)}`),
  list: (params) => request("GET", `/api/v1/animate-image?${new URLSearchParams(params)}`),
  cancel: (jobId) => request("DELETE", `/api/v1/animate-image/${encodeURIComponent(jobId)}`),
  retry: (jobId) => request("POST", `/api/v1/animate-image/${encodeURIComponent(jobId)}/retry`),
  webhooks: (jobId) => request("GET", `/api/v1/animate-image/${encodeURIComponent(jobId)}/webhooks`),
  replay: (jobId, deliveryId) => request(
    "POST", `/api/v1/animate-image/${encodeURIComponent(jobId)}/webhooks/${encodeURIComponent(deliveryId)}/replay`),
  overview: () => request("GET", "/api/v1/admin/overview"),
  deadLetters: (params) => request("GET", `/api/v1/admin/dead-letter?${new URLSearchParams(params)}`),
};

const TERMINAL = new Set(["completed", "error", "canceled"]);

/** Split an SSE byte stream into events ({id, event, data}); comments and `retry:` are skipped. */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const event = { id: null, event: "message", data: "" };
      for (const line of block.split(/\r?\n/)) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "id") event.id = text;
        else if (field === "event") event.event = text;
        else if (field === "data") event.data += (event.data ? "\n" : "") + text;
      }
      if (event.data) yield event;
    }
  }
}

/**
 * Follow a job's events over the SSE endpoint with `fetch` streaming (an EventSource cannot
 * send the Authorization header). After a dropped connection it reconnects with
 * `Last-Event-ID`, so nothing is missed or repeated; it ends after the terminal event.
 * `lastEventId` / `onId` let the caller keep the position across a page reload.
 */
export async function followEvents(jobId, { lastEventId, onEvent, onId, onConnection, signal }) {
  let after = lastEventId || null;
  let delay = 500;
  while (!signal.aborted) {
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (after) headers["Last-Event-ID"] = after;
      const response = await fetch(`/api/v1/animate-image/${encodeURIComponent(jobId)}/events`, { headers, signal });
      if (!response.ok) throw new ApiError(response.status, await problemOf(response));
      onConnection?.(after ? "resumed" : "connected");
      delay = 500;
      for await (const item of sseEvents(response.body)) {
        const data = JSON.parse(item.data);
        if (item.id) {
          after = item.id;
          onId?.(item.id);
        }
        onEvent(item.event, data);
        if (TERMINAL.has(item.event)) return item.event;
      }
    } catch (error) {
      if (signal.aborted) return null;
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) throw error;
    }
    onConnection?.("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 8000);
  }
  return null;
}
