// The owner's jobs, newest first, cursor-paged, filtered by status; retry for failed or canceled.

import { api } from "./api.js";
import { $, el, guarded, when } from "./util.js";

const PAGE_SIZE = 10;

export class History {
  constructor({ onOpen }) {
    this.onOpen = onOpen;
    this.cursor = null;
  }

  wire() {
    $("history-status").addEventListener("change", guarded(() => this.reload()));
    $("history-refresh").addEventListener("click", guarded(() => this.reload()));
    $("history-more").addEventListener("click", guarded(() => this.page()));
  }

  async reload() {
    this.generation = (this.generation || 0) + 1; // answers to earlier reloads are dropped
    this.cursor = null;
    $("history").replaceChildren();
    await this.page();
  }

  async page() {
    const generation = this.generation;
    const params = { limit: PAGE_SIZE };
    if (this.cursor) params.cursor = this.cursor;
    const status = $("history-status").value;
    if (status) params.status = status;
    const { body } = await api.list(params);
    if (generation !== this.generation) return;
    $("history").append(...body.jobs.map((job) => this.item(job)));
    this.cursor = body.nextCursor;
    $("history-more").hidden = !body.nextCursor;
    $("history-empty").hidden = $("history").children.length > 0;
  }

  item(job) {
    const thumb = job.thumbnailUrl
      ? el("img", { src: job.thumbnailUrl, alt: `Thumbnail of job ${job.jobId}`, loading: "lazy" })
      : el("img", { alt: "", src: "static/favicon.svg" });
    const retry = ["error", "canceled"].includes(job.status)
      ? el("button", { type: "button", text: "Retry", "aria-label": `Retry job ${job.jobId}`,
        onclick: guarded(async () => {
          const { body } = await api.retry(job.jobId);
          this.onOpen(body.jobId);
          await this.reload();
        }) })
      : null;
    return el("li", { dataset: { jobId: job.jobId, status: job.status } },
      thumb,
      el("span", { className: `status ${job.status}`, text: job.status }),
      job.cached ? el("span", { className: "badge", text: "cached" }) : null,
      job.retryOf ? el("span", { className: "badge", text: "retry" }) : null,
      el("span", { className: "when", text: `${job.model}, ${when(job.createdAt)}` }),
      el("button", { type: "button", text: "Open", "aria-label": `Open job ${job.jobId}`,
        onclick: guarded(() => this.onOpen(job.jobId)) }),
      retry);
  }
}
