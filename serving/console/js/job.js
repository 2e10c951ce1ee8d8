// One job, live: events over SSE (resumed after a drop or a reload), progress, queue position,
// ETA, routing reason, cancel; then the result: video, downloads with SHA-256, cost, webhooks.

import { api, followEvents } from "./api.js";
import { $, el, fromNow, guarded, showError, usd, when } from "./util.js";

const CURRENT = "svd.currentJob"; // {jobId, lastEventId} in sessionStorage: a reload resumes
const TERMINAL = new Set(["completed", "error", "canceled"]);
const QUEUED_REFRESH_MS = 3000;
const WEBHOOK_LOOKS = 8; // reads of the delivery list after a job ends, 2 s apart

export class JobView {
  constructor({ onAgain, onChanged }) {
    this.onAgain = onAgain; // (seed, params) -> fills the form
    this.onChanged = onChanged; // a job was created or ended: the history may refresh
    this.jobId = null;
    this.abort = null;
    this.status = null;
  }

  wire() {
    $("cancel").addEventListener("click", guarded(async () => {
      const { body } = await api.cancel(this.jobId);
      this.render(body);
    }));
    $("job-retry").addEventListener("click", guarded(async () => {
      const { body } = await api.retry(this.jobId);
      this.open(body.jobId).catch(showError);
      this.onChanged?.();
    }));
    $("again").addEventListener("click", () => this.onAgain(this.status.params.seed, this.status.params));
  }

  /** Resume the job this tab was following before a reload, if any. */
  resume() {
    const saved = JSON.parse(sessionStorage.getItem(CURRENT) || "null");
    if (saved?.jobId) this.open(saved.jobId, saved.lastEventId).catch(showError);
  }

  forget() {
    this.abort?.abort();
    sessionStorage.removeItem(CURRENT);
    this.jobId = null;
    $("job").hidden = true;
  }

  async open(jobId, lastEventId = null) {
    this.abort?.abort();
    const abort = (this.abort = new AbortController());
    this.jobId = jobId;
    this.saveId(lastEventId);
    $("job").hidden = false;
    $("job-id").textContent = jobId;
    $("result").hidden = true;
    $("job-error").hidden = true;
    $("job-steps").textContent = "";
    $("job-progress").value = 0;
    try {
      this.render((await api.status(jobId)).body);
    } catch (error) {
      if (error.status === 404) this.forget(); // another key's job, or gone
      throw error;
    }
    if (TERMINAL.has(this.status.status)) return this.finish();
    // While it waits, the queue position and expected start move without events: read them.
    const waiting = setInterval(() => {
      if (this.status?.status !== "queued" || abort.signal.aborted) return;
      api.status(jobId).then(({ body }) => { if (!abort.signal.aborted) this.render(body); }).catch(() => {});
    }, QUEUED_REFRESH_MS);
    let ended;
    try {
      ended = await followEvents(jobId, {
        lastEventId,
        signal: abort.signal,
        onId: (id) => this.saveId(id),
        onConnection: (state) => { $("job-connection").textContent = state; },
        onEvent: (type, data) => this.event(type, data),
      });
    } finally {
      clearInterval(waiting);
    }
    if (ended && !abort.signal.aborted) await this.finish();
  }

  saveId(lastEventId) {
    sessionStorage.setItem(CURRENT, JSON.stringify({ jobId: this.jobId, lastEventId }));
  }

  event(type, data) {
    const progress = $("job-progress");
    if (typeof data.progress === "number") progress.value = Math.max(progress.value, data.progress);
    if (data.step !== undefined) $("job-steps").textContent = `Step ${data.step} of ${data.steps}`;
    if (type === "queued") $("job-queue").textContent = data.queuePosition ?? "–";
    if (type === "processing" || type === "progress") $("job-queue").textContent = "–";
    this.setStatus(data.status || type, data.stage);
    if (type === "processing" && !this.status.routingReason) {
      // Routing is decided as the job starts: read it once from the status.
      api.status(this.jobId).then(({ body }) => this.render(body)).catch(() => {});
    }
  }

