// The operator's view (admin scope): the overview and the dead letters, with retry.

import { api } from "./api.js";
import { $, el, guarded, usd, when } from "./util.js";

export class Operator {
  constructor({ onOpen }) {
    this.onOpen = onOpen;
    this.cursor = null;
    this.ownerId = null; // the admin's own owner id (from /me)
  }

  wire() {
    $("operator-refresh").addEventListener("click", guarded(() => this.reload()));
    $("dead-letters-more").addEventListener("click", guarded(() => this.deadLetters()));
  }

  async reload() {
    this.generation = (this.generation || 0) + 1; // answers to earlier reloads are dropped
    await this.overview();
    this.cursor = null;
    $("dead-letters").replaceChildren();
    await this.deadLetters();
  }

  async overview() {
    const { body } = await api.overview();
    const pairs = (map, unit = "") => Object.entries(map).map(([k, v]) => `${k} ${v}${unit}`).join(", ") || "–";
    const open = Object.entries(body.breakersOpen).filter(([, isOpen]) => isOpen).map(([p]) => p);
    const rows = [
      ["Queue depth", pairs(body.queueDepth)],
      ["Oldest wait", pairs(body.oldestWaitS, " s")],
      ["Generators", `${body.generators.running ?? "?"} running of ${body.generators.wanted ?? "?"} wanted`],
      ["Breakers open", Object.keys(body.breakersOpen).length ? (open.join(", ") || "none") : "–"],
      ["Error rate", body.errorRate === null ? "–" : `${(body.errorRate * 100).toFixed(1)}% of ${
        Object.values(body.jobsFinished).reduce((a, b) => a + b, 0)} finished`],
      ["Spend this month", usd(body.monthToDateUsd)],
    ];
    if (!body.metricsAvailable) rows.push(["Metrics", "Redis could not be read"]);
    $("overview").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  }

  async deadLetters() {
    const params = { limit: 20 };
    if (this.cursor) params.cursor = this.cursor;
    const generation = this.generation;
    const { body } = await api.deadLetters(params);
    if (generation !== this.generation) return;
    $("dead-letters").append(...body.jobs.map((job) => el("li", { dataset: { jobId: job.jobId } },
      el("span", { className: "status error", text: "error" }),
      el("code", { text: job.jobId.slice(0, 8) }),
      el("span", { text: `${job.ownerId}: ${job.error ? job.error.message : "unknown"} ` +
        `(${job.attempts}/${job.maxAttempts} attempts)` }),
      el("span", { className: "when", text: when(job.completedAt) }),
      el("button", { type: "button", text: "Retry", "aria-label": `Retry job ${job.jobId}`,
        onclick: guarded(async (event) => {
          const { body: accepted } = await api.retry(job.jobId);
          // The new job is its owner's; an admin's own jobs open in the job panel.
          event.target.replaceWith(el("span", { className: "badge", text: `retried as ${accepted.jobId}` }));
          if (job.ownerId === this.ownerId) this.onOpen(accepted.jobId);
        }) }))));
    this.cursor = body.nextCursor;
    $("dead-letters-more").hidden = !body.nextCursor;
    $("dead-letters-empty").hidden = $("dead-letters").children.length > 0;
  }
}
