// The console's entry point: the key, who it belongs to, the sections, and their wiring.

import { api, storeKey, storedKey } from "./api.js";
import { History } from "./history.js";
import { JobView } from "./job.js";
import { Operator } from "./admin.js";
import { SubmitForm } from "./form.js";
import { $, guarded, showError } from "./util.js";

const job = new JobView({
  onAgain: (seed) => {
    form.setSeed(seed);
    selectTab("submit");
    $("submit").focus();
  },
  onChanged: () => { if (!$("panel-history").hidden) history.reload().catch(showError); },
});
const form = new SubmitForm({
  onAccepted: (accepted) => job.open(accepted.jobId).catch(showError),
  onModel: (model) => {
    const banner = $("banner");
    banner.hidden = !model.randomWeights;
    banner.textContent = model.randomWeights
      ? `${model.name} has random weights: its videos are coloured noise, not animation. ` +
        "It exercises the whole service; use a model with real weights for real videos."
      : "";
  },
});
const history = new History({ onOpen: (jobId) => { selectTab("submit"); job.open(jobId).catch(showError); } });
const operator = new Operator({ onOpen: (jobId) => { selectTab("submit"); job.open(jobId).catch(showError); } });

const TABS = ["submit", "history", "operator"];

function selectTab(name) {
  for (const tab of TABS) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`panel-${tab}`).hidden = !selected;
  }
  if (name === "history") history.reload().catch(showError);
  if (name === "operator") operator.reload().catch(showError);
}

function wireTabs() {
  for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
  // Arrow keys move between tabs (WAI-ARIA tabs pattern).
  $("tab-submit").parentElement.addEventListener("keydown", (event) => {
    if (!["ArrowLeft", "ArrowRight"].includes(event.key)) return;
    const visible = TABS.filter((t) => !$(`tab-${t}`).hidden);
    const current = visible.findIndex((t) => $(`tab-${t}`).getAttribute("aria-selected") === "true");
    const next = visible[(current + (event.key === "ArrowRight" ? 1 : visible.length - 1)) % visible.length];
    selectTab(next);
    $(`tab-${next}`).focus();
  });
}

/** Ask /me who the key belongs to; in development mode no key is needed. True when usable. */
async function identify() {
  const identity = $("identity");
  try {
    const { body } = await api.me();
    identity.textContent = body.authDisabled
      ? "Development mode: authentication is disabled, no key needed (owner local)."
      : `Owner ${body.ownerId}, scopes ${body.scopes.join(", ")}`;
    document.body.dataset.owner = body.ownerId;
    const admin = body.scopes.includes("admin");
    operator.ownerId = body.ownerId;
    $("tab-operator").hidden = !admin;
    showError(null);
    return true;
  } catch (error) {
    $("tab-operator").hidden = true;
    delete document.body.dataset.owner;
    identity.textContent = error.status === 401
      ? (storedKey() ? `The key was refused: ${error.message}` : "Enter an API key to start.")
      : error.message;
    return false;
  }
}

async function start() {
  if (!(await identify())) return;
  await form.load();
  form.scheduleEstimate();
  job.resume();
  if (!$("panel-history").hidden) await history.reload();
}

function wireKey() {
  $("api-key").value = storedKey();
  $("key-form").addEventListener("submit", guarded(async (event) => {
    event.preventDefault();
    storeKey($("api-key").value.trim());
    job.forget();
    $("history").replaceChildren();
    await start();
  }));
  $("forget-key").addEventListener("click", guarded(async () => {
    storeKey("");
    $("api-key").value = "";
    job.forget();
    $("history").replaceChildren();
    await identify();
  }));
}

form.wire();
job.wire();
history.wire();
operator.wire();
wireTabs();
wireKey();
start().catch(showError);