  setStatus(status, stage) {
    const badge = $("job-status");
    badge.textContent = status;
    badge.className = `status ${status}`;
    $("job-stage").textContent = stage && stage !== status ? `(${stage})` : "";
    $("cancel").disabled = TERMINAL.has(status);
    $("job").dataset.status = status;
  }

  render(status) {
    this.status = status;
    this.setStatus(status.status, status.stage);
    const progress = $("job-progress");
    progress.value = Math.max(status.status === "queued" ? 0 : progress.value, status.progress);
    $("job-queue").textContent = status.queuePosition ?? "–";
    $("job-eta").textContent = status.status === "queued" ? fromNow(status.estimatedStartAt) : "–";
    $("job-routing").textContent = status.routingReason
      ? `${status.provider}: ${status.routingReason}` : status.provider || "–";
    $("job-retry").hidden = !["error", "canceled"].includes(status.status);
    if (status.error) {
      $("job-error").textContent = `${status.error.message} (${status.error.code})`;
      $("job-error").hidden = false;
    }
  }

  async finish() {
    const { body } = await api.status(this.jobId);
    this.render(body);
    $("job-connection").textContent = "closed";
    this.onChanged?.();
    if (body.status === "completed") await this.showResult(body);
  }

  async showResult(status) {
    $("result").hidden = false;
    const video = $("video");
    if (video.getAttribute("src") !== status.resultUrl) {
      video.src = status.resultUrl;
      video.muted = true; // muted videos may play without a gesture
      video.play().catch(() => { /* autoplay refused: the controls are there */ });
    }
    const thumbnail = $("thumbnail");
    thumbnail.hidden = !status.thumbnailUrl;
    if (status.thumbnailUrl) thumbnail.src = status.thumbnailUrl;
    $("result-seed").textContent = status.params.seed;
    $("result-cost").textContent = `${usd(status.costUsd)} (estimated ${usd(status.estimatedCostUsd)})`;
    $("result-gpu").textContent = status.gpuSeconds == null ? "–" : status.gpuSeconds.toFixed(2);
    $("result-cached").textContent = status.cached ? `yes, from ${status.cachedFrom}` : "no";
    $("downloads").replaceChildren(...Object.entries(status.outputs).map(([kind, url]) => el("li", {},
      el("a", { href: url, download: `${status.jobId}.${kind === "thumbnail" ? "jpg" : kind}`, text: `Download ${kind}` }),
      status.checksums[kind] ? el("div", { className: "sha", text: `SHA-256 ${status.checksums[kind]}` }) : null)));
    await this.showWebhooks();
  }

  async showWebhooks(tries = WEBHOOK_LOOKS) {
    const jobId = this.jobId;
    const list = $("webhooks");
    const { body } = await api.webhooks(jobId);
    if (jobId !== this.jobId) return;
    // Deliveries are recorded and sent after the job ends: look again while one may still come.
    clearTimeout(this.webhookTimer);
    if (tries > 1 && (!body.deliveries.length || body.deliveries.some((d) => d.status === "pending"))) {
      this.webhookTimer = setTimeout(() => this.showWebhooks(tries - 1).catch(showError), 2000);
    }
    if (!body.deliveries.length) {
      list.replaceChildren(el("li", { text: "No webhook for this job." }));
      return;
    }
    list.replaceChildren(...body.deliveries.map((d) => el("li", {},
      `${d.eventType} → ${d.url}: ${d.status} after ${d.attempts} attempt(s)`,
      d.lastStatusCode ? ` (last answer ${d.lastStatusCode})` : "",
      d.lastError ? ` ${d.lastError}` : "",
      " ", el("span", { className: "when", text: when(d.deliveredAt || d.createdAt) }), " ",
      el("button", { type: "button", text: "Replay", "aria-label": `Replay delivery ${d.deliveryId}`,
        onclick: guarded(async () => {
          await api.replay(this.jobId, d.deliveryId);
          showError(null);
          await this.showWebhooks();
        }) }))));
  }
}
